"""Per-call cost of ``KroneckerFisher`` products on small layers, and of the preconditioner's
factor EMA on encoder-sized factors: this checkout against a baseline checkout.

1. ``mv`` / ``solve`` / ``quad`` of a K-FAC and an EKFAC curvature of one ``nn.Linear(40,
   100)`` (the 100x41 block of the MNIST-1D MLP's first layer), and ``mv`` of the whole
   MNIST-1D MLP 40-100-100-10: the per-call time, as the process's CPU time (robust to
   being descheduled on a loaded machine) and wall-clock, best of 7 repeats of 200 calls.
   The floor is the two matrix products ``G @ V @ A`` themselves.
2. The refresh EMA ``C ← d·C + (1 - d)·C_batch`` that ``FisherPreconditioner`` runs at
   every refresh, on K-FAC factors of the BERT-style encoder of the refresh benchmark
   (6 blocks of q, k, v, o: A 385², G 384²; FFN in: A 385², G 1536²; FFN out: A 1537²,
   G 384²; 36 layers, 37M factor floats, 149 MB in float32): the baseline's ``C = C.ema(new,
   d)`` (new tensors) against this checkout's ``C = C.ema_(new, d)`` (``lerp_`` in place,
   what the preconditioner now does for a curvature only it holds). Median of 5.

Each measurement runs in a fresh process (``--worker``) with the checkout's ``natgrad``
first on ``sys.path``; baseline and current processes alternate (B, C, B, C, ...) for
``--rounds`` rounds and the medians over rounds are compared, so load hits both alike.

Run: ``python -m benchmarks.bench_curvature_overhead --baseline DIR`` where ``DIR`` holds
the baseline's source tree (e.g. ``git archive <commit> | tar -x -C DIR``); ``--quick``:
2 rounds, no fragment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _per_call(fn, number: int = 200, repeat: int = 7) -> tuple[float, float]:
    """Best (CPU µs, wall µs) per call."""
    cpu = min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time))
    wall = min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.perf_counter))
    return cpu / number * 1e6, wall / number * 1e6


def _encoder_curvature(torch, KroneckerFisher, KroneckerBlock, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384),
              "ffn_in": (1536, 384), "ffn_out": (384, 1536)}
    blocks = {}
    for i in range(6):
        for name, (dout, din) in shapes.items():
            k = f"{i}.{name}"
            blocks[k] = KroneckerBlock(
                f"{k}.weight", f"{k}.bias", (dout, din), False, 1,
                torch.rand(1, din + 1, din + 1, generator=gen),
                torch.rand(1, dout, dout, generator=gen),
            )
    return KroneckerFisher(blocks, {}, 32, kind="kfac")


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from natgrad import estimate_curvature
    from natgrad.curvature.kronecker import KroneckerBlock, KroneckerFisher

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    out: dict[str, list[float]] = {}
    torch.manual_seed(0)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    lin = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 10))
    mlp = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                        nn.Linear(100, 10))
    for kind in ("kfac", "ekfac"):
        F = estimate_curvature(lin, (x, y), kind=kind, params=["0.weight", "0.bias"])
        v = {k: torch.randn_like(p) for k, p in lin[0].named_parameters(prefix="0")}
        blk = F.blocks["0"]
        A, G, V = blk.A[0], blk.G[0], torch.randn(100, 41)
        F.solve(v, 1e-3)
        out[f"{kind} floor G@V@A"] = list(_per_call(lambda A=A, G=G, V=V: G @ V @ A))
        out[f"{kind} mv"] = list(_per_call(lambda F=F, v=v: F.mv(v)))
        out[f"{kind} solve"] = list(_per_call(lambda F=F, v=v: F.solve(v, 1e-3)))
        out[f"{kind} quad"] = list(_per_call(lambda F=F, v=v: F.quad(v)))
        if kind == "kfac":
            F.damping_mode = "factored"
            F.solve(v, 1e-3)
            out["kfac solve (factored)"] = list(_per_call(lambda F=F, v=v: F.solve(v, 1e-3)))
        Fm = estimate_curvature(mlp, (x, y), kind=kind)
        vm = {k: torch.randn_like(p) for k, p in mlp.named_parameters()}
        out[f"{kind} mv, MLP 40-100-100-10"] = list(_per_call(lambda F=Fm, v=vm: F.mv(v)))
    if not args.no_ema:
        C = _encoder_curvature(torch, KroneckerFisher, KroneckerBlock, 0)
        new = _encoder_curvature(torch, KroneckerFisher, KroneckerBlock, 1)
        inplace = hasattr(KroneckerFisher, "ema_")
        cpu, wall = [], []
        for _ in range(5):
            c0, w0 = time.process_time(), time.perf_counter()
            C = C.ema_(new, 0.95) if inplace else C.ema(new, 0.95)
            cpu.append((time.process_time() - c0) * 1e6)
            wall.append((time.perf_counter() - w0) * 1e6)
        out["factor EMA, encoder (36 layers)"] = [statistics.median(cpu),
                                                  statistics.median(wall)]
    print("RESULT " + json.dumps(out))


def run_worker(tree: str, args: argparse.Namespace) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, os.path.join(HERE, "bench_curvature_overhead.py"), "--worker",
           "--threads", str(args.threads)] + (["--no-ema"] if args.no_ema else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree, check=False)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"worker in {tree} failed:\n{res.stdout}\n{res.stderr}")
    return dict(json.loads(line[-1][len("RESULT "):]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--baseline", help="source tree of the baseline natgrad")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ema", action="store_true", help="skip the factor EMA part")
    ap.add_argument("--quick", action="store_true", help="2 rounds, no fragment")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if not args.baseline:
        ap.error("--baseline DIR is needed (a source tree of the baseline natgrad)")
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.workloads import load_note, machine_line, publish

    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    start_load = load_note()
    runs: dict[str, list[dict[str, list[float]]]] = {"baseline": [], "current": []}
    for r in range(rounds):
        for which, tree in (("baseline", args.baseline), ("current", ROOT)):
            runs[which].append(run_worker(tree, args))
            print(f"round {r + 1}/{rounds} {which} done", flush=True)
    keys = list(runs["current"][0])

    def med(which: str, key: str, i: int) -> float:
        return statistics.median(run[key][i] for run in runs[which] if key in run)

    cmd = "python -m benchmarks.bench_curvature_overhead " + " ".join(argv or sys.argv[1:])
    lines = [
        "## KroneckerFisher per-call overhead on small layers; factor EMA in place",
        "",
        f"{machine_line()}; each measuring process uses {args.threads} torch thread(s). "
        f"{start_load}; {load_note('at the end')}.",
        f"Command: `{cmd}` (baseline: the source tree of the commit before these changes, "
        "`git archive`-ed). Baseline and current processes alternate; "
        f"{rounds} rounds, medians over rounds of each process's best-of-7 per-call time "
        "(EMA: median of 5). CPU = the process's CPU time, wall = wall-clock.",
        "",
        "| operation | baseline CPU | current CPU | ratio | baseline wall | current wall | ratio |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(us: float) -> str:
        return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us:.0f} µs"

    for k in keys:
        b_cpu, c_cpu = med("baseline", k, 0), med("current", k, 0)
        b_wall, c_wall = med("baseline", k, 1), med("current", k, 1)
        lines.append(f"| {k} | {fmt(b_cpu)} | {fmt(c_cpu)} | {b_cpu / c_cpu:.2f}x | "
                     f"{fmt(b_wall)} | {fmt(c_wall)} | {b_wall / c_wall:.2f}x |")
    publish("curvature_overhead", "\n".join(lines), args.quick)


if __name__ == "__main__":
    main()
