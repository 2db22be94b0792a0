"""Demo section: Laplace-style uncertainty of the base model on out-of-distribution inputs."""

from __future__ import annotations

from typing import Any

import torch

from natgrad.cli.demo import plots
from natgrad.cli.demo.common import Section, State
from natgrad.cli.demo.setup import auroc, calibration
from natgrad.laplace import UncertaintyReport, fisher_uncertainty, optimize_prior_precision


def uncertainty(st: State) -> Section:
    """Epistemic score (total logit variance) on test inputs vs noise and reversed signals."""
    model = st.models["base"].on(None)
    fisher = st.fishers["base_exact"]
    n_data = len(st.data.x_train)
    prior = optimize_prior_precision(model, fisher, method="marglik", n_data=n_data)
    n = st.cfg.eval_samples // 2
    x_in = st.data.x_test[:n]
    g = torch.Generator().manual_seed(st.cfg.seed)
    ood = {
        "Gaussian noise": torch.randn(n, x_in.shape[1], generator=g),
        "time-reversed signals": x_in.flip(-1),
    }
    delta = prior.prior_precision

    def scores(x: torch.Tensor) -> tuple[UncertaintyReport, torch.Tensor, torch.Tensor]:
        r = fisher_uncertainty(model, x, fisher, prior_precision=delta, n_data=n_data)
        # Laplace epistemic score; MAP baseline: 1 - max prob (r.mean are the MAP logits)
        return r, r.epistemic, 1 - r.mean.softmax(-1).max(-1).values

    x_all, y_all = st.data.x_test, st.data.y_test  # x_in is its first n signals
    lap, ep_all, map_all = scores(x_all)
    ep_in, map_in = ep_all[:n], map_all[:n]
    rows = [("prior precision δ (Laplace marginal likelihood)", f"{delta:.3g}")]
    data: dict[str, Any] = {"prior_precision": delta, "n_data": n_data, "n_test": n, "auroc": {}}
    assert lap.probs is not None  # a categorical model: the probit predictive is computed
    predictive = {"MAP": lap.mean.softmax(-1), "Laplace (probit)": lap.probs}
    for label, probs in predictive.items():
        nll, ece = calibration(probs, y_all)
        data[label] = {"nll": nll, "ece": ece}
        rows.append((f"{label}: test NLL / ECE", f"{nll:.3f} / {ece:.3f}"))
    plot = plots.reliability(
        st.path("reliability.png"),
        {f"{k} (ECE {data[k]['ece']:.3f})": v for k, v in predictive.items()},
        y_all,
        title="Reliability on the test set (10 bins)",
    )
    for name, x in ood.items():
        _, ep_out, map_out = scores(x)
        a_lap, a_map = auroc(ep_in, ep_out), auroc(map_in, map_out)
        data["auroc"][name] = {"laplace_epistemic": a_lap, "map_1_minus_max_prob": a_map}
        rows.append((f"AUROC {name}: Laplace variance / MAP 1-max p", f"{a_lap:.3f} / {a_map:.3f}"))
    st.log(
        "uncertainty: AUROC "
        + ", ".join(f"{k} {v['laplace_epistemic']:.3f}" for k, v in data["auroc"].items())
    )
    return Section(
        "uncertainty",
        "Uncertainty on out-of-distribution inputs (fisher_uncertainty, linearized Laplace)",
        rows=rows,
        plots=[plot],
        data=data,
        note=f"Posterior precision `N·F + δ` with N = {n_data} training samples and the "
        "exact-label Fisher; the epistemic score is the total logit variance "
        "`Σ_c Σ_i J_ci² / (N F_i + δ)`. AUROC: in-distribution test signals vs each "
        "out-of-distribution set (0.5 = no separation). NLL and ECE (10 bins) on all test "
        "signals; the reliability diagram plots each confidence bin's accuracy against its "
        "mean confidence (on the diagonal: calibrated; marker area: share of samples).",
    )
