"""Merge two fine-tuned models with Fisher-weighted averaging.

Both start from one briefly pre-trained model; one is fine-tuned on digits 0-4, the
other on digits 5-9, each through its own five logits (a head per task). The merge
``θ* = Σ_m F̂_m θ_m / Σ_m F̂_m`` (unit-trace Fishers F̂) keeps each model's important
parameters; the plain average is the same formula with equal weights.

Install (from the repository root; the `demo` extra adds scikit-learn's digits):
    pip install -e ".[demo]"
Run: python examples/merge_models.py
"""

import copy

import torch
from torch import nn

import natgrad
from natgrad.datasets import load_digits

torch.manual_seed(0)
data = load_digits()
heads = {"0-4": slice(0, 5), "5-9": slice(5, 10)}
tasks = {t: data.subset(range(h.start, h.stop)) for t, h in heads.items()}


def accuracy(model, task):
    split, head = tasks[task], heads[task]
    with torch.no_grad():
        pred = model(split.x_test)[:, head].argmax(-1)
    return (pred == split.y_test - head.start).float().mean().item()


def train(model, x, y, steps, head=slice(None)):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x)[:, head], y).backward()
        opt.step()


base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
train(base, data.x_train, data.y_train, steps=20)  # a weak "pre-trained" model
models, fishers = [], []
for task, head in heads.items():
    model, split = copy.deepcopy(base), tasks[task]
    train(model, split.x_train, split.y_train - head.start, steps=100, head=head)
    models.append(model)
    # The Fisher of the task's own head: output_fn picks its logits.
    fishers.append(
        natgrad.estimate_fisher(
            model, split.x_train, labels="exact", output_fn=lambda out, h=head: out[:, h]
        )
    )

equal = [{k: torch.ones_like(v) for k, v in f.items()} for f in fishers]
candidates = {
    "fine-tuned on 0-4": models[0],
    "fine-tuned on 5-9": models[1],
    "plain average": natgrad.fisher_weighted_merge(models, equal),
    "Fisher merge": natgrad.fisher_weighted_merge(models, fishers, normalize=True),
}
print(f"{'':>18}  accuracy on 0-4 / 5-9")
for name, model in candidates.items():
    print(f"{name:>18}  {accuracy(model, '0-4'):.3f} / {accuracy(model, '5-9'):.3f}")
