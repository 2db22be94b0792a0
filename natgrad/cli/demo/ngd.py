"""Demo section: natural-gradient preconditioners wrapped around SGD vs Adam."""

from __future__ import annotations

from collections.abc import Callable

import torch

from natgrad.cli.demo import plots
from natgrad.cli.demo.basics import train_tracked
from natgrad.cli.demo.common import Section, State
from natgrad.cli.demo.setup import clone
from natgrad.optim.precondition import FisherPreconditioner

LR, MOMENTUM, DAMPING, KL_CLIP = 0.03, 0.9, 0.1, 1e-3


def _stepper(pre: FisherPreconditioner) -> Callable[[tuple[torch.Tensor, torch.Tensor]], None]:
    """``before_step`` for training: one preconditioner step on the batch."""

    def step(b: tuple[torch.Tensor, torch.Tensor]) -> None:
        pre.step(b, lr=LR)

    return step


def natural_gradient(st: State) -> Section:
    """Train the base model's initialization with K-FAC and diagonal natural gradient."""
    epochs = st.cfg.base_epochs
    for kind in ("kfac", "diag"):
        model = clone(st.models["init"])
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        if kind == "kfac":  # the documented defaults and the recommended source
            pre = FisherPreconditioner(model, kind="kfac", source="backward")
        else:  # the diagonal refreshed at every step from its own pass
            pre = FisherPreconditioner(model, kind="diag", damping=DAMPING, update_every=1,
                                       kl_clip=KL_CLIP)
        st.curves[f"SGD + natgrad {kind}"] = train_tracked(
            st,
            model,
            f"SGD + natgrad {kind}",
            epochs,
            optimizer=opt,
            before_step=_stepper(pre),
        )
    adam = st.curves["Adam"]
    rows, data = [], {}
    for label, rec in st.curves.items():
        data[label] = rec
        rows.append(
            (
                f"{label}: train loss / test accuracy",
                f"{rec['train_loss'][-1]:.3f} / {rec['test_acc'][-1]:.3f}",
            )
        )
        if rec is not adam:
            ratio = rec["seconds"][-1] / adam["seconds"][-1]
            rows.append((f"{label}: training time / Adam's (sequential runs, wall-clock)",
                         f"{ratio:.1f}x"))
    plot_epoch = plots.curves(
        st.path("training_curves.png"),
        {k: (range(len(v["train_loss"])), v["train_loss"]) for k, v in st.curves.items()},
        xlabel="epoch",
        ylabel="train loss",
        title="Training on all ten digits (same initialization)",
        logy=True,
    )
    plot_time = plots.curves(
        st.path("training_curves_time.png"),
        {k: (v["seconds"], v["train_loss"]) for k, v in st.curves.items()},
        xlabel="training seconds (evaluation excluded, 1 thread)",
        ylabel="train loss",
        title="Training loss against wall-clock time",
        logy=True,
    )
    return Section(
        "natural_gradient",
        f"Natural gradient vs Adam: {epochs} epochs from the same initialization",
        rows=rows,
        plots=[plot_epoch, plot_time],
        data=data,
        note="The preconditioner rewrites `.grad` with `(F + λI)^-1 g` before "
        f"`torch.optim.SGD(lr={LR}, momentum={MOMENTUM})` steps: K-FAC with the documented "
        "defaults and `source='backward'` (statistics from the training backward, refreshed "
        "every 10 steps), the diagonal with its own pass at every step "
        f"(damping={DAMPING}, kl_clip={KL_CLIP}); Adam uses lr 3e-3. Train loss is measured "
        "on the first training samples after each epoch. The time ratios come from runs one "
        "after the other, so machine load shifts them; benchmarks/RESULTS.md times the "
        "methods interleaved.",
    )
