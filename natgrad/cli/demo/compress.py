"""Demo sections: Fisher vs magnitude pruning, Fisher vs plain merging."""

from __future__ import annotations

from typing import cast

import torch

from natgrad.cli.demo import plots
from natgrad.cli.demo.common import Section, State
from natgrad.cli.demo.setup import DemoNet, accuracy, clone, train
from natgrad.curvature.estimate import estimate_fisher
from natgrad.merging import fisher_weighted_merge
from natgrad.pruning.masks import apply_masks, mask_overlap
from natgrad.pruning.prune import fisher_importance, fisher_pruning_masks


def pruning(st: State) -> Section:
    """One-shot global pruning of the base model's weights at several sparsities."""
    base = st.models["base"]
    d = st.data
    fisher = st.fishers["base_exact"]
    fisher_imp = fisher_importance(fisher, base)
    magnitude = {k: v.detach().abs() for k, v in base.named_parameters()}
    labels = ("Fisher (½ F θ²)", "magnitude (|θ|)")
    curves: dict[str, list[float]] = {k: [] for k in labels}
    tuned: dict[str, list[float]] = {f"{k} + 1 epoch fine-tune": [] for k in labels}
    masks_at: dict[float, list[dict[str, torch.Tensor]]] = {}
    for s in st.cfg.sparsities:
        for label, imp in zip(labels, (fisher_imp, magnitude), strict=True):
            masks = fisher_pruning_masks(imp, sparsity=s, scope="global")
            model = apply_masks(clone(base), masks)
            curves[label].append(accuracy(model, d.x_test, d.y_test))
            masks_at.setdefault(s, []).append(masks)
            # the masks stay in force while training (torch.nn.utils.prune hooks)
            train(model.train(), d.x_train, d.y_train, epochs=1, seed=st.cfg.seed)
            tuned[f"{label} + 1 epoch fine-tune"].append(accuracy(model.eval(), d.x_test, d.y_test))
    dense = accuracy(base, d.x_test, d.y_test)
    st.log(
        "pruning: accuracy at "
        + ", ".join(
            f"{s:.0%}: Fisher {a:.3f} / magnitude {b:.3f}"
            for s, a, b in zip(st.cfg.sparsities, *curves.values(), strict=True)
        )
    )
    s_mid = 0.9 if 0.9 in masks_at else st.cfg.sparsities[-1]
    st.extra["masks"] = masks_at[s_mid]
    overlap = mask_overlap(*masks_at[s_mid])
    xs = [100 * s for s in st.cfg.sparsities]
    chance = 1 / len(torch.unique(d.y_test))
    styles = {
        labels[0]: {"marker": "o", "linestyle": "-"},
        labels[1]: {"marker": "s", "linestyle": "--"},
    }
    plot = plots.curves(
        st.path("accuracy_vs_sparsity.png"),
        {k: ([0.0, *xs], [dense, *v]) for k, v in curves.items()},
        xlabel="weights removed (%)",
        ylabel="test accuracy (10 digits)",
        title="One-shot pruning of the base model (no fine-tune)",
        styles=styles,
        chance=chance,
    )
    plot_tuned = plots.curves(
        st.path("accuracy_vs_sparsity_fine_tuned.png"),
        {k: ([0.0, *xs], [dense, *v]) for k, v in zip(labels, tuned.values(), strict=True)},
        xlabel="weights removed (%)",
        ylabel="test accuracy (10 digits)",
        title="Pruned, then fine-tuned for 1 epoch (masks kept)",
        styles=styles,
        chance=chance,
    )
    rows = [("dense accuracy", f"{dense:.3f}")]
    rows += [
        (f"accuracy at {s:.0%}: Fisher / magnitude", f"{a:.3f} / {b:.3f}")
        for s, a, b in zip(st.cfg.sparsities, *curves.values(), strict=True)
    ]
    rows += [
        (f"after 1 epoch fine-tune at {s:.0%}: Fisher / magnitude", f"{a:.3f} / {b:.3f}")
        for s, a, b in zip(st.cfg.sparsities, *tuned.values(), strict=True)
    ]
    rows.append(
        (f"kept-set Jaccard, Fisher vs magnitude at {s_mid:.0%}", f"{overlap.total.jaccard:.3f}")
    )
    return Section(
        "pruning",
        "Pruning before deployment: Fisher importance vs magnitude (global, weights only)",
        rows=rows,
        plots=[plot, plot_tuned],
        data={
            "sparsities": list(st.cfg.sparsities),
            "dense": dense,
            "accuracy": curves,
            "accuracy_after_fine_tune": tuned,
        },
        note="Importance `½ F_i θ_i²` (exact-label Fisher, the OBD saliency) vs `|θ_i|`; masks "
        "applied with `torch.nn.utils.prune` through `natgrad.apply_masks`, so they stay in force "
        "during the fine-tune (Adam lr 1e-3, one epoch).",
    )


def merging(st: State) -> Section:
    """Merge the task-A model and its fine-tune on task B: Fisher-weighted vs plain mean."""
    m_a, m_b = st.models["A"], st.models["B_ft"]
    f_a = st.fishers["A"]
    f_b = estimate_fisher(m_b.on("B"), st.task_batch("B"))
    st.fishers["B"] = f_b
    ones = {k: torch.ones_like(v) for k, v in f_a.items()}  # equal weights: the plain mean
    merged = {
        "task-A model": m_a,
        "fine-tuned on B": m_b,
        "plain average": fisher_weighted_merge([m_a, m_b], [ones, ones]),
        "Fisher merge": fisher_weighted_merge([m_a, m_b], [f_a, f_b], normalize=True),
    }
    rows, data = [], {}
    for label, model in merged.items():
        net = cast(DemoNet, model)  # a merge of DemoNets is a DemoNet
        accs = {t: accuracy(net.on(t), st.tasks[t].x_test, st.tasks[t].y_test) for t in "AB"}
        data[label] = {**accs, "mean": (accs["A"] + accs["B"]) / 2}
        rows.append(
            (
                f"{label}: accuracy A / B (mean)",
                f"{accs['A']:.3f} / {accs['B']:.3f} ({data[label]['mean']:.3f})",
            )
        )
    st.models["merge_partner"] = m_b.on(None)
    st.models["base"].on(None)
    st.log(
        f"merging: Fisher {data['Fisher merge']['mean']:.3f} vs plain average "
        f"{data['plain average']['mean']:.3f} (mean task accuracy)"
    )
    return Section(
        "merging",
        "Merging the task-A model with its fine-tune on B (fisher_weighted_merge)",
        rows=rows,
        data=data,
        note="Fisher merge: `θ* = Σ_m F̂_m θ_m / Σ_m F̂_m` with unit-trace Fishers F̂ of each "
        "model on its own task; the plain average is the same call with every Fisher "
        "entry equal to one.",
    )
