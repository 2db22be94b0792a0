"""The demo's results table (``natgrad demo``), recorded as a RESULTS.md fragment.

Runs the full demo (or ``--quick``) for each seed into a temporary directory, times it,
and writes the table of the first seed plus the wall-clock times to
``benchmarks/results/demo.md``.

Run: python benchmarks/exp_demo.py [--quick] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchmarks.workloads import load_note, machine_line, write_fragment
from natgrad.cli.demo import run_demo

LOAD_NOTE = load_note()  # measured before the run starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    times, tables = [], []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = run_demo(out, quick=args.quick, seed=seed, progress=False)
            times.append(time.perf_counter() - start)
            tables.append(result.table)
    mode = "quick" if args.quick else "full"
    text = "\n".join(
        [
            "## The demo (`natgrad demo`, issue 8)",
            "",
            machine_line(),
            "",
            f"`natgrad demo{' --quick' if args.quick else ''} --seed {args.seeds[0]}` ({mode} "
            f"mode). Wall-clock per run (data generation included, 1 torch thread): "
            + ", ".join(f"seed {s}: {t:.1f} s" for s, t in zip(args.seeds, times, strict=True))
            + f". {LOAD_NOTE}. "
            f"Reproduce: `python -m benchmarks.exp_demo{' --quick' if args.quick else ''}`.",
            "",
            tables[0],
        ]
    )
    print(text)
    print("wrote", write_fragment("demo", text))


if __name__ == "__main__":
    main()
