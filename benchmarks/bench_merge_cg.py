"""Conjugate-gradient cost of the K-FAC merge: Kronecker vs Jacobi preconditioner.

The merge of ``fisher_weighted_merge`` with K-FAC curvatures solves, per layer,
``(Σ_m w_m G_m ⊗ A_m + εI) x = b`` by conjugate gradients. This benchmark builds the
4 task models of ``benchmarks.exp_merging_curvature`` (MNIST-1D MLP body, one seed,
exact-label K-FAC on 2000 samples per task), then merges them with both
preconditioners over the experiment's grid (normalisation none / unit-trace × ridge
``r``), interleaved (Kronecker, Jacobi, Kronecker, ...), and records per solve the CG
iterations (from the ``CGResult``) and the process CPU time. Both solve to the same
relative residual, so the merged weights agree (the largest difference is reported).

Run: ``python -m benchmarks.bench_merge_cg`` (``--quick``: fewer epochs and samples).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import natgrad.merging as merging
from benchmarks.exp_merging_curvature import N_VAL, RIDGE_GRID, make_net, mean_diag, transforms
from benchmarks.workloads import load_note, machine_line, run_experiment, train
from natgrad import estimate_curvature, fisher_weighted_merge
from natgrad.datasets import load_mnist1d


def run(args) -> str:
    torch.manual_seed(args.seed)
    data = load_mnist1d()
    x_tr, y_tr = data.x_train[:-N_VAL], data.y_train[:-N_VAL]
    base = train(
        make_net(args.model), x_tr, y_tr, epochs=args.pretrain_epochs, seed=args.seed,
        make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    ).eval()
    tuned, kfacs = [], []
    for i, f in enumerate(transforms(data.x_train).values()):
        m = copy.deepcopy(base).train()
        x = f(x_tr, 0)
        train(m, x, y_tr, epochs=args.finetune_epochs, seed=args.seed * 10 + i + 1)
        m.eval()
        tuned.append(m)
        n = args.fisher_samples
        kfacs.append(estimate_curvature(m, (x[:n], y_tr[:n]), kind="kfac", labels="exact",
                                        params=[m.body]))
    iters: list[int] = []
    inner = merging.conjugate_gradient

    def counted(*a, **k):
        res = inner(*a, **k)
        iters.append(res.iterations)
        return res

    merging.conjugate_gradient = counted  # record every solve's iterations
    rows = []
    try:
        for norm in [n == "unit" for n in args.norms]:
            scale = mean_diag(kfacs, norm)
            for r in args.ridges:
                rec = {"kronecker": ([], [], None), "jacobi": ([], [], None)}
                for _ in range(args.repeats):
                    for pre in ("kronecker", "jacobi"):
                        iters.clear()
                        t0 = time.process_time()
                        out = fisher_weighted_merge(
                            tuned, kfacs, floor=r * scale, normalize=norm, method="cg",
                            cg_iters=args.cg_iters, cg_tol=1e-8, preconditioner=pre,
                        )
                        rec[pre][0].append(time.process_time() - t0)
                        rec[pre][1].append(list(iters))
                        rec[pre] = (rec[pre][0], rec[pre][1],
                                    torch.cat([p.detach().reshape(-1)
                                               for p in out.body.parameters()]))
                diff = float((rec["kronecker"][2] - rec["jacobi"][2]).abs().max())
                tk, tj = statistics.median(rec["kronecker"][0]), statistics.median(rec["jacobi"][0])
                rows.append(
                    f"| {'unit' if norm else 'none'} | {r:g} | "
                    f"{'/'.join(map(str, rec['jacobi'][1][0]))} | "
                    f"{'/'.join(map(str, rec['kronecker'][1][0]))} | {tj:.2f} | {tk:.2f} | "
                    f"{tj / tk:.1f}x | {diff:.1e} |"
                )
                print(rows[-1], flush=True)
    finally:
        merging.conjugate_gradient = inner
    return "\n".join([
        "## K-FAC merge: conjugate gradients with the Kronecker vs the Jacobi preconditioner",
        "",
        machine_line() + "; " + args.load,
        "",
        f"4 task models of `exp_merging_curvature` (MNIST-1D {args.model.upper()} body, seed "
        f"{args.seed}, exact-label K-FAC on {args.fisher_samples} samples per task), merged "
        "by `fisher_weighted_merge(method=\"cg\", cg_tol=1e-8, cg_iters="
        f"{args.cg_iters})` on points of the experiment's grid (ridge ε = r · mean diag). "
        "Jacobi is the preconditioner of session 2 (before); Kronecker is the new default. "
        "Iterations per layer (first/second layer, one product of every model's curvature "
        f"each), process CPU seconds per merge (median of {args.repeats}, the two "
        "preconditioners interleaved), and the largest difference of the merged weights.",
        "",
        "| normalisation | r | CG iterations, Jacobi | CG iterations, Kronecker | CPU s, Jacobi "
        "| CPU s, Kronecker | speed-up | max weight difference |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Reproduce with `python -m benchmarks.bench_merge_cg"
        + (" --quick" if args.quick else "")
        + f" --repeats {args.repeats} --ridges {' '.join(f'{r:g}' for r in args.ridges)}"
        + f" --norms {' '.join(args.norms)}`.",
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cg-iters", type=int, default=500)
    p.add_argument("--ridges", nargs="+", type=float, default=list(RIDGE_GRID))
    p.add_argument("--norms", nargs="+", default=["none", "unit"], choices=["none", "unit"])
    p.add_argument("--name", default="merging_cg")
    args = p.parse_args(argv)
    args.pretrain_epochs = 3 if args.quick else 15
    args.finetune_epochs = 2 if args.quick else 10
    args.fisher_samples = 300 if args.quick else 2000
    args.load = load_note()
    run_experiment(args.name, run, args)


if __name__ == "__main__":
    main()
