"""Collect benchmarks/results/*.md into benchmarks/RESULTS.md (one section per fragment).

Run: python benchmarks/collect_results.py
"""

from __future__ import annotations

import os

ORDER = [
    "fisher_speed_wall",
    "fisher_speed",
    "fisher_cnn",
    "fisher_cnn_mnist1d",
    "fisher_cnn_resnet18",
    "fisher_transformer",
    "fisher_transformer_encoder",
    "per_sample_grads",
    "laplace_speed",
    "laplace_speed_cpu",
    "kfac_refresh",
    "curvature_overhead",
    "natural_gradient",
    "natural_gradient_transformer",
    "continual",
    "continual_labels",
    "continual_empirical",
    "pruning",
    "obs",
    "obs_mlp",
    "obs_cnn",
    "structured",
    "structured_latency",
    "structured_wide",
    "structured_minilm",
    "structured_minilm_refit",
    "structured_minilm_d",
    "structured_tp_encoders",
    "structured_tp_minilm",
    "structured_gradual",
    "structured_encoder_calib",
    "merging",
    "merging_curvature_v2",
    "merging_curvature_cnn",
    "merging_curvature_shared",
    "merging_cg",
    "merging_curvature",
    "merging_curvature_variants",
    "uncertainty",
    "uncertainty_cnn",
    "damping",
    "gpu",
    "demo",
]


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    frag_dir = os.path.join(here, "results")
    names = sorted(f[:-3] for f in os.listdir(frag_dir) if f.endswith(".md"))
    names = [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]
    parts = [
        "# natgrad benchmark results\n",
        "Collected from `benchmarks/results/*.md` by `python benchmarks/collect_results.py`.",
        "Each section names its date, torch version, machine and the command that produced it.",
        "Timings are ratios measured in one run against a baseline on the same machine.\n",
    ]
    sections = []
    for n in names:
        with open(os.path.join(frag_dir, f"{n}.md")) as fh:
            text = fh.read().rstrip() + "\n"
        head, _, rest = text.partition("\n")
        if head.startswith("## "):  # several runs share a title: name the fragment
            head = f"{head} [`{n}`]"
            sections.append(f"* `{n}`: {head[3:].rsplit(' [', 1)[0]}")
        parts.append(f"{head}\n{rest}")
    parts[4:4] = ["Sections, by fragment (`benchmarks/results/<name>.md`):\n", *sections, ""]
    with open(os.path.join(here, "RESULTS.md"), "w") as fh:
        fh.write("\n".join(parts))
    print(f"wrote RESULTS.md from {len(names)} fragments: {', '.join(names)}")


if __name__ == "__main__":
    main()
