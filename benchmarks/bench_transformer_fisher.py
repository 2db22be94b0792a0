"""Diagonal Fisher on real transformer sizes: time and peak memory against a plain
forward+backward of the same batch.

Workloads (Hugging Face ``transformers`` models built from configs, random weights):

* ``encoder``: a BERT-style encoder, ``BertConfig`` with 6 layers, hidden 384, 12 heads,
  intermediate 1536 (MiniLM size, 22.7M parameters), a sequence-classification head (2
  classes), ``N=32`` sequences of ``T=128`` tokens, a 2-D ``attention_mask`` with
  padding in every third row (passed as users pass it), ``attn_implementation`` eager and
  sdpa; likelihood ``categorical``.
* ``gpt2``: GPT-2 small from ``GPT2Config()`` (124M parameters, LM head tied to the token
  embedding), ``N=4`` sequences of ``T=128`` tokens, likelihood ``token_categorical``
  (one sample is one sequence: ``l_n = Σ_t -log p(y_nt)``).

Time: ``plain`` (forward, summed loss of the likelihood, backward into ``.grad``) and
``estimate_fisher`` with ``labels="empirical"`` and ``"mc"``, interleaved
(plain, empirical, mc, plain, ...) for ``--repeats`` rounds after one warm-up round;
the ratio is the median Fisher time over the median plain time of the same run.

Memory: each method in a fresh subprocess, second call (the first loads code and
kernels): the growth of the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set before the call. The subprocess runs
with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc maps every tensor of 64 KiB or more
on its own and unmaps it when freed: the resident set then follows the live tensors. With
glibc's default (a threshold that grows to 32 MiB after the first frees), memory freed
by the first call stays in malloc's arenas and is reused by the second, so the growth
measures how much of a method's peak the previous call's leftovers could not serve, not
its peak (``--allocator-default`` measures that way). Bound: plain's growth
+ 3P floats + one chunk of per-sample products (the largest the capture path forms:
``PRODUCT_FLOATS`` floats, or one per-sample gradient of the tied embedding for GPT-2).

Run: ``python -m benchmarks.bench_transformer_fisher`` (full sizes, writes
``benchmarks/results/fisher_transformer.md``); ``--quick`` (small configs, prints only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.workloads import load_note, machine_line, write_fragment
from natgrad import estimate_fisher
from natgrad.engine.capture_layers import PRODUCT_FLOATS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("plain", "empirical", "mc")
TARGET = 1.5


GPT2_SHAPE = "4x128"  # N x T of the gpt2 workload (--gpt2-shape)


def build(
    workload: str, impl: str, quick: bool, shape: str = GPT2_SHAPE
) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """``(model, batch, likelihood)`` for one workload, seeded (``shape``: GPT-2's ``NxT``)."""
    import transformers

    torch.manual_seed(0)
    if workload == "encoder":
        cfg = transformers.BertConfig(
            hidden_size=384, num_hidden_layers=2 if quick else 6, num_attention_heads=12,
            intermediate_size=1536, num_labels=2, attn_implementation=impl,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(cfg).eval()
        n, t = (8, 64) if quick else (32, 128)
        ids = torch.randint(0, cfg.vocab_size, (n, t))
        mask = torch.ones(n, t, dtype=torch.long)
        mask[::3, t // 2 :] = 0  # padding in every third row
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,))}
        return model, batch, "categorical"
    cfg = transformers.GPT2Config(attn_implementation=impl, **({"n_layer": 2} if quick else {}))
    model = transformers.GPT2LMHeadModel(cfg).eval()
    n, t = (2, 64) if quick else tuple(int(v) for v in shape.split("x"))
    ids = torch.randint(0, cfg.vocab_size, (n, t))
    return model, {"input_ids": ids, "labels": ids.clone()}, "token_categorical"


def method_fn(
    model: torch.nn.Module, batch: dict[str, Any], lik: str, method: str
) -> Callable[[], None]:
    """A call of ``method`` on the batch: the plain forward+backward or a Fisher."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    y = batch["labels"]

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        out = model(**inputs).logits
        loss = F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum")
        loss.backward()

    def fisher() -> None:
        estimate_fisher(model, batch, lik, labels=method)

    return plain if method == "plain" else fisher


def time_run(
    workload: str, impl: str, quick: bool, repeats: int, shape: str = GPT2_SHAPE
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per method, interleaved in one process: ``(wall, cpu)``, CPU time
    being this process's (``time.process_time``), steadier than wall-clock on a loaded
    machine when torch runs one thread."""
    model, batch, lik = build(workload, impl, quick, shape)
    fns = {m: method_fn(model, batch, lik, m) for m in METHODS}
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(repeats + 1):
        for m in METHODS:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[m]()
            if r > 0:  # round 0 warms up
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    model.zero_grad(set_to_none=True)
    med = statistics.median
    return {m: med(v) for m, v in wall.items()}, {m: med(v) for m, v in cpu.items()}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_child(
    workload: str, impl: str, method: str, quick: bool, shape: str = GPT2_SHAPE
) -> float:
    """Peak RSS growth (MiB) of the second call of ``method``, in this process."""
    model, batch, lik = build(workload, impl, quick, shape)
    fn = method_fn(model, batch, lik, method)
    fn()
    model.zero_grad(set_to_none=True)  # plain's .grad would otherwise exist before the call
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    base = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - base


