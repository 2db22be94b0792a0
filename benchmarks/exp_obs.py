"""One-shot OBS pruning of MNIST-1D models on every curvature vs magnitude and OBD.

Models: the MNIST-1D MLP 40-100-100-10 and the 1-D CNN from ``benchmarks/workloads.py``,
trained with Adam (lr 3e-3, batch 100; MLP 15 epochs, CNN 25 epochs) on 3500 of the 4000
training samples, one model per seed (3 seeds). The other 500 training samples are the
validation split. Each model is pruned once at 50/70/90/95% sparsity, global scope over
the weights (tensors with dim >= 2), biases kept, every method through
``natgrad.obs_prune`` with the same per-layer floor (each weight tensor keeps at least
1% of its entries, ``min_keep_per_layer=0.01``):

* magnitude: ``DiagonalFisher`` of ones, ``damping=0``, ``method="none"`` (saliency
  ``θ²/2``: global magnitude pruning, no update);
* OBD: the exact diagonal Fisher (``labels="exact"``), ``damping=0``, ``method="none"``
  (saliency ``½ F θ²``, no update) — ``natgrad.fisher_pruning_masks``' ranking;
* OBS-diag: the same diagonal Fisher with damping (saliency ``½ (F + λ) θ²``; a diagonal
  curvature moves no kept weight);
* OBS-kfac: ``estimate_curvature(kind="kfac", labels="exact")``, saliency from
  ``inverse_diagonal`` and the joint OBS update by conjugate gradients on ``mv``;
* OBS-lowrank: ``kind="lowrank"`` from 1000 per-sample gradients with one sampled label
  each (``labels="mc"``), same saliency and update.

The OBS update runs at most 100 conjugate-gradient products (``cg_iters=100``; on the MLP
at 90% the accuracy after 100 and 300 products differed by < 0.01 in a trial run).
Curvatures use 2000 training samples. Tuning budget: none for any method. The OBS
variants share one damping rule, ``λ = r · mean(diag F)`` with ``r = 1e-2`` (obs_prune's
default); ``--damping-grid`` picks ``r`` per (model, seed, sparsity, method) by accuracy on
the validation split instead (the same grid for every OBS variant; magnitude and OBD have
no hyperparameter). Test
accuracy is on the 1000 MNIST-1D test samples, one-shot (no fine-tune).

Run: ``python -m benchmarks.exp_obs`` (``--quick`` for a smoke run; ``--models MLP`` or
``--models CNN`` for one model, written to ``results/obs_mlp.md`` / ``obs_cnn.md``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
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
from natgrad import DiagonalFisher, estimate_curvature, obs_prune
from natgrad.datasets import load_mnist1d

SPARSITIES = (0.5, 0.7, 0.9, 0.95)
METHODS = ("magnitude", "OBD", "OBS-diag", "OBS-kfac", "OBS-lowrank")
DAMPING_GRID = (1e-2,)


def curvatures(model, data, args) -> dict:
    x, y = data.x_train[: args.fisher_samples], data.y_train[: args.fisher_samples]
    diag = estimate_curvature(model, (x, y), kind="diag", labels="exact")
    ones = DiagonalFisher({k: torch.ones_like(p) for k, p in model.named_parameters()}, 1)
    out = {"magnitude": ones, "OBD": diag, "OBS-diag": diag}
    out["OBS-kfac"] = estimate_curvature(model, (x, y), kind="kfac", labels="exact")
    n = args.lowrank_samples
    out["OBS-lowrank"] = estimate_curvature(
        model,
        (x[:n], y[:n]),
        kind="lowrank",
        labels="mc",
        generator=torch.Generator().manual_seed(0),
    )
    return out


def mean_diag(curv) -> float:
    d = curv.diagonal()
    return sum(float(v.double().sum()) for v in d.values()) / sum(v.numel() for v in d.values())


def prune_once(model, curv, s, damping, method):
    m = copy.deepcopy(model)
    r = obs_prune(m, curv, s, damping=damping, method=method, cg_iters=100, cg_tol=1e-6)
    return m, r


def run(args) -> str:
    data = load_mnist1d()
    n_val = 500
    x_tr, y_tr = data.x_train[:-n_val], data.y_train[:-n_val]
    x_val, y_val = data.x_train[-n_val:], data.y_train[-n_val:]
    makers = {k: v for k, v in {"MLP": mnist1d_mlp, "CNN": mnist1d_cnn}.items()
              if k in args.models}
    results = {}  # (model, seed, sparsity, method) -> (test acc, chosen r)
    dense = {}
    for name, make in makers.items():
        for seed in range(args.seeds):
            t0 = time.time()
            torch.manual_seed(seed)
            model = train(
                make(),
                x_tr,
                y_tr,
                epochs=args.epochs[name],
                seed=seed,
                make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
            ).eval()
            dense[(name, seed)] = evaluate(model, data.x_test, data.y_test)[0]
            curvs = curvatures(model, data, args)
            print(f"{name} seed {seed}: dense {dense[(name, seed)]:.3f} ({time.time() - t0:.0f}s)")
            for s in args.sparsities:
                for meth in METHODS:
                    curv = curvs[meth]
                    if meth in ("magnitude", "OBD"):
                        m, _ = prune_once(model, curv, s, 0.0, "none")
                        results[(name, seed, s, meth)] = (
                            evaluate(m, data.x_test, data.y_test)[0], None
                        )
                        continue
                    scale = mean_diag(curv)
                    best = None
                    for r in args.damping_grid:
                        m, rep = prune_once(model, curv, s, r * scale, "auto")
                        val = evaluate(m, x_val, y_val)[0]
                        if best is None or val > best[0]:
                            best = (val, r, m)
                    results[(name, seed, s, meth)] = (
                        evaluate(best[2], data.x_test, data.y_test)[0], best[1]
                    )
                accs = " ".join(f"{results[(name, seed, s, m)][0]:.3f}" for m in METHODS)
                print(f"  {s:.0%}: {accs}", flush=True)
    return table(results, dense, args)


def table(results, dense, args) -> str:
    models = list(dict.fromkeys(k[0] for k in results))
    lines = [
        "## OBS pruning on every curvature vs magnitude and OBD (MNIST-1D, one-shot)",
        "",
        machine_line(),
        "",
        f"Train: Adam lr 3e-3, batch 100, epochs {args.epochs}, on 3500 training samples; "
        f"{args.seeds} seeds (one model each). Curvatures on {args.fisher_samples} training "
        f"samples (low rank: {args.lowrank_samples}, one sampled label each). Global scope over "
        "weights, biases kept, every method keeps >= 1% of each weight tensor. OBS damping "
        "λ = r · mean(diag F), "
        + (
            f"r = {args.damping_grid[0]} for every OBS variant (no tuning for any method)"
            if len(args.damping_grid) == 1
            else f"r from {list(args.damping_grid)} by accuracy on 500 held-out training samples"
        )
        + ". Test accuracy (1000 samples), mean ± std over seeds, no fine-tune.",
        "",
        "| model (dense acc) | sparsity | " + " | ".join(METHODS) + " | OBS-kfac − magnitude |",
        "|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for name in models:
        d = [dense[(name, s)] for s in range(args.seeds)]
        for sp in args.sparsities:
            cells, means = [], {}
            for meth in METHODS:
                v = [results[(name, seed, sp, meth)][0] for seed in range(args.seeds)]
                means[meth] = statistics.mean(v)
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cells.append(f"{means[meth]:.3f} ± {sd:.3f}")
            gap = means["OBS-kfac"] - means["magnitude"]
            lines.append(
                f"| {name} ({statistics.mean(d):.3f}) | {sp:.0%} | "
                + " | ".join(cells)
                + f" | {gap:+.3f} |"
            )
    if len(args.damping_grid) > 1:
        lines += ["", "Chosen damping ratio r per (model, sparsity), one per seed:", ""]
    for name in models if len(args.damping_grid) > 1 else ():
        for sp in args.sparsities:
            picks = {
                m: [results[(name, seed, sp, m)][1] for seed in range(args.seeds)]
                for m in METHODS[2:]
            }
            lines.append(f"- {name} {sp:.0%}: " + "; ".join(f"{m} {v}" for m, v in picks.items()))
    lines += [
        "",
        "Reproduce with `python -m benchmarks.exp_obs"
        + (" --quick" if args.quick else "")
        + (f" --models {' '.join(args.models)}" if len(args.models) == 1 else "")
        + (f" --damping-grid {' '.join(map(str, args.damping_grid))}"
           if tuple(args.damping_grid) != DAMPING_GRID else "")
        + "`.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, fewer epochs (smoke run)")
    p.add_argument("--models", nargs="+", default=["MLP", "CNN"], choices=["MLP", "CNN"])
    p.add_argument("--damping-grid", nargs="+", type=float, default=list(DAMPING_GRID))
    args = p.parse_args(argv)
    args.epochs = {"MLP": 3, "CNN": 3} if args.quick else {"MLP": 15, "CNN": 25}
    args.seeds = 1 if args.quick else 3
    args.fisher_samples = 300 if args.quick else 2000
    args.lowrank_samples = 200 if args.quick else 1000
    args.damping_grid = tuple(args.damping_grid)
    args.sparsities = (0.7, 0.9) if args.quick else SPARSITIES
    name = "obs" if len(args.models) == 2 else "obs_" + args.models[0].lower()
    run_experiment(name, run, args)


if __name__ == "__main__":
    main()
