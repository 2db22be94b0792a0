"""The Fisher speed and memory ratios on a GPU: CUDA-event timings, peak memory, bf16.

One self-contained script (never run in CI). For each workload it times, with CUDA events
(``time.perf_counter`` on CPU), a plain forward + backward of the mean loss on a batch (the
baseline) and each natgrad operation on the same batch, interleaved (baseline, method,
baseline, method, ...) and reported as the ratio of medians. Every workload runs in fp32
and under ``torch.autocast(dtype=torch.bfloat16)`` (baseline and method alike).
Peak memory: ``torch.cuda.max_memory_allocated`` over one call, minus the memory held
before it (model, batch), reported as ``(peak_method - peak_fwd+bwd) / P`` in units of the
parameter bytes ``P`` (the memory target: within a forward+backward plus ``3P`` plus one
chunk).

Workloads and operations:

* BERT-style encoder (``transformers.BertConfig``: 6 layers, d=384, 12 heads, FF 1536,
  vocab 30522: MiniLM size), N=32, T=128, a 2-D attention mask with padded rows,
  ``attn_implementation`` eager and sdpa: ``estimate_fisher`` empirical and mc.
* GPT-2 small (``transformers.GPT2Config()``: 124M, tied LM head), N=4, T=128,
  ``TokenCategorical(shift=True)``: ``estimate_fisher`` empirical and mc.
* ResNet-18-style CNN (BasicBlocks [2, 2, 2, 2], widths 64-512, 10 classes) on 32x32
  inputs, BatchNorm in eval mode, N=128: ``estimate_fisher`` empirical and mc.
* MLP 40-512-512-10 (N=256) and CNN 2 conv + linear (N=128): ``estimate_fisher``
  empirical, mc and exact; ``per_sample_grads``; the all-weights diagonal Laplace
  predictive ``fisher_uncertainty`` of the batch.
* K-FAC refresh: one training step with ``FisherPreconditioner(kind="kfac",
  update_every=1)``, ``source="batch"`` and ``source="backward"``, over a plain training
  step, on the encoder (eager) and the MLP.

Run:  python -m benchmarks.gpu                     (CUDA; about 3-5 minutes on one GPU;
                                                     writes benchmarks/results/gpu.md)
      python -m benchmarks.gpu --device cpu --quick (a smoke run on tiny models; prints only)

Exits with status 2 and a message when ``--device cuda`` (the default) has no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(HERE))

import natgrad  # noqa: E402
from natgrad import (  # noqa: E402
    FisherPreconditioner,
    TokenCategorical,
    estimate_fisher,
    fisher_uncertainty,
    per_sample_grads,
)

# -- models ------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (CIFAR stem: one 3x3 conv, no max-pool)."""

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]),
                                  nn.ReLU())
        layers: list[nn.Module] = []
        cin = w[0]
        for i, cout in enumerate(w):
            for j in range(2):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def small_cnn(side: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * (side // 2) ** 2, 10))


def padded_mask(n: int, t: int, g: torch.Generator) -> torch.Tensor:
    """A 2-D attention mask: every other row padded to a random length >= t/2."""
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(1, n, 2):
        mask[i, int(torch.randint(t // 2, t, (1,), generator=g)):] = 0
    return mask


@dataclass
class Workload:
    name: str
    model: nn.Module
    batch: Any  # what natgrad takes
    loss: Callable[[nn.Module, Any], torch.Tensor]  # the baseline's mean loss
    likelihood: Any = "categorical"
    ops: tuple[str, ...] = ("empirical", "mc")


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _hf_ce(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits, batch["labels"])


def _lm_ce(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def workloads(device: str, quick: bool) -> list[Workload]:
    """The issue-14 workloads (tiny versions with ``quick``), on ``device``."""
    import transformers

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out: list[Workload] = []
    if quick:
        bert_kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
        n_b, t_b = 4, 16
        gpt_kw = dict(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
        n_g, t_g = 2, 16
        res_w, n_r, side = 8, 4, 16
        mlp_w, n_m, n_c = 64, 32, 16
    else:
        bert_kw = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                       num_attention_heads=12, intermediate_size=1536,
                       max_position_embeddings=512)
        n_b, t_b = 32, 128
        gpt_kw = {}
        n_g, t_g = 4, 128
        res_w, n_r, side = 64, 128, 16
        mlp_w, n_m, n_c = 512, 256, 128
    for attn in ("eager", "sdpa"):
        cfg = transformers.BertConfig(**bert_kw, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, num_labels=2,
                                      attn_implementation=attn)
        model = transformers.BertForSequenceClassification(cfg).eval()
        batch = {"input_ids": torch.randint(1, cfg.vocab_size, (n_b, t_b), generator=g),
                 "attention_mask": padded_mask(n_b, t_b, g),
                 "labels": torch.randint(0, 2, (n_b,), generator=g)}
        out.append(Workload(f"BERT {cfg.num_hidden_layers}x{cfg.hidden_size} {attn}, "
                            f"N={n_b}, T={t_b}", model, batch, _hf_ce))
    cfg = transformers.GPT2Config(**gpt_kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (n_g, t_g), generator=g)
    out.append(Workload(f"GPT-2 {cfg.n_layer}x{cfg.n_embd}, N={n_g}, T={t_g}", model,
                        {"input_ids": ids, "attention_mask": padded_mask(n_g, t_g, g),
                         "labels": ids}, _lm_ce, TokenCategorical(shift=True)))
    out.append(Workload(f"ResNet-18 width {res_w}, 32x32, N={n_r}", ResNet18(res_w).eval(),
                        (torch.randn(n_r, 3, 32, 32, generator=g),
                         torch.randint(0, 10, (n_r,), generator=g)), _ce))
    extra = ("empirical", "mc", "exact", "per_sample_grads", "laplace")
    out.append(Workload(f"MLP 40-{mlp_w}-{mlp_w}-10, N={n_m}", mlp(mlp_w),
                        (torch.randn(n_m, 40, generator=g),
                         torch.randint(0, 10, (n_m,), generator=g)), _ce, ops=extra))
    out.append(Workload(f"CNN 2 conv + linear {side}x{side}, N={n_c}", small_cnn(side),
                        (torch.randn(n_c, 1, side, side, generator=g),
                         torch.randint(0, 10, (n_c,), generator=g)), _ce, ops=extra))
    for w in out:
        w.model.to(device)
        w.batch = _to(w.batch, device)
    return out


def _to(batch: Any, device: str) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return tuple(v.to(device) for v in batch)


# -- timing ---------------------------------------------------------------------------------


class Clock:
    """Times a call with CUDA events on CUDA, ``perf_counter`` elsewhere; peak memory."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float | None]:
        """(milliseconds, peak bytes above the memory held before the call or None)."""
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), float(torch.cuda.max_memory_allocated() - base)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, None


def interleaved(clock: Clock, base: Callable[[], Any], method: Callable[[], Any],
                rounds: int) -> dict[str, float | None]:
    """Warm both up, then ``rounds`` of (base, method); medians and their ratio."""
    base()
    method()
    tb, tm, mb, mm = [], [], [], []
    for _ in range(rounds):
        t, m = clock(base)
        tb.append(t)
        mb.append(m)
        t, m = clock(method)
        tm.append(t)
        mm.append(m)
    out: dict[str, float | None] = {
        "base_ms": statistics.median(tb), "ms": statistics.median(tm),
        "ratio": statistics.median(tm) / statistics.median(tb),
        "base_peak": None, "peak": None,
    }
    if mb[0] is not None:
        out["base_peak"] = max(m for m in mb if m is not None)
        out["peak"] = max(m for m in mm if m is not None)
    return out


def fwd_bwd(w: Workload) -> Callable[[], None]:
    def fn() -> None:
        w.model.zero_grad(set_to_none=True)
        w.loss(w.model, w.batch).backward()

    return fn


def operation(w: Workload, op: str) -> Callable[[], Any]:
    if op in ("empirical", "mc", "exact"):  # mc: natgrad's default generator, seeded with 0
        return lambda: estimate_fisher(w.model, w.batch, w.likelihood, labels=op)
    if op == "per_sample_grads":
        return lambda: per_sample_grads(w.model, w.batch, w.likelihood)
    if op == "laplace":
        fisher = estimate_fisher(w.model, w.batch, w.likelihood)
        return lambda: fisher_uncertainty(w.model, w.batch[0], fisher, n_data=1000)
    raise ValueError(op)


def train_step(model: nn.Module, loss: Callable[[], torch.Tensor],
               pre: FisherPreconditioner | None, batch: Any) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def fn() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        if pre is not None:
            pre.step(batch if pre.source == "batch" else None)
        opt.step()

    return fn


def covered(model: nn.Module) -> list[str]:
    """The parameters of K-FAC-covered Linear / Conv / Conv1D layers. Embeddings are left
    out: BERT calls its position embedding on ``(1, T)`` ids, which ``source="backward"``
    refuses (its batch dimension is not the batch)."""
    from natgrad.curvature.kfac import kfac_coverage

    layers, _ = kfac_coverage(model, dict(model.named_parameters()))
    return [n for lay in layers.values() if lay.kind != "embedding"
            for n in (lay.weight, lay.bias) if n]


# -- report ---------------------------------------------------------------------------------

TARGETS = {"empirical": "1.5x (1.3x MLP/CNN)", "mc": "1.5x (1.3x MLP/CNN)",
           "exact": "C/2 = 5x", "per_sample_grads": "-", "laplace": "10x"}


def _fmt_mem(r: dict[str, float | None], n_params: int) -> str:
    if r["peak"] is None or r["base_peak"] is None:
        return "—"
    p = 4 * n_params
    return f"{r['peak'] / 2**20:.0f} MiB ({(r['peak'] - r['base_peak']) / p:+.1f} P)"


def measure(args: argparse.Namespace) -> str:
    device = args.device
    clock = Clock(device)
    rounds = 2 if args.quick else args.rounds
    precisions = ("fp32", "bf16")
    rows: list[str] = []
    t_start = time.time()
    for w in workloads(device, args.quick):
        n_params = sum(p.numel() for p in w.model.parameters())
        base = fwd_bwd(w)
        for prec in precisions:
            ctx = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                   if prec == "bf16" else contextlib.nullcontext())
            for op in w.ops:
                try:
                    with ctx:
                        method = operation(w, op)
                        r = interleaved(clock, base, method, rounds)
                    cell = (f"| {w.name} | {prec} | {op} | {r['base_ms']:.1f} | {r['ms']:.1f} | "
                            f"**{r['ratio']:.2f}x** | {TARGETS[op]} | "
                            f"{_fmt_mem(r, n_params)} |")
                except Exception as exc:  # a failure is a result: record it, go on
                    if args.verbose:
                        traceback.print_exc()
                    cell = (f"| {w.name} | {prec} | {op} | | | failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120]} | {TARGETS[op]} | |")
                print(cell, flush=True)
                rows.append(cell)
        w.model.zero_grad(set_to_none=True)
    kfac_rows = []
    for w in workloads(device, args.quick):
        if not (w.name.startswith("BERT") and "eager" in w.name or w.name.startswith("MLP")):
            continue
        loss = (lambda w=w: w.loss(w.model, w.batch))
        plain = train_step(w.model, loss, None, w.batch)
        for source in ("batch", "backward"):
            try:
                pre = FisherPreconditioner(w.model, kind="kfac", damping=1e-2, update_every=1,
                                           params=covered(w.model), source=source)
                r = interleaved(clock, plain, train_step(w.model, loss, pre, w.batch), rounds)
                pre.close()
                cell = (f"| {w.name} | {source} | {r['base_ms']:.1f} | {r['ms']:.1f} | "
                        f"**{r['ratio']:.2f}x** |")
            except Exception as exc:
                if args.verbose:
                    traceback.print_exc()
                cell = (f"| {w.name} | {source} | | | failed: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]} |")
            print(cell, flush=True)
            kfac_rows.append(cell)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor()
    load = os.getloadavg()[0]
    lines = [
        "## GPU",
        "",
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, natgrad {natgrad.__version__}, "
        f"device {device} ({gpu}), CUDA {torch.version.cuda}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPU cores, 1-minute load average "
        f"{load:.1f}, total {time.time() - t_start:.0f} s.",
        "",
        f"Command: `python -m benchmarks.gpu{' --quick' if args.quick else ''}"
        f"{'' if device == 'cuda' else ' --device ' + device}`. Times: "
        f"{'CUDA events' if device.startswith('cuda') else 'time.perf_counter'}, median "
        f"of {rounds} interleaved rounds (baseline, method, ...) after one warm-up each; "
        "ratio = method / a plain forward + backward of the mean loss on the same batch. "
        "bf16: baseline and method both under `torch.autocast(dtype=torch.bfloat16)`. "
        "Peak: `torch.cuda.max_memory_allocated` over the call above the memory held "
        "before it, and in brackets its excess over the forward + backward's peak in units "
        "of the fp32 parameter bytes P (target: within +3P plus one chunk).",
        "",
        "| workload | precision | operation | fwd+bwd ms | method ms | ratio | target | peak |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "K-FAC refresh: a training step with `FisherPreconditioner(kind=\"kfac\", "
        "update_every=1)` (the curvature refreshed every step) over a plain SGD step; "
        "the preconditioned parameters are those of the Linear layers.",
        "",
        "| workload | source | plain step ms | K-FAC step ms | ratio |",
        "|---|---|---|---|---|",
        *kfac_rows,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, 2 rounds; prints only (a smoke run)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per ratio")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA device is available (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda}). Run it on a machine "
            "with a GPU and a CUDA build of torch, or smoke-test it here with "
            "`python -m benchmarks.gpu --device cpu --quick`. Nothing was written.",
            file=sys.stderr,
        )
        return 2
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    text = measure(args)
    print(text)
    if args.device.startswith("cuda") and not args.quick:
        path = os.path.join(HERE, "results", "gpu.md")
        with open(path, "w") as fh:
            fh.write(text.rstrip() + "\n")
        print("wrote", path, "; now run python benchmarks/collect_results.py")
    else:
        print("(CPU or --quick run: benchmarks/results/gpu.md left as it is)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
