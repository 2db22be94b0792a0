"""Quickstart: the diagonal Fisher of a small classifier on scikit-learn's digits.

Install (from the repository root; the `demo` extra adds scikit-learn's digits):
    pip install -e ".[demo]"
Run: python examples/quickstart.py
"""

import torch
from torch import nn

import natgrad
from natgrad.datasets import load_digits

torch.manual_seed(0)
data = load_digits()
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(200):
    opt.zero_grad()
    nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
    opt.step()
acc = (model(data.x_test).argmax(-1) == data.y_test).float().mean().item()
print(f"test accuracy {acc:.3f}")

for labels in ("empirical", "mc", "exact"):
    F = natgrad.estimate_fisher(model, (data.x_train, data.y_train), labels=labels, mc_samples=4)
    print(f"{labels:>9}: trace {F.total():.4f}  per layer {F.layer_totals()}")
print("top coordinates:", natgrad.top_coordinates(F, 3))
