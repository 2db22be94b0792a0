"""Demo section: every registered metric the demo's context can serve (``compute_all``)."""

from __future__ import annotations

from natgrad.cli.demo.common import Section, State
from natgrad.cli.demo.setup import TASK_CLASSES
from natgrad.metrics import MetricContext, registry


def all_metrics(st: State) -> tuple[Section, dict]:
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
    rows = [
        ("metrics computed", f"{len(res.results)} of {len(registry)}"),
        ("skipped (context lacks what they need)", ", ".join(sorted(res.skipped)) or "none"),
    ]
    if res.failed:
        rows.append(("failed", ", ".join(sorted(res.failed))))
    note = "Per-metric values are in `metrics.json` under `metrics.results`. " + " ".join(
        f"`{k}` ({res.seconds[k]:.2f} s)." for k in sorted(res.results)
    )
    return Section("metrics", "Registered metrics (registry.compute_all)", rows=rows, note=note), (
        res.to_dict()
    )
