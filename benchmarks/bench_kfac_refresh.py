"""K-FAC refresh cost of ``FisherPreconditioner`` as a ratio to a plain training step.

Never run in CI. ``python -m benchmarks.bench_kfac_refresh [--repeats 5]`` writes
``benchmarks/results/kfac_refresh.md`` (unless ``--quick``).

* Single process, per workload (MLP 40-512-512-10 N=256; CNN 2 conv + linear N=128; a
  BERT-style encoder, 6 layers, d=384, 6 heads, FF 1536, N=32, T=128, explicit nn.Linear
  projections): the wall time of one training step (zero_grad, forward, mean
  cross-entropy, backward, SGD step) plain, with ``FisherPreconditioner(kind="kfac",
  update_every=1)`` for ``source="batch"`` (an extra forward/backward on the batch) and
  ``source="backward"`` (statistics recorded from the step's own forward/backward), the
  latter also with ``kfac_approx="reduce"`` (K-FAC-reduce: one outer product per sample
  instead of one per token), and with ASDL's ``KfacGradientMaker`` (empirical Fisher, from its own forward/backward,
  curvature and inverses every step) when ``asdl`` is installed. Every method has its own
  copy of the model; after one warm-up step each, the methods take turns (A, B, C, D, A,
  B, ...) ``--repeats`` times, so load hits all alike; ratio = median step / median plain
  step. The preconditioned parameters are the K-FAC-covered layers (Linear, Conv,
  Embedding) for natgrad; ASDL ignores the LayerNorms likewise.
* GPT-2 small (``--gpt2``): ``GPT2LMHeadModel(GPT2Config())`` (124M, tied LM head), N=4,
  T=128, K-FAC ``source="backward"`` with ``max_factor_dim=4096`` over every ``Conv1D``
  (the position embedding reads position ids shared by the batch, and the tied
  ``wte``/LM-head weight is shared by two modules: no Kronecker factor from the backward
  covers them, so they are left out); and the
  same with an untied LM head (``tie_word_embeddings=False``), whose 50257-row ``G`` is
  kept diagonal by ``max_factor_dim``. Each in its own process: peak resident memory
  (``ru_maxrss``) and the interleaved step ratio; a plain-only process gives the
  baseline peak.
* Distributed refresh (``--worlds``): one K-FAC refresh (``source="batch"`` estimate on a
  64-sample batch split over the ranks, all-reduce, eigendecompositions spread over the
  ranks, ``kfac_damping="exact"``) of the encoder with 1, 2 and 4 gloo processes (1
  torch thread each): median wall time, and per rank the time spent in ``eigh`` (which
  the spreading divides by the world size).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from benchmarks.workloads import design_cnn, design_mlp, load_note, machine_line, publish
from natgrad import FisherPreconditioner
from natgrad.curvature.kfac import kfac_coverage


class Block(nn.Module):
    """Post-LN transformer encoder block with explicit Linear projections."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        n, t, d = x.shape

        def split(z):
            return z.reshape(n, t, self.h, d // self.h).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(n, t, d)))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class Encoder(nn.Module):
    """BERT-style encoder: token + position embeddings, ``layers`` blocks, mean-pooled head."""

    def __init__(self, vocab=1000, d=384, heads=6, layers=6, classes=10, T=128):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.blocks(self.emb(ids) + self.pos[: ids.shape[1]]).mean(1))


def workloads(N_enc: int, T: int):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "MLP 40-512-512-10, N=256": (design_mlp(), torch.randn(256, 40, generator=g),
                                     torch.randint(0, 10, (256,), generator=g)),
        "CNN 2 conv + linear, N=128": (design_cnn(), torch.randn(128, 1, 16, 16, generator=g),
                                       torch.randint(0, 10, (128,), generator=g)),
        f"BERT-style encoder 6x384, N={N_enc}, T={T}": (
            Encoder(T=T), torch.randint(0, 1000, (N_enc, T), generator=g),
            torch.randint(0, 10, (N_enc,), generator=g)),
    }


def covered(model):
    params = dict(model.named_parameters())
    layers, _ = kfac_coverage(model, params)
    return [n for lay in layers.values() for n in (lay.weight, lay.bias) if n]


