"""K-FAC refresh cost of ``FisherPreconditioner`` as a ratio to a plain training step.

Never run in CI. ``python -m benchmarks.bench_kfac_refresh [--T 128 --N 32 --repeats 3]``
writes ``benchmarks/results/kfac_refresh.md`` (unless ``--quick``).

* Per workload (MLP 40-512-512-10 N=256; CNN 2 conv + linear N=128; a BERT-style encoder,
  6 layers, d=384, 6 heads, FF 1536, N=32, T=128, explicit nn.Linear projections): the
  median wall time of one training step (zero_grad, forward, mean cross-entropy, backward,
  SGD step) plain, and with ``FisherPreconditioner(kind="kfac", update_every=1)`` with
  ``source="batch"`` (an extra forward/backward on the batch) and ``source="backward"``
  (statistics recorded from the step's own forward/backward). Ratio = K-FAC step / plain.
  The preconditioned parameters are the K-FAC-covered layers (Linear, Conv, Embedding)
  in both sources, so the two do the same solve.
* Distributed refresh: the median wall time of one refresh (estimate on a 64-sample shard,
  all-reduce, eigendecompositions spread over the ranks; ``kfac_damping="exact"``) of the
  encoder's K-FAC with 1, 2 and 4 gloo processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from benchmarks.workloads import design_cnn, design_mlp, load_note, machine_line, write_fragment
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


def time_steps(model, x, y, source, repeats):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    pre = None
    if source is not None:
        pre = FisherPreconditioner(model, kind="kfac", damping=1e-2, update_every=1,
                                   params=covered(model), source=source)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if pre is not None:
            pre.step((x, y) if source == "batch" else None)
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    if pre is not None:
        pre.close()
    return statistics.median(times)


def _dist_worker(rank, world, init_file, out, T, repeats):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = Encoder(T=T)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, 1000, (64 // world if world > 1 else 64, T), generator=g)
        y = torch.randint(0, 10, (x.shape[0],), generator=g)
        pre = FisherPreconditioner(model, kind="kfac", kfac_damping="exact",
                                   params=covered(model))
        times = []
        for i in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            pre._update_curvature((x, y))
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t0)
        if rank == 0:
            torch.save(statistics.median(times), out)
    finally:
        dist.destroy_process_group()


def dist_refresh(world, T, repeats):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "t.pt")
        mp.spawn(_dist_worker, args=(world, os.path.join(d, "init"), out, T, repeats),
                 nprocs=world, join=True)
        return torch.load(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=32, help="encoder batch size")
    ap.add_argument("--T", type=int, default=128, help="encoder sequence length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dist-T", type=int, default=32, help="sequence length of the dist run")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--quick", action="store_true", help="do not write the results file")
    args = ap.parse_args()
    note = load_note()
    lines = [
        "## K-FAC refresh cost (`FisherPreconditioner(kind=\"kfac\", update_every=1)`)",
        "",
        f"{machine_line()}. {note}.",
        f"Command: `python -m benchmarks.bench_kfac_refresh --N {args.N} --T {args.T} "
        f"--repeats {args.repeats} --dist-T {args.dist_T} --worlds {args.worlds}`; "
        "median of the repeats after one warm-up step; one run.",
        "",
        "| workload | plain step | K-FAC `source=\"batch\"` | ratio | K-FAC `source=\"backward\"` | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, (model, x, y) in workloads(args.N, args.T).items():
        plain = time_steps(model, x, y, None, args.repeats)
        batch = time_steps(model, x, y, "batch", args.repeats)
        back = time_steps(model, x, y, "backward", args.repeats)
        row = (f"| {name} | {plain * 1e3:.0f} ms | {batch * 1e3:.0f} ms | {batch / plain:.2f}x | "
               f"{back * 1e3:.0f} ms | {back / plain:.2f}x |")
        print(row, flush=True)
        lines.append(row)
    lines += [
        "",
        f"Distributed refresh (encoder 6x384, T={args.dist_T}, 64 samples split over the "
        "ranks, `source=\"batch\"`, `kfac_damping=\"exact\"`: estimate + all-reduce + "
        "eigendecompositions spread over ranks), gloo, 1 torch thread per process:",
        "",
        "| processes | refresh time |",
        "|---|---|",
    ]
    for world in [int(w) for w in args.worlds.split(",") if w]:
        t = dist_refresh(world, args.dist_T, args.repeats)
        row = f"| {world} | {t * 1e3:.0f} ms |"
        print(row, flush=True)
        lines.append(row)
    lines += ["", f"Load at the end: {load_note()}."]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        print("wrote", write_fragment("kfac_refresh", text))


if __name__ == "__main__":
    main()
