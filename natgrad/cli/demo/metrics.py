"""Demo section: every registered metric the demo's context can serve (``compute_all``)."""

from __future__ import annotations

from typing import Any

from natgrad.cli.demo.common import Section, State
from natgrad.cli.demo.setup import TASK_CLASSES
from natgrad.metrics import MetricContext, registry


def all_metrics(st: State) -> tuple[Section, dict[str, Any]]:
    """Run ``registry.compute_all`` on the base model with task A and task B batches."""
    n = min(st.cfg.fisher_samples, 200)
    batches = []
    for classes in TASK_CLASSES.values():  # test signals of each task, all ten labels
        s = st.data.subset(classes)
        batches.append((s.x_test[:n], s.y_test[:n]))
    models = [st.models["base"]]
    if "merge_partner" in st.models:
        models.append(st.models["merge_partner"])
    ctx = MetricContext(
        models=models,
        batches=batches,
        tasks=["digits 0-4", "digits 5-9"],
        masks=st.extra.get("masks"),
        options=st.extra.get("metric_options", {}),
    )
    res = registry.compute_all(ctx)
    for name, why in res.failed.items():
        st.log(f"metric {name} failed: {why}")
    st.log(
        f"metrics: {len(res.results)} computed, {len(res.skipped)} skipped, {len(res.failed)} failed"
    )
    context = (
        "models[0] = the base model (trained on all ten digits; all ten logits)"
        + (", models[1] = its task-B fine-tune" if len(models) > 1 else "")
        + f"; batches = {n} test signals of digits 0-4 and of digits 5-9 (labels 0-9); "
        f"{ctx.labels} labels; compare_task_fisher top_k = 5%"
    )
    rows = [
        ("context", context),
        ("metrics computed", f"{len(res.results)} of {len(registry)}"),
        ("skipped (context lacks what they need)", ", ".join(sorted(res.skipped)) or "none"),
    ]
    if res.failed:
        rows.append(("failed", ", ".join(sorted(res.failed))))
    rows += _value_rows(res.results)
    note = (
        "Every value above is computed in the context of the first row, not in the "
        "interference section's: there the model was trained on task A only and each task "
        "read its own five logits, so the damage, the asymmetry verdict and the similarity "
        "differ from these. All values are in `metrics.json` under `metrics.results`, and "
        "each metric's time under `metrics.seconds`."
    )
    section = Section(
        "metrics", "Registered metrics (registry.compute_all)", rows=rows, note=note,
        data={"context": context},
    )  # fmt: skip
    return section, res.to_dict()


def _value_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """A few headline values of the registered metrics, as table rows."""
    rows = []
    if "fisher_information" in results:
        rows.append(("fisher_information: trace", f"{results['fisher_information'].total():.3g}"))
    if "compare_task_fisher" in results:
        c = results["compare_task_fisher"]
        rows.append(
            ("compare_task_fisher: cosine / top-5% Jaccard", f"{c.cosine:.3f} / {c.topk_jaccard:.3f}")
        )
    if "fisher_weighted_damage" in results:
        d = results["fisher_weighted_damage"]
        rows.append((f"fisher_weighted_damage: damage to 0-4 (lr {d.lr:g})", f"{d.damage:.3g}"))
    if "fisher_damage_asymmetry" in results:
        a = results["fisher_damage_asymmetry"]
        rows.append(
            ("fisher_damage_asymmetry: log-ratio, more fragile", f"{a.log_ratio:+.2f}, {a.more_fragile}")
        )
    if "top_fisher_directions" in results:
        e = results["top_fisher_directions"]
        rows.append(("top_fisher_directions: largest eigenvalue", f"{float(e.eigenvalues[0]):.3g}"))
    if "mask_overlap" in results:
        rows.append(("mask_overlap: kept-set Jaccard", f"{results['mask_overlap'].total.jaccard:.3f}"))
    return rows
