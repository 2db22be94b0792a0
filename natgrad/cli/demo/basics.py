"""Demo sections: train the base model on all ten digits, estimate its Fisher three ways."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from natgrad.cli.demo import plots
from natgrad.cli.demo.common import Section, State
from natgrad.cli.demo.setup import DemoNet, accuracy, mean_loss, train
from natgrad.curvature.diagonal import top_coordinates
from natgrad.curvature.estimate import estimate_fisher
from natgrad.directions import top_fisher_directions


def train_tracked(
    st: State,
    model: DemoNet,
    label: str,
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    before_step: Callable[[tuple[torch.Tensor, torch.Tensor]], None] | None = None,
) -> dict[str, list[float]]:
    """Train on all digits; per epoch: seconds (training only), train loss, test accuracy."""
    d = st.data
    n_eval = st.cfg.eval_samples
    rec = {"seconds": [0.0], "train_loss": [], "test_acc": []}
    rec["train_loss"].append(mean_loss(model, d.x_train[:n_eval], d.y_train[:n_eval]))
    rec["test_acc"].append(accuracy(model, d.x_test, d.y_test))
    clock = [time.perf_counter()]

    def on_epoch(e: int) -> None:
        rec["seconds"].append(rec["seconds"][-1] + time.perf_counter() - clock[0])
        rec["train_loss"].append(mean_loss(model, d.x_train[:n_eval], d.y_train[:n_eval]))
        rec["test_acc"].append(accuracy(model, d.x_test, d.y_test))
        clock[0] = time.perf_counter()

    train(
        model,
        d.x_train,
        d.y_train,
        epochs=epochs,
        seed=st.cfg.seed,
        optimizer=optimizer,
        before_step=before_step,
        on_epoch=on_epoch,
    )
    st.log(f"{label}: test accuracy {rec['test_acc'][-1]:.3f} after {epochs} epochs")
    return rec


def base_model(st: State) -> Section:
    """Train the base MLP (40-100-100-10) with Adam on all ten digits."""
    torch.manual_seed(st.cfg.seed)
    model = DemoNet().on(None)
    st.models["init"] = DemoNet().on(None)
    st.models["init"].load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rec = train_tracked(st, model, "base model (Adam)", st.cfg.base_epochs, optimizer=opt)
    st.models["base"] = model.eval()
    st.curves["Adam"] = rec
    return Section(
        "base",
        "Base model: MLP 40-100-100-10 on MNIST-1D, Adam (lr 3e-3, batch 100)",
        rows=[
            ("test accuracy (10 digits)", f"{rec['test_acc'][-1]:.3f}"),
            ("train loss", f"{rec['train_loss'][-1]:.3f}"),
        ],
        data={"epochs": st.cfg.base_epochs, **rec},
    )


def fisher_sources(st: State) -> Section:
    """Diagonal Fisher of the base model with each label source; per-layer mass plot."""
    model = st.models["base"]
    n = st.cfg.fisher_samples
    batch = (st.data.x_train[:n], st.data.y_train[:n])
    rows: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    totals: dict[str, dict[str, float]] = {}
    for labels in ("empirical", "mc", "exact"):
        start = time.perf_counter()
        f = estimate_fisher(
            model,
            batch if labels == "empirical" else batch[0],
            labels=labels,
            mc_samples=1,
            generator=torch.Generator().manual_seed(st.cfg.seed),
        )
        secs = time.perf_counter() - start
        st.fishers[f"base_{labels}"] = f
        totals[labels] = f.layer_totals()
        data[labels] = {"trace": f.total(), "layer_totals": totals[labels], "seconds": secs}
        rows.append((f"trace of F ({labels} labels)", f"{f.total():.3g}"))
    st.log(f"Fisher of the base model on {n} samples: empirical, mc and exact labels")
    m = min(n, 500 if st.cfg.quick else 1000)  # the Gram matrix is m x m
    start = time.perf_counter()
    dirs = top_fisher_directions(model, (batch[0][:m], batch[1][:m]), k=5)
    secs = time.perf_counter() - start
    eig = [float(v) for v in dirs.eigenvalues]
    assert dirs.trace is not None  # method='gram' computes the trace
    share = sum(eig) / dirs.trace
    data["top_directions"] = {
        "eigenvalues": eig, "trace": dirs.trace, "n_samples": m, "seconds": secs
    }
    rows.append(
        (
            f"top-5 eigenvalues of F (empirical, {m} samples)",
            ", ".join(f"{v:.3g}" for v in eig) + f": {share:.0%} of the trace",
        )
    )
    top = top_coordinates(st.fishers["base_exact"], 3)
    data["top_coordinates_exact"] = [[k, list(i), v] for k, i, v in top]
    plot = plots.layer_mass(st.path("fisher_layer_mass.png"), totals, "Per-layer Fisher mass")
    return Section(
        "fisher",
        f"Diagonal Fisher of the base model ({n} training samples, exact per-sample gradients)",
        rows=rows,
        plots=[plot],
        data=data,
        note="Largest entries (exact labels): "
        + ", ".join(f"`{k}{list(i)}` = {v:.3g}" for k, i, v in top)
        + ". Time: "
        + ", ".join(f"{lab} {data[lab]['seconds']:.2f} s" for lab in ("empirical", "mc", "exact"))
        + f", top-5 eigenpairs {secs:.2f} s.",
    )
