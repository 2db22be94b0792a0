"""Structured pruning of MNIST-1D models: Fisher vs magnitude (L1) vs random, no retraining.

Models: the MNIST-1D MLP 40-100-100-10 and the 1-D CNN (3 Conv1d of 25 channels +
linear) from ``benchmarks/workloads.py``, trained with Adam (lr 3e-3, batch 100; MLP 15
epochs, CNN 25 epochs), one model per seed. Each is pruned with
``natgrad.prune_structured`` at 40/50/60% of FLOPs removed (``flops=0.6/0.5/0.4``), by
three criteria that share the same budgeted greedy search (per-layer minimum 5%) and the
same physical shrinking:

* Fisher: the diagonal mask Fisher (empirical labels) per FLOP saved, then the
  block-Fisher rearrangement within layers;
* magnitude: the L1 norm of each neuron's/channel's weights, divided by its layer's mean;
* random: uniform scores.

"tuned" is the least-squares layer reconstruction on the calibration set (no gradient
steps); "plain" is the shrunken model as is. Fisher data and calibration: 2000 training
samples. Test accuracy on the 1000 test samples. Latency: median forward time of the dense
and the Fisher-pruned model at batch 1 and 32, interleaved in one run.

Run: ``python -m benchmarks.exp_structured`` (``--quick`` for a smoke run). Not part of CI.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.workloads import (
    evaluate,
    load_note,
    machine_line,
    mnist1d_cnn,
    mnist1d_mlp,
    run_experiment,
    train,
)
from natgrad import prune_structured
from natgrad.datasets import load_mnist1d
from natgrad.pruning.structured import measure_latency

KEEP = (0.6, 0.5, 0.4)
CRITERIA = ("fisher", "magnitude", "random")


def run(args) -> str:
    data = load_mnist1d()
    n = args.fisher_samples
    fisher_data = (data.x_train[:n], data.y_train[:n])
    makers = {"MLP": mnist1d_mlp, "CNN": mnist1d_cnn}
    acc: dict = {}  # (model, keep, criterion, tuned) -> [acc per seed]
    dense: dict = {}
    lat: dict = {}  # (model, keep) -> [(speedup b1, speedup b32)]
    secs: dict = {}
    flops: dict = {}
    pred: dict = {}
    for name, make in makers.items():
        for seed in range(args.seeds):
            t0 = time.time()
            torch.manual_seed(seed)
            model = train(
                make(), data.x_train, data.y_train, epochs=args.epochs[name], seed=seed,
                make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
            ).eval()
            d_acc = evaluate(model, data.x_test, data.y_test)[0]
            dense.setdefault(name, []).append(d_acc)
            print(f"{name} seed {seed}: dense {d_acc:.3f} ({time.time() - t0:.0f}s)")
            for keep in args.keep:
                for crit in CRITERIA:
                    for tune in (False, True):
                        pruned, rep = prune_structured(
                            model, fisher_data, flops=keep, criterion=crit, tune=tune,
                            measure=False, seed=seed,
                        )
                        a = evaluate(pruned, data.x_test, data.y_test)[0]
                        acc.setdefault((name, keep, crit, tune), []).append(a)
                        if crit == "fisher" and tune:
                            secs.setdefault((name, keep), []).append(rep.seconds)
                            flops.setdefault((name, keep), []).append(rep.flops_kept)
                            pred.setdefault((name, keep), []).append(
                                (rep.predicted_loss_increase, rep.measured_loss_increase_untuned)
                            )
                            before, after = measure_latency(
                                [model, pruned], data.x_test[:32], (1, 32), args.repeats
                            )
                            lat.setdefault((name, keep), []).append(
                                (before[1] / after[1], before[32] / after[32])
                            )
                        print(
                            f"  keep {keep:.0%} {crit:9s} {'tuned' if tune else 'plain'} "
                            f"acc {a:.3f} (flops kept {rep.flops_kept:.3f}, {rep.seconds:.2f}s)"
                        )
                if "torch_pruning" in args.baselines:
                    a = torch_pruning_baseline(model, keep, data, n)
                    acc.setdefault((name, keep, "tp-l1", False), []).append(a)
    return table(args, dense, acc, lat, secs, flops, pred)


def torch_pruning_baseline(model, keep, data, n) -> float:
    """Torch-Pruning's MagnitudePruner (L1, global) to ``keep`` of the FLOPs, no retraining."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    ex = data.x_train[:2]
    base, _ = tp.utils.count_ops_and_params(m, ex)
    imp = tp.importance.MagnitudeImportance(p=1)
    ignored = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.out_features == 10]
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(12):  # bisection on the pruning ratio to match the FLOPs budget
        mid = (lo + hi) / 2
        trial = copy.deepcopy(m)
        ign = [mod for mod in trial.modules() if isinstance(mod, torch.nn.Linear) and mod.out_features == 10]
        pr = tp.pruner.MagnitudePruner(
            trial, ex, importance=imp, pruning_ratio=mid, ignored_layers=ign, global_pruning=True
        )
        pr.step()
        f, _ = tp.utils.count_ops_and_params(trial, ex)
        if f <= keep * base:
            best, hi = trial, mid
        else:
            lo = mid
    del ignored
    return evaluate(best, data.x_test, data.y_test)[0] if best is not None else float("nan")