# -- ASDL (benchmark-only oracle) ----------------------------------------------------------
class _NoRange(contextlib.ContextDecorator):
    """Stand-in for ``torch.cuda.nvtx.range``, which ASDL calls unconditionally and which
    raises on a CPU build of torch."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _asdl():
    """``(FISHER_EMP, PreconditioningConfig, KfacGradientMaker)`` or None (with the reason)."""
    try:
        torch.cuda.nvtx.range = _NoRange  # before ASDL's decorators are applied
        from asdl import FISHER_EMP
        from asdl.precondition import KfacGradientMaker, PreconditioningConfig
    except Exception as exc:  # noqa: BLE001  # any import failure: report it, run without
        return None, f"{type(exc).__name__}: {exc}"
    return (FISHER_EMP, PreconditioningConfig, KfacGradientMaker), ""


# -- single-process steps -----------------------------------------------------------------
class Stepper:
    """One method's model copy, optimizer and (for K-FAC) preconditioner; ``step()`` runs
    one training step and returns ``(total seconds, seconds inside the preconditioner)``."""

    def __init__(self, model, x, y, method, asdl=None):
        self.model = copy.deepcopy(model)
        self.x, self.y, self.method = x, y, method
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.pre = self.gm = None
        if method in ("batch", "backward", "reduce"):
            self.pre = FisherPreconditioner(
                self.model, kind="kfac", damping=1e-2, update_every=1,
                params=covered(self.model), source="batch" if method == "batch" else "backward",
                kfac_approx="reduce" if method == "reduce" else "expand")
        elif method == "asdl":
            emp, Config, Maker = asdl
            cfg = Config(data_size=x.shape[0], damping=1e-2, preconditioner_upd_interval=1,
                         curvature_upd_interval=1, ema_decay=0.05,
                         ignore_modules=[nn.LayerNorm])
            self.gm = Maker(self.model, cfg, fisher_type=emp)

    def step(self):
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        inside = 0.0
        if self.gm is not None:
            dummy = self.gm.setup_model_call(self.model, self.x)
            self.gm.setup_loss_call(F.cross_entropy, dummy, self.y)
            self.gm.forward_and_backward()
        else:
            F.cross_entropy(self.model(self.x), self.y).backward()
            if self.pre is not None:
                t1 = time.perf_counter()
                self.pre.step((self.x, self.y) if self.method == "batch" else None)
                inside = time.perf_counter() - t1
        self.opt.step()
        return time.perf_counter() - t0, inside


def interleaved(steppers, repeats):
    """Warm each up once, then ``repeats`` rounds of one step each in turn; medians."""
    for s in steppers.values():
        s.step()
    times = {k: [] for k in steppers}
    inside = {k: [] for k in steppers}
    for _ in range(repeats):
        for k, s in steppers.items():
            t, i = s.step()
            times[k].append(t)
            inside[k].append(i)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: statistics.median(v) for k, v in inside.items()})


def single_process(args, lines):
    asdl, why = _asdl() if not args.no_asdl else (None, "--no-asdl")
    methods = ["plain", "batch", "backward", "reduce"] + (["asdl"] if asdl else [])
    head = ("| workload | plain step | K-FAC `source=\"batch\"` | ratio | "
            "K-FAC `source=\"backward\"` | ratio | of which `pre.step` | "
            "`\"backward\"`, `kfac_approx=\"reduce\"` | ratio |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if asdl:
        head += " ASDL K-FAC (emp.) | ratio |"
        sep += "---|---|"
    lines += [head, sep]
    for name, (model, x, y) in workloads(args.N, args.T).items():
        steppers = {m: Stepper(model, x, y, m, asdl) for m in methods}
        med, inside = interleaved(steppers, args.repeats)
        p = med["plain"]
        row = (f"| {name} | {p * 1e3:.0f} ms | {med['batch'] * 1e3:.0f} ms | "
               f"{med['batch'] / p:.2f}x | {med['backward'] * 1e3:.0f} ms | "
               f"{med['backward'] / p:.2f}x | {inside['backward'] * 1e3:.0f} ms | "
               f"{med['reduce'] * 1e3:.0f} ms | {med['reduce'] / p:.2f}x |")
        if asdl:
            row += f" {med['asdl'] * 1e3:.0f} ms | {med['asdl'] / p:.2f}x |"
        print(row, flush=True)
        lines.append(row)
    if not asdl:
        lines += ["", f"ASDL not run: {why}."]
    return lines


# -- GPT-2 small ---------------------------------------------------------------------------
def _gpt2_child(variant, repeats, N, T):
    """Run in a fresh process: print ``peak_MiB ratio plain_ms kfac_ms covered_params``."""
    import transformers

    torch.manual_seed(0)
    tied = variant != "untied"
    cfg = transformers.GPT2Config(tie_word_embeddings=tied)
    model = transformers.GPT2LMHeadModel(cfg).train()
    for m in model.modules():  # dropout off: a deterministic step
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ids = torch.randint(0, cfg.vocab_size, (N, T), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    pre = None
    # wpe is called with position ids (1, T) shared by the batch, so its per-sample
    # statistics cannot be read off the backward (source="backward" refuses it by name)
    names = [k for k in covered(model) if not k.startswith("transformer.wpe.")]
    if variant != "plain":
        pre = FisherPreconditioner(model, kind="kfac", damping=1e-2, params=names,
                                   source="backward", max_factor_dim=4096)

    def step(precondition):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(ids).logits[:, :-1]
        # the per-sample loss is the sum over a sequence's tokens; the batch mean of it
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum") / N
        loss.backward()
        if precondition and pre is not None:
            pre.step()
        elif pre is not None:
            pre._capture.clear()  # a plain step in the same process records nothing
        opt.step()
        return time.perf_counter() - t0

    plain, kfac = [], []
    step(True)
    step(False)
    for _ in range(repeats):
        if pre is not None:
            pre._capture.armed = False
        plain.append(step(False))
        if pre is not None:
            pre._capture.armed = True
            kfac.append(step(True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mp_, mk = statistics.median(plain), statistics.median(kfac) if kfac else float("nan")
    n_cov = sum(p.numel() for k, p in model.named_parameters() if k in names)
    print(f"RESULT {peak:.0f} {mk / mp_:.3f} {mp_ * 1e3:.0f} {mk * 1e3:.0f} {n_cov}", flush=True)


def gpt2(args, lines):
    lines += [
        "",
        f"GPT-2 small (`GPT2LMHeadModel(GPT2Config())`, N={args.gpt2_N}, T={args.gpt2_T}, "
        "summed token loss / N), K-FAC `source=\"backward\"`, `update_every=1`, "
        "`max_factor_dim=4096`; plain and K-FAC steps interleaved in one process "
        f"({args.repeats} each, medians); peak = the process's maximum resident memory:",
        "",
        "| model | covered parameters | peak memory | plain step | K-FAC step | ratio |",
        "|---|---|---|---|---|---|",
    ]
    rows = {}
    for variant in ("plain", "tied", "untied"):
        cmd = [sys.executable, "-m", "benchmarks.bench_kfac_refresh", "--gpt2-child", variant,
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--gpt2-N", str(args.gpt2_N),
               "--gpt2-T", str(args.gpt2_T)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=_root())
        res = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
        if not res:
            print(out.stdout[-2000:], out.stderr[-4000:], flush=True)
            rows[variant] = None
            continue
        rows[variant] = res[-1].split()[1:]
        print(variant, rows[variant], flush=True)
    base = rows.get("plain")
    if base:
        lines.append(f"| plain training only (baseline) | - | {float(base[0]) / 1024:.2f} GiB "
                     f"| {base[2]} ms | - | - |")
    labels = {"tied": "124M, tied LM head (the shared wte/LM-head weight left out)",
              "untied": "163M, untied LM head (its 50257-row `G` diagonal)"}
    for variant in ("tied", "untied"):
        r = rows.get(variant)
        if r is None:
            lines.append(f"| {labels[variant]} | failed (see the log) | | | | |")
            continue
        peak, ratio, pm, km, ncov = r
        lines.append(f"| {labels[variant]} | {int(ncov) / 1e6:.1f}M | "
                     f"{float(peak) / 1024:.2f} GiB | {pm} ms | {km} ms | {float(ratio):.2f}x |")
    return lines


def _root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- distributed refresh -------------------------------------------------------------------
def _dist_worker(rank, world, init_file, out_dir, T, repeats):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = Encoder(T=T)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, 1000, (64 // world, T), generator=g)
        y = torch.randint(0, 10, (x.shape[0],), generator=g)
        pre = FisherPreconditioner(model, kind="kfac", kfac_damping="exact",
                                   params=covered(model))
        eigh = torch.linalg.eigh
        spent = [0.0, 0]

        def timed_eigh(M, *a, **k):
            t = time.perf_counter()
            r = eigh(M, *a, **k)
            spent[0] += time.perf_counter() - t
            spent[1] += 1
            return r

        torch.linalg.eigh = timed_eigh
        walls, eighs, counts = [], [], []
        for i in range(repeats + 1):
            spent[0], spent[1] = 0.0, 0
            dist.barrier()
            t0 = time.perf_counter()
            pre._update_curvature((x, y))
            dist.barrier()
            if i:
                walls.append(time.perf_counter() - t0)
                eighs.append(spent[0])
                counts.append(spent[1])
        torch.linalg.eigh = eigh
        torch.save((statistics.median(walls), statistics.median(eighs), counts[-1]),
                   os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def dist_refresh(world, T, repeats):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_dist_worker, args=(world, os.path.join(d, "init"), d, T, repeats),
                           nprocs=world, join=True, start_method="fork")
        return [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(world)]


def distributed(args, lines):
    lines += [
        "",
        f"Distributed refresh (encoder 6x384, T={args.dist_T}, 64 samples split over the "
        "ranks, `source=\"batch\"`, `kfac_damping=\"exact\"`: estimate + all-reduce + "
        "eigendecompositions spread over the ranks, layer i on rank i mod world), gloo, 1 "
        f"torch thread per process, median of {args.repeats} refreshes after one warm-up:",
        "",
        "| processes | refresh wall time (rank 0) | `eigh` time per rank | `eigh` calls per rank |",
        "|---|---|---|---|",
    ]
    for world in [int(w) for w in args.worlds.split(",") if w]:
        res = dist_refresh(world, args.dist_T, args.repeats)
        row = (f"| {world} | {res[0][0] * 1e3:.0f} ms | "
               + ", ".join(f"{r[1] * 1e3:.0f} ms" for r in res) + " | "
               + ", ".join(str(r[2]) for r in res) + " |")
        print(row, flush=True)
        lines.append(row)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=32, help="encoder batch size")
    ap.add_argument("--T", type=int, default=128, help="encoder sequence length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dist-T", type=int, default=32, help="sequence length of the dist run")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--gpt2", action="store_true", help="add the GPT-2 small rows")
    ap.add_argument("--gpt2-N", type=int, default=4)
    ap.add_argument("--gpt2-T", type=int, default=128)
    ap.add_argument("--gpt2-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-single", action="store_true", help="skip the single-process table")
    ap.add_argument("--no-asdl", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared machine, multi-threaded ops stall "
                         "at their barriers under load, which hits many small ops hardest)")
    ap.add_argument("--quick", action="store_true", help="do not write the results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpt2_child:
        _gpt2_child(args.gpt2_child, args.repeats, args.gpt2_N, args.gpt2_T)
        return
    cmd = " ".join(sys.argv[1:])
    lines = [
        "## K-FAC refresh cost (`FisherPreconditioner(kind=\"kfac\", update_every=1)`)",
        "",
        f"{machine_line()}. {load_note()}.",
        f"Command: `python -m benchmarks.bench_kfac_refresh {cmd}`; one run; methods "
        f"interleaved step by step ({args.repeats} rounds after one warm-up step each), "
        "medians.",
        "",
    ]
    if not args.no_single:
        single_process(args, lines)
    if args.gpt2:
        gpt2(args, lines)
    if args.worlds:
        distributed(args, lines)
    lines += ["", f"{load_note('at the end')}."]
    publish("kfac_refresh", "\n".join(lines), args.quick)


if __name__ == "__main__":
    main()
