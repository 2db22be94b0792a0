"""Demo sections: damage and asymmetry between the tasks, forgetting with and without EWC."""

from __future__ import annotations

import torch

from natgrad.cli.demo import plots
from natgrad.cli.demo.common import TOP_FRACTION, Section, State
from natgrad.cli.demo.setup import DemoNet, accuracy, clone, train
from natgrad.continual.compare import compare_task_fisher
from natgrad.continual.damage import fisher_damage_asymmetry
from natgrad.continual.ewc import EWC
from natgrad.curvature.estimate import estimate_fisher


def _task_accs(model: DemoNet, st: State) -> dict[str, float]:
    out = {}
    for name, t in st.tasks.items():
        out[name] = accuracy(model.on(name), t.x_test, t.y_test)
    return out


def interference(st: State) -> Section:
    """Train on task A; Fishers of both tasks; damage, asymmetry and similarity A vs B."""
    torch.manual_seed(st.cfg.seed + 1)
    model = DemoNet().on("A")
    a = st.tasks["A"]
    train(model, a.x_train, a.y_train, epochs=st.cfg.base_epochs, seed=st.cfg.seed)
    st.models["A"] = model.eval()
    batch_a, batch_b = st.task_batch("A"), st.task_batch("B")
    f_a = estimate_fisher(model.on("A"), batch_a)
    f_b = estimate_fisher(model.on("B"), batch_b)
    st.fishers["A"], st.fishers["B_at_A"] = f_a, f_b
    acc = _task_accs(model, st)
    st.log(f"model trained on task A: accuracy A {acc['A']:.3f}")

    # Each task scores its own logits, so the asymmetry compares the two heads' views:
    # the damage to A of a step on B uses A's Fisher and B's gradient through B's head.
    both = DemoNet()
    both.load_state_dict(model.state_dict())
    both.on(None)
    xa, ya = batch_a
    xb, yb = batch_b
    asym = fisher_damage_asymmetry(both, (xa, ya), (xb, yb + 5), names=("A", "B"), lr=1e-2)
    cmp = compare_task_fisher(f_a, f_b, top_k=TOP_FRACTION)
    top = f"top-{TOP_FRACTION:.0%}"
    per_layer = {k: v.cosine for k, v in cmp.per_layer.items()}
    rows = [
        ("damage to A of a step on B (lr 0.01)", f"{asym.damage_to_first:.3g}"),
        ("damage to B of a step on A (lr 0.01)", f"{asym.damage_to_second:.3g}"),
        ("log-ratio, more fragile task", f"{asym.log_ratio:+.2f}, {asym.more_fragile}"),
        ("Fisher cosine A vs B, whole model", f"{cmp.cosine:.3f}"),
        (
            "Fisher cosine A vs B, per layer",
            ", ".join(f"{k} {v:.3f}" for k, v in per_layer.items()),
        ),
        ("Fréchet overlap A vs B", f"{cmp.frechet_overlap:.3f}"),
        (f"Jaccard of the {top} coordinates, A vs B", f"{cmp.topk_jaccard:.3f}"),
    ]
    return Section(
        "interference",
        "Task interference before training on B (fisher_damage_asymmetry, compare_task_fisher)",
        rows=rows,
        data={
            "accuracy_after_A": acc,
            "asymmetry": asym,
            "comparison": cmp,
            "cosine_per_layer": per_layer,
        },
        note="Damage is the expected second-order loss increase `½ Σ F_A,i (η ∇L_B,i)²`, "
        "measured on the model trained on A, before any training on B (all ten logits). "
        "Both Fishers come from this model (A's on A's logits, B's on B's logits); they are "
        "the ones saved as `fisher_task_A.safetensors` and `fisher_task_B.safetensors`. "
        "Each task reads its own five rows of the head, so the head's Fishers are nearly "
        "disjoint and dominate the whole-model cosine; the shared layers' cosines show how "
        "much the tasks share the body.",
    )


def forgetting(st: State) -> Section:
    """Continue training on task B from the task-A model: fine-tuning vs EWC."""
    b = st.tasks["B"]
    epochs = st.cfg.task_epochs
    curves, finals = {}, {}
    lam = 200.0
    for label, use_ewc in (("fine-tune", False), (f"EWC (λ={lam:g})", True)):
        model = clone(st.models["A"]).train()
        ewc = EWC(model, st.fishers["A"], lam=lam) if use_ewc else None
        hist: dict[str, list[float]] = {"epoch": [0], "A": [], "B": []}
        acc = _task_accs(model, st)
        hist["A"].append(acc["A"])
        hist["B"].append(acc["B"])

        def on_epoch(
            e: int, model: DemoNet = model, hist: dict[str, list[float]] = hist
        ) -> None:
            acc = _task_accs(model, st)
            hist["epoch"].append(e)
            hist["A"].append(acc["A"])
            hist["B"].append(acc["B"])
            model.on("B")

        model.on("B")
        train(
            model,
            b.x_train,
            b.y_train,
            epochs=epochs,
            seed=st.cfg.seed,
            optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
            penalty=None if ewc is None else ewc.penalty,
            on_epoch=on_epoch,
        )
        curves[label] = hist
        finals[label] = {
            "A": hist["A"][-1],
            "B": hist["B"][-1],
            "forgetting": hist["A"][0] - hist["A"][-1],
        }
        st.models[f"B_{'ewc' if use_ewc else 'ft'}"] = model.eval()
        st.log(
            f"{label} on task B: accuracy A {hist['A'][-1]:.3f} (was {hist['A'][0]:.3f}), "
            f"B {hist['B'][-1]:.3f}"
        )
    series = {}
    for label, h in curves.items():
        series[f"{label}: task A"] = (h["epoch"], h["A"])
        series[f"{label}: task B"] = (h["epoch"], h["B"])
    plot = plots.curves(
        st.path("forgetting_curves.png"),
        series,
        xlabel="epoch on task B",
        ylabel="test accuracy",
        title="Forgetting of task A while training on task B",
    )
    rows = []
    for label, f in finals.items():
        rows.append((f"{label}: accuracy A / B", f"{f['A']:.3f} / {f['B']:.3f}"))
        rows.append((f"{label}: forgetting of A", f"{f['forgetting']:+.3f}"))
    return Section(
        "forgetting",
        f"Forgetting: {epochs} epochs on task B after task A (Adam lr 3e-3), with and without EWC",
        rows=rows,
        plots=[plot],
        data={"curves": curves, "final": finals, "lambda": lam},
        note="EWC adds `(λ/2) Σ_i F_A,i (θ_i - θ*_A,i)²` to task B's loss, with F_A the "
        "diagonal Fisher of task A at the end of task A. Forgetting = drop in task A accuracy.",
    )
