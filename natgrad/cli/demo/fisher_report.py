"""``natgrad report``: per-layer mass, top coordinates and pairwise similarity of Fisher files."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from natgrad.cli.demo import plots
from natgrad.cli.demo.common import TOP_FRACTION
from natgrad.continual.compare import compare_task_fisher
from natgrad.curvature.diagonal import DiagonalFisher, top_coordinates
from natgrad.engine.report import Report, to_jsonable

#: The files ``natgrad report`` writes into its output directory.
OUTPUTS = ("report.md", "report.json", "fisher_layer_mass.png")


@dataclass
class FisherFileReport(Report):
    """What ``natgrad report`` wrote: the markdown text, the files and the numbers."""

    text: str
    files: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def _label(path: str, used: set[str]) -> str:
    base = os.path.splitext(os.path.basename(path))[0]
    name, i = base, 2
    while name in used:
        name, i = f"{base}-{i}", i + 1
    used.add(name)
    return name


def fisher_report(
    fishers: Mapping[str, DiagonalFisher], out: str, *, top: int = 10
) -> FisherFileReport:
    """Write ``report.md``, ``report.json`` and ``fisher_layer_mass.png`` into ``out``.

    Args:
        fishers: ``{file path: DiagonalFisher}``.
        out: an existing, writable directory.
        top: how many of the largest coordinates to list per Fisher.
    """
    used: set[str] = set()
    named = {_label(p, used): f for p, f in fishers.items()}
    lines = ["# natgrad Fisher report", ""]
    data: dict[str, Any] = {"fishers": {}, "comparisons": {}}
    for (name, f), path in zip(named.items(), fishers, strict=True):
        totals = f.layer_totals()
        trace = f.total()
        entries = [(k, v, v / trace if trace > 0 else float("nan")) for k, v in totals.items()]
        coords = top_coordinates(f, top)
        data["fishers"][name] = {
            "path": path,
            "n_samples": f.n_samples,
            "labels": f.labels,
            "likelihood": f.likelihood,
            "n_entries": sum(v.numel() for v in f.values()),
            "trace": trace,
            "layer_totals": totals,
            "top_coordinates": [[k, list(i), v] for k, i, v in coords],
        }
        lines += [
            f"## {name}",
            "",
            f"`{path}`: N = {f.n_samples}, labels = {f.labels}, likelihood = {f.likelihood}, "
            f"{data['fishers'][name]['n_entries']} entries, trace {trace:.4g}.",
            "",
            "| layer | Σ F | share |",
            "|---|---|---|",
        ]
        # an all-zero Fisher has no shares (0/0): a dash, and a sentence saying why
        lines += [f"| {k} | {v:.4g} | {s:.1%} |" if s == s else f"| {k} | {v:.4g} | — |"
                  for k, v, s in entries]
        if not trace > 0:
            lines += ["", "Every entry is zero, so the layers have no share of the trace."]
        lines += [
            "",
            f"Top {len(coords)} coordinates:",
            "",
            "| parameter | index | F |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {list(i)} | {v:.4g} |" for k, i, v in coords]
        lines.append("")
    pairs = list(itertools.combinations(named, 2))
    per_layer: list[str] = []
    if pairs:
        lines += [
            "## Pairwise similarity (compare_task_fisher)",
            "",
            "| A | B | cosine | Task2Vec distance | Fréchet overlap | "
            f"Jaccard of the top-{TOP_FRACTION:.0%} coordinates |",
            "|---|---|---|---|---|---|",
        ]
    for a, b in pairs:
        fa, fb = named[a], named[b]
        if set(fa) != set(fb) or any(fa[k].shape != fb[k].shape for k in fa):
            lines.append(f"| {a} | {b} | different parameters: not comparable | | | |")
            continue
        try:
            c = compare_task_fisher(fa, fb, top_k=TOP_FRACTION)
        except ValueError as exc:
            lines.append(f"| {a} | {b} | {exc} | | | |")
            continue
        data["comparisons"][f"{a} vs {b}"] = c.to_dict()
        per_layer.append(
            f"* {a} vs {b}: " + ", ".join(f"{k} {v.cosine:.3f}" for k, v in c.per_layer.items())
        )
        lines.append(
            f"| {a} | {b} | {c.cosine:.3f} | {c.task2vec_distance:.3f} | "
            f"{c.frechet_overlap:.3f} | {c.topk_jaccard:.3f} |"
        )
    if per_layer:
        lines += ["", "Cosine per layer (the whole-model cosine can hide the shared layers):", ""]
        lines += per_layer
    plot = plots.layer_mass(
        os.path.join(out, OUTPUTS[2]),
        {n: f.layer_totals() for n, f in named.items()},
        "Per-layer Fisher mass",
    )
    lines += ["", f"![per-layer mass]({plot})", ""]
    text = "\n".join(lines)
    md = os.path.join(out, OUTPUTS[0])
    with open(md, "w") as fh:
        fh.write(text)
    js = os.path.join(out, OUTPUTS[1])
    with open(js, "w") as fh:
        json.dump(to_jsonable(data), fh, indent=1, allow_nan=False)
    return FisherFileReport(text, [md, js, os.path.join(out, plot)], data)
