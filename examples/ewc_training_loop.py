"""Add an EWC forgetting regularizer to an ordinary training loop.

Task A = digits 0-4, task B = digits 5-9 (scikit-learn's bundled digits), one shared
10-way head. Train on A, estimate A's Fisher, then train on B with and without the
penalty ``(λ/2) Σ_i F_A,i (θ_i - θ*_A,i)²`` and compare how much of A is forgotten.

Install (from the repository root; the `demo` extra adds scikit-learn's digits):
    pip install -e ".[demo]"
Run: python examples/ewc_training_loop.py
"""

import copy

import torch
from torch import nn

import natgrad
from natgrad.datasets import load_digits

torch.manual_seed(0)
data = load_digits()
task_a, task_b = data.subset(range(5)), data.subset(range(5, 10))


def accuracy(model, split):
    with torch.no_grad():
        return (model(split.x_test).argmax(-1) == split.y_test).float().mean().item()


def train(model, split, epochs, penalty=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(split.x_train), split.y_train)
        if penalty is not None:
            loss = loss + penalty(model)  # the only change EWC needs
        loss.backward()
        opt.step()


model_a = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
train(model_a, task_a, epochs=100)
print(f"after task A: accuracy on A {accuracy(model_a, task_a):.3f}")

# The Fisher of task A at the end of task A (exact expectation over the model's labels).
fisher_a = natgrad.estimate_fisher(model_a, task_a.x_train, labels="exact")

for lam in (0.0, 1000.0):
    model = copy.deepcopy(model_a)
    ewc = natgrad.EWC(model, fisher_a, lam=lam)  # anchor = the current parameters
    train(model, task_b, epochs=100, penalty=ewc.penalty)
    print(
        f"after task B, λ={lam:g}: accuracy on A {accuracy(model, task_a):.3f}, "
        f"on B {accuracy(model, task_b):.3f}"
    )
