"""The demo's outputs: the results table, ``report.md`` and ``metrics.json``."""

from __future__ import annotations

import json
import os
from typing import Any

from natgrad.cli.demo.common import Section
from natgrad.engine.report import to_jsonable


def table(sections: list[Section]) -> str:
    """A compact markdown table: section | quantity | value."""
    lines = ["| section | quantity | value |", "|---|---|---|"]
    for s in sections:
        for i, (k, v) in enumerate(s.rows):
            lines.append(f"| {s.key if i == 0 else ''} | {k} | {v} |")
    return "\n".join(lines)


def report_md(sections: list[Section], header: dict[str, Any], skipped: dict[str, str]) -> str:
    out = [
        "# natgrad demo",
        "",
        "MNIST-1D (generated locally) split into task A (digits 0-4) and task B (digits 5-9); "
        "a task's accuracy is over its own five logits (a head per task). "
        + ", ".join(f"{k}: {v}" for k, v in header.items())
        + ".",
        "",
        "## Results",
        "",
        table(sections),
        "",
    ]
    for s in sections:
        out += [f"## {s.title}", ""]
        out += [f"* {k}: **{v}**" for k, v in s.rows]
        if s.note:
            out += ["", s.note]
        out += [""] + [f"![{p}]({p})" for p in s.plots]
        out += [""]
    out += [
        "The two Fishers compared in the interference section (both of the model trained "
        "on task A, before any training on B) are saved as `fisher_task_A.safetensors` and "
        "`fisher_task_B.safetensors`; `natgrad report fisher_task_*.safetensors` "
        "summarizes and compares them with the same measures.",
        "",
    ]
    if skipped:
        out += ["## Not shown", ""]
        out += [f"* {k}: {v}" for k, v in skipped.items()] + [""]
    return "\n".join(out)


def write_outputs(
    out: str,
    sections: list[Section],
    header: dict[str, Any],
    skipped: dict[str, str],
    metrics: dict[str, Any] | None,
) -> list[str]:
    """Write report.md and metrics.json into ``out``; return the paths."""
    report = os.path.join(out, "report.md")
    with open(report, "w") as fh:
        fh.write(report_md(sections, header, skipped))
    payload = {
        "config": header,
        "sections": {
            s.key: {"title": s.title, "seconds": s.seconds, "rows": dict(s.rows), **s.data}
            for s in sections
        },
        "not_shown": skipped,
        "metrics": metrics,
    }
    path = os.path.join(out, "metrics.json")
    with open(path, "w") as fh:
        json.dump(to_jsonable(payload, max_elements=64), fh, indent=1, allow_nan=False)
    return [report, path]