def _ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(args, dense, acc, lat, secs, flops, pred) -> str:
    cols = [(c, t) for c in CRITERIA for t in (True, False)]
    has_tp = any(k[2] == "tp-l1" for k in acc)
    head = " | ".join(f"{c} {'tuned' if t else 'plain'}" for c, t in cols)
    lines = [
        "## Structured pruning: Fisher vs magnitude vs random (MNIST-1D, no retraining)",
        "",
        machine_line(),
        "",
        load_note(),
        "",
        f"Command: `python -m benchmarks.exp_structured{' --quick' if args.quick else ''}`. "
        f"{args.seeds} seeds (one trained model each; mean ± std over seeds). Train: Adam lr "
        f"3e-3, batch 100, epochs {args.epochs}. Fisher (empirical labels) and least-squares "
        f"calibration on {args.fisher_samples} training samples; per-layer minimum 5%; test "
        "accuracy on the 1000 MNIST-1D test samples. Neurons of both hidden layers (MLP) and "
        "channels of all three convs (CNN) are removed physically; the output layer is kept. "
        "Torch-Pruning L1: its MagnitudePruner (global, p=1) bisected on the pruning ratio to "
        "the same FLOPs budget (its own op count), no reconstruction: compare with the plain "
        "columns.",
        "",
        "Test accuracy:",
        "",
        f"| model (dense acc) | FLOPs removed | {head}" + (" | Torch-Pruning L1 |" if has_tp else " |"),
        "|---|---|" + "---|" * (len(cols) + has_tp),
    ]
    for name in dense:
        for keep in args.keep:
            cells = [_ms(acc[(name, keep, c, t)]) for c, t in cols]
            if has_tp:
                cells.append(_ms(acc[(name, keep, "tp-l1", False)]))
            lines.append(f"| {name} ({_ms(dense[name])}) | {1 - keep:.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy drop of Fisher (tuned) from dense, latency speedup (dense / pruned median "
        f"forward, {args.repeats} interleaved repeats) and time to prune (Fisher, search, "
        "shrink, tune; mean over seeds):",
        "",
        "| model | FLOPs removed (measured) | acc drop (points) | speedup batch 1 | speedup batch 32 "
        "| time to prune | predicted / measured loss increase (plain) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dense:
        for keep in args.keep:
            drops = [100 * (d - a) for d, a in zip(dense[name], acc[(name, keep, "fisher", True)], strict=True)]
            s1 = [s[0] for s in lat[(name, keep)]]
            s32 = [s[1] for s in lat[(name, keep)]]
            p = pred[(name, keep)]
            lines.append(
                f"| {name} | {1 - statistics.mean(flops[(name, keep)]):.1%} | {_ms(drops)} | "
                f"{statistics.mean(s1):.2f}x | {statistics.mean(s32):.2f}x | "
                f"{statistics.mean(secs[(name, keep)]):.2f} s | "
                f"{statistics.mean(q[0] for q in p):.4f} / {statistics.mean(q[1] for q in p):.4f} |"
            )
    wins = {
        t: sum(
            statistics.mean(acc[(n, k, "fisher", t)]) > statistics.mean(acc[(n, k, "magnitude", t)])
            for n in dense
            for k in args.keep
        )
        for t in (True, False)
    }
    total = len(dense) * len(args.keep)
    lines += [
        "",
        f"Fisher ahead of magnitude (mean accuracy over seeds): {wins[True]}/{total} "
        f"(model, budget) cells tuned, {wins[False]}/{total} plain.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs (smoke run)")
    p.add_argument("--torch-pruning", action="store_true", help="add the Torch-Pruning baseline")
    args = p.parse_args(argv)
    args.seeds = 1 if args.quick else 3
    args.epochs = {"MLP": 3, "CNN": 5} if args.quick else {"MLP": 15, "CNN": 25}
    args.fisher_samples = 500 if args.quick else 2000
    args.repeats = 20 if args.quick else 300
    args.keep = KEEP
    args.baselines = ("torch_pruning",) if args.torch_pruning else ()
    run_experiment("structured", run, args)


if __name__ == "__main__":
    main()
