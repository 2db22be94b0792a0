"""One-shot pruning of MNIST-1D models: Fisher importance vs magnitude vs random.

Models: the MNIST-1D MLP 40-100-100-10 and the 1-D CNN (3 Conv1d + linear) from
``benchmarks/workloads.py``, trained with Adam (lr 3e-3, batch 100; MLP 15 epochs, CNN
25 epochs, about where test accuracy peaks). Each is pruned once, at 50/70/90/95%
sparsity, with the same mask machinery (``natgrad.fisher_pruning_masks``, global scope
over the weights, i.e. tensors with dim >= 2; biases kept; min_keep=1) and three scores:

* Fisher: the OBD saliency ``½ F_i θ_i²`` with the exact diagonal Fisher
  (``labels="exact"``) on 2000 training samples;
* magnitude: ``θ_i²`` (the same ranking as ``|θ_i|``, global magnitude pruning);
* random: uniform scores (mean over two seeds);
* Fisher (layer): the Fisher saliency with ``scope="layer"`` (each weight tensor loses
  the same fraction), to separate the score from the global allocation across layers.

Masks are applied with ``natgrad.apply_masks`` (torch.nn.utils.prune); test accuracy is
measured right after pruning and after a short fine-tune (Adam lr 1e-3, masks kept by
the prune hooks).

Run: ``python -m benchmarks.exp_pruning`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.workloads import (
    evaluate,
    machine_line,
    mnist1d_cnn,
    mnist1d_mlp,
    run_experiment,
    train,
)
from natgrad import apply_masks, estimate_fisher, fisher_importance, fisher_pruning_masks
from natgrad.datasets import load_mnist1d

SPARSITIES = (0.5, 0.7, 0.9, 0.95)
METHODS = ("fisher", "magnitude", "random", "fisher-layer")


def scores(method: str, model: torch.nn.Module, fisher, seed: int = 0) -> dict:
    if method.startswith("fisher"):
        return fisher_importance(fisher, model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    if method == "magnitude":
        return {k: p.double() ** 2 for k, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}


def run(args) -> str:
    torch.manual_seed(0)
    data = load_mnist1d()
    makers = {"MLP": mnist1d_mlp, "CNN": mnist1d_cnn}
    rows, kept = [], []
    for name, make in makers.items():
        t0 = time.time()
        torch.manual_seed(0)
        model = train(
            make(),
            data.x_train,
            data.y_train,
            epochs=args.epochs[name],
            seed=0,
            make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
        )
        model.eval()
        dense_acc, _ = evaluate(model, data.x_test, data.y_test)
        n_fisher = args.fisher_samples
        fisher = estimate_fisher(
            model, (data.x_train[:n_fisher], data.y_train[:n_fisher]), labels="exact"
        )
        print(f"{name}: dense test accuracy {dense_acc:.3f} ({time.time() - t0:.0f}s)")
        for s in args.sparsities:
            for method in METHODS:
                seeds = range(args.random_seeds) if method == "random" else range(1)
                one, tuned = [], []
                for seed in seeds:
                    scope = "layer" if method == "fisher-layer" else "global"
                    imp = scores(method, model, fisher, seed)
                    masks = fisher_pruning_masks(imp, sparsity=s, scope=scope)
                    if method in ("fisher", "magnitude"):
                        fr = {k: float(m.float().mean()) for k, m in masks.items()}
                        kept.append((name, s, method, fr))
                    pruned = apply_masks(copy.deepcopy(model), masks)
                    one.append(evaluate(pruned, data.x_test, data.y_test)[0])
                    train(pruned, data.x_train, data.y_train, epochs=args.finetune, seed=1)
                    tuned.append(evaluate(pruned, data.x_test, data.y_test)[0])
                rows.append(
                    (name, dense_acc, s, method, sum(one) / len(one), sum(tuned) / len(tuned))
                )
                print(f"  {s:.0%} {method:12s} one-shot {rows[-1][4]:.3f} tuned {rows[-1][5]:.3f}")
    return table(rows, args) + "\n\n" + kept_table(kept)


def kept_table(kept) -> str:
    """Kept fraction of each weight tensor under global Fisher and magnitude pruning."""
    lines = ["Kept fraction per weight tensor (global scope):", ""]
    for model in dict.fromkeys(k[0] for k in kept):
        sub = [k for k in kept if k[0] == model]
        names = list(sub[0][3])
        lines += [
            f"| {model} sparsity | method | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        lines += [
            f"| {s:.0%} | {meth} | " + " | ".join(f"{fr[n]:.3f}" for n in names) + " |"
            for _, s, meth, fr in sub
        ]
        lines.append("")
    return "\n".join(lines)


def table(rows, args) -> str:
    lines = [
        "## Pruning: Fisher importance vs magnitude vs random (MNIST-1D)",
        "",
        machine_line(),
        "",
        f"Train: Adam lr 3e-3, batch 100, seed 0, epochs {args.epochs}. Fisher: exact labels on "
        f"{args.fisher_samples} training samples. Global scope over weights (dim >= 2), biases "
        f"kept. Fine-tune: {args.finetune} epochs of Adam with masks kept. Random: mean of "
        f"{args.random_seeds} seeds. Test accuracy on the 1000 MNIST-1D test samples.",
        "",
        "| model (dense acc) | sparsity | Fisher | magnitude | random | Fisher (layer) "
        "| Fisher +ft | magnitude +ft | random +ft | Fisher (layer) +ft |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r[0], r[2], r[3]): r for r in rows}
    for name, dense in dict((r[0], r[1]) for r in rows).items():
        for s in args.sparsities:
            one = [by[(name, s, m)][4] for m in METHODS]
            ft = [by[(name, s, m)][5] for m in METHODS]
            cells = " | ".join(f"{v:.3f}" for v in one + ft)
            lines.append(f"| {name} ({dense:.3f}) | {s:.0%} | {cells} |")
    cells = [(n, s) for n in dict.fromkeys(r[0] for r in rows) for s in args.sparsities]
    beats = [
        sum(by[(n, s, "fisher")][i] > by[(n, s, "magnitude")][i] for n, s in cells) for i in (4, 5)
    ]
    lines += [
        "",
        f"Fisher (global) beats magnitude in {beats[0]}/{len(cells)} (model, sparsity) cells "
        f"one-shot and in {beats[1]}/{len(cells)} after the fine-tune.",
        "",
        "Timings are not the point here; the machine was shared with other busy jobs. "
        "Reproduce with `python -m benchmarks.exp_pruning"
        + (" --quick" if args.quick else "")
        + "`.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs and levels (smoke run)")
    args = p.parse_args(argv)
    args.epochs = {"MLP": 3, "CNN": 5} if args.quick else {"MLP": 15, "CNN": 25}
    args.finetune = 1 if args.quick else 2
    args.fisher_samples = 500 if args.quick else 2000
    args.random_seeds = 1 if args.quick else 2
    args.sparsities = (0.5, 0.9) if args.quick else SPARSITIES
    run_experiment("pruning", run, args)


if __name__ == "__main__":
    main()
