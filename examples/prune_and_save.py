"""Prune before deployment with Fisher importance, fine-tune, make it permanent, save.

Importance ``½ F_i θ_i²`` (the loss increase predicted when ``θ_i`` is set to zero);
masks go through ``torch.nn.utils.prune``, so they stay in force while fine-tuning.

Install (from the repository root; the `demo` extra adds scikit-learn's digits):
    pip install -e ".[demo]"
Run: python examples/prune_and_save.py [OUTPUT_FILE]
"""

import os
import sys
import tempfile

import torch
from torch import nn

import natgrad
from natgrad.datasets import load_digits

torch.manual_seed(0)
data = load_digits()
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(m):
    with torch.no_grad():
        return (m(data.x_test).argmax(-1) == data.y_test).float().mean().item()


def train(m, steps):
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(m(data.x_train), data.y_train).backward()
        opt.step()


train(model, 150)
print(f"dense: accuracy {accuracy(model):.3f}")

fisher = natgrad.estimate_fisher(model, (data.x_train, data.y_train))
importance = natgrad.fisher_importance(fisher, model)
masks = natgrad.fisher_pruning_masks(importance, sparsity=0.8)  # weights only, global
natgrad.apply_masks(model, masks)
print(f"80% of the weights removed: accuracy {accuracy(model):.3f}")

train(model, 30)  # the pruned entries stay zero
natgrad.make_permanent(model)  # plain parameters again, zeros kept
zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
print(f"fine-tuned: accuracy {accuracy(model):.3f}, {zeros / total:.0%} of weights are zero")

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "pruned.pt")
torch.save(model.state_dict(), path)
restored = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
restored.load_state_dict(torch.load(path))
print(f"saved to {path}; reloaded accuracy {accuracy(restored):.3f}")
