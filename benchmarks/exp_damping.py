"""The Fisher's scale and the strengths that go with it: EWC λ and natural-gradient damping.

Setting (as the demo): MNIST-1D, task A = digits 0-4, task B = digits 5-9, an MLP
40-100-100-10 trained with Adam on A (10 epochs, lr 1e-3; and 300 epochs, to fit the
training set). Two heads:

* ``task-incremental``: task t reads only its own five logits (the task is known at
  test time), as in the demo;
* ``class-incremental``: one shared 10-way head, labels 0-9, no task identity.

Part 1: the trace ``Σ_i F_i`` and mean entry ``trace / P`` of task A's diagonal Fisher
(N = task A's training samples) under the label sources ``empirical``, ``mc`` (one draw)
and ``exact``. Part 2: EWC on task B (10 epochs, Adam lr 3e-3) over a log grid of λ, for
the empirical and the exact Fisher of A: task A and B test accuracy after B. Part 3: SGD
(lr 0.1, 3 epochs from scratch on all digits) with the diagonal preconditioner
``(F + λI)⁻¹`` for damping λ on a grid relative to ``trace / P``: final train loss.

Run: ``python -m benchmarks.exp_damping`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.workloads import evaluate, machine_line, run_experiment, train
from natgrad import EWC, FisherPreconditioner, estimate_fisher
from natgrad.datasets import load_mnist1d

A, B = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
LAMBDAS = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
DAMPING_REL = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


class Net(nn.Module):
    """MLP 40-100-100-10; ``classes`` selects the logits a task reads (None: all ten)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
        )
        self.classes: tuple[int, ...] | None = None

    def forward(self, x):
        out = self.mlp(x)
        return out if self.classes is None else out[:, list(self.classes)]


def task(data, classes, incremental: str):
    s = data.subset(classes)
    shift = classes[0] if incremental == "task" else 0
    return s.x_train, s.y_train - shift, s.x_test, s.y_test - shift


def run(args) -> str:
    torch.manual_seed(0)
    data = load_mnist1d(seed=42)
    epochs = 2 if args.quick else 10
    lambdas = LAMBDAS[::3] if args.quick else LAMBDAS
    lines = [
        "## Fisher scale, EWC λ and damping (docs: Choosing λ and damping)",
        "",
        machine_line(),
        "",
        "Run: `python -m benchmarks.exp_damping`. MNIST-1D, task A = digits 0-4, task B = "
        "digits 5-9, MLP 40-100-100-10 trained on A with Adam (lr 1e-3; 10 epochs, or 300 to "
        "fit the training set), then on B "
        "(10 epochs, Adam lr 3e-3) with EWC at strength λ. task-incremental: each task reads "
        "its own 5 logits; class-incremental: one shared 10-way head. Seed 0, one run each.",
        "",
    ]
    settings = [("task", epochs), ("class", epochs), ("task", 20 if args.quick else 300)]
    for incremental, epochs_a in settings:
        xa, ya, xa_t, ya_t = task(data, A, incremental)
        xb, yb, xb_t, yb_t = task(data, B, incremental)
        model = Net()
        model.classes = A if incremental == "task" else None
        train(model, xa, ya, epochs=epochs_a, seed=0)
        model.eval()
        P = sum(p.numel() for p in model.parameters())
        fishers = {}
        lines += [
            f"### {incremental}-incremental, task A trained for {epochs_a} epochs",
            "",
            f"Task A model: test accuracy {evaluate(model, xa_t, ya_t)[0]:.3f}, "
            f"train loss {evaluate(model, xa, ya)[1]:.3f}; N = {len(xa)}, P = {P}.",
            "",
            "| label source | trace Σ F_i | trace / P | max F_i |",
            "|---|---|---|---|",
        ]
        for labels in ("empirical", "mc", "exact"):
            F = estimate_fisher(model, (xa, ya), labels=labels)
            fishers[labels] = F
            total = float(F.total())
            mx = max(float(v.max()) for v in F.values())
            lines.append(f"| {labels} | {total:.3g} | {total / P:.3g} | {mx:.3g} |")
        lines += [
            "",
            "EWC on task B, test accuracy after B (A / B), by λ and the Fisher's label source:",
            "",
            "| λ | empirical: A / B | λ·trace (empirical) | exact: A / B | λ·trace (exact) |",
            "|---|---|---|---|---|",
        ]
        for lam in lambdas:
            cells = []
            for labels in ("empirical", "exact"):
                m = Net()
                m.load_state_dict(model.state_dict())
                ewc = EWC(m, fishers[labels], lam=lam)
                m.classes = B if incremental == "task" else None
                m.train()
                train(
                    m,
                    xb,
                    yb,
                    epochs=epochs,
                    seed=1,
                    make_opt=lambda mm: torch.optim.Adam(mm.parameters(), lr=3e-3),
                    loss_fn=lambda mm, out, y, ewc=ewc: ewc.penalty(mm),
                )
                m.eval()
                acc_b = evaluate(m, xb_t, yb_t)[0]
                m.classes = A if incremental == "task" else None
                acc_a = evaluate(m, xa_t, ya_t)[0]
                cells += [f"{acc_a:.3f} / {acc_b:.3f}", f"{lam * float(fishers[labels].total()):.3g}"]
            lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
        lines.append("")

    # Part 3: damping of the diagonal natural gradient, relative to trace / P.
    lines += [
        "### Damping of the diagonal natural gradient",
        "",
        "SGD lr 0.1 (no momentum) with `FisherPreconditioner(kind='diag', damping=λ)`, "
        "empirical labels, refreshed every step, from one fresh initialization on all ten "
        f"digits, {1 if args.quick else 3} epochs of batch 100. λ is given relative to "
        "trace/P of the initial model's Fisher; the last column is plain SGD with lr 0.1.",
        "",
    ]
    x, y = data.x_train, data.y_train
    init = Net()
    ref = estimate_fisher(init, (x[:1000], y[:1000]))
    mean_entry = float(ref.total()) / sum(p.numel() for p in init.parameters())
    header, cells = ["trace/P of the initial Fisher"], [f"{mean_entry:.3g}"]
    for rel in (*DAMPING_REL, None):
        m = Net()
        m.load_state_dict(init.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        if rel is not None:
            pre = FisherPreconditioner(m, kind="diag", damping=rel * mean_entry)
        g = torch.Generator().manual_seed(0)
        for _ in range(1 if args.quick else 3):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 100):
                idx = perm[i : i + 100]
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
                if rel is not None:
                    pre.step((x[idx], y[idx]), lr=0.1)
                opt.step()
        loss = evaluate(m, x, y)[1]
        header.append("plain SGD" if rel is None else f"λ = {rel:g}·trace/P")
        cells.append(f"{loss:.3f}" if loss == loss else "diverged (NaN)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(cells) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    run_experiment("damping", run, p.parse_args())