def peak_mib(
    workload: str,
    impl: str,
    method: str,
    quick: bool,
    shape: str = GPT2_SHAPE,
    threads: int = 1,
    default_malloc: bool = False,
) -> float:
    """:func:`peak_child` in a fresh subprocess (with a fixed mmap threshold unless
    ``default_malloc``: see the module docstring)."""
    env = dict(os.environ)
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    code = (
        f"import json, torch; torch.set_num_threads({threads}); "
        "from benchmarks.bench_transformer_fisher import peak_child; "
        f"print(json.dumps(peak_child({workload!r}, {impl!r}, {method!r}, {quick!r}, {shape!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=3600,
        env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return float(json.loads(proc.stdout.strip().splitlines()[-1]))


def chunk_mib(workload: str, quick: bool) -> float:
    """One chunk of per-sample products: the scratch buffer's largest size."""
    if workload == "gpt2":  # one per-sample gradient of the tied (V, D) embedding
        model, _, _ = build(workload, "eager", quick)
        return model.transformer.wte.weight.numel() * 4 / 2**20
    return PRODUCT_FLOATS * 4 / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="small configs; print, write nothing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--runs", default="encoder:eager,encoder:sdpa,gpt2:sdpa",
        help="comma-separated workload:attn_implementation pairs",
    )  # fmt: skip
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument(
        "--allocator-default", action="store_true",
        help="measure memory with glibc's default mmap threshold (see the docstring)",
    )  # fmt: skip
    ap.add_argument(
        "--gpt2-shape", default="4x128",
        help="GPT-2 batch NxT (default 4x128, the recorded setting; smaller when time is short)",
    )  # fmt: skip
    ap.add_argument(
        "--fragment",
        default="fisher_transformer",
        help="results fragment name (benchmarks/results/<name>.md), e.g. one per run",
    )
    ap.add_argument(
        "--memory-runs", default=None,
        help="measure memory only for these workload:attn pairs (default: every run)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = [
        "## Diagonal Fisher on transformers (issue 14): BERT-style encoder and GPT-2 small",
        "",
        machine_line(),
        "",
        f"Run: `python -m benchmarks.bench_transformer_fisher {' '.join(argv or sys.argv[1:])}`"
        .rstrip() + f". {load_note()}.",
        "",
        "Workloads: `encoder` = BertForSequenceClassification from BertConfig(6 layers, "
        "hidden 384, 12 heads, intermediate 1536; 22.7M parameters), N=32, T=128, 2-D "
        "attention_mask with padding in every third row; `gpt2` = GPT2LMHeadModel(GPT2Config())"
        f" (124M parameters, tied LM head), N x T = {args.gpt2_shape}, token_categorical "
        "likelihood (one "
        "sample = one sequence). `plain` = forward + summed loss + backward into .grad. "
        f"Times are medians of {args.repeats} interleaved rounds (plain, empirical, mc) "
        "after a warm-up round; ratio = Fisher / plain in the same run. "
        f"Target: <= {TARGET}x (physical limit about 1.1x).",
        "",
        f"CPU = this process's CPU time ({args.threads} torch thread(s)), the ratio the "
        "target is judged on; wall = wall-clock of the same calls. Memory: peak RSS growth "
        "of a second call in a fresh process, "
        + (
            "glibc's default mmap threshold (arena reuse across calls)."
            if args.allocator_default
            else "MALLOC_MMAP_THRESHOLD_=65536 (RSS follows live tensors)."
        ),
        "",
        "| workload | attention | labels | fwd+bwd CPU ms | Fisher CPU ms | ratio CPU | target "
        "| fwd+bwd wall ms | Fisher wall ms | ratio wall | "
        "peak MiB (Fisher / plain) | bound MiB (plain + 3P + chunk) | memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows, notes = [], []
    for run in args.runs.split(","):
        workload, impl = run.split(":")
        t, c = time_run(workload, impl, args.quick, args.repeats, args.gpt2_shape)
        mem: dict[str, float] = {}
        bound = float("nan")
        measure = args.memory_runs is None or run in args.memory_runs.split(",")
        if not args.no_memory and measure:
            mem = {
                m: peak_mib(
                    workload, impl, m, args.quick, args.gpt2_shape, args.threads,
                    args.allocator_default,
                )  # fmt: skip
                for m in METHODS
            }
            model, _, _ = build(workload, impl, args.quick)
            P = sum(p.numel() for p in model.parameters())
            bound = mem["plain"] + 3 * P * 4 / 2**20 + chunk_mib(workload, args.quick)
        for lab in ("empirical", "mc"):
            ratio = c[lab] / c["plain"]
            ok = "met" if ratio <= TARGET else f"missed by {ratio - TARGET:.2f}x"
            if mem:
                mem_cell = f"{mem[lab]:.0f} / {mem['plain']:.0f}"
                mem_ok = "within" if mem[lab] <= bound else f"over by {mem[lab] - bound:.0f} MiB"
                bound_cell = f"{bound:.0f}"
            else:
                mem_cell = bound_cell = mem_ok = "not measured"
            rows.append(
                f"| {workload} | {impl} | {lab} | {c['plain'] * 1e3:.0f} | {c[lab] * 1e3:.0f} "
                f"| {ratio:.2f}x | <= {TARGET}x ({ok}) | {t['plain'] * 1e3:.0f} "
                f"| {t[lab] * 1e3:.0f} | {t[lab] / t['plain']:.2f}x "
                f"| {mem_cell} | {bound_cell} | {mem_ok} |"
            )
            notes.append(f"{workload} {impl} {lab}: {ratio:.2f}x")
        print(rows[-2], rows[-1], sep="\n", flush=True)
        if not args.quick:  # after every run, so that a long run leaves its finished rows
            write_fragment(args.fragment, "\n".join(header + rows) + "\n")
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
