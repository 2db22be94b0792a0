"""Wrap an optimizer you already use with a natural-gradient preconditioner.

Two equivalent forms: keep your optimizer and call ``pre.step(batch)`` between
``backward()`` and ``optimizer.step()``, or use ``natgrad.NaturalGradient`` as one
``torch.optim.Optimizer``. Data: scikit-learn's bundled digits (no download).

Install (from the repository root; the `demo` extra adds scikit-learn's digits):
    pip install -e ".[demo]"
Run: python examples/wrap_optimizer.py
"""

import torch
from torch import nn

import natgrad
from natgrad.datasets import load_digits

torch.manual_seed(0)
data = load_digits()
init = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def fresh():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model.load_state_dict(init.state_dict())
    return model


def batches(epochs=3, size=64):
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(perm), size):
            idx = perm[i : i + size]
            yield data.x_train[idx], data.y_train[idx]


def test_loss(model):
    with torch.no_grad():
        return nn.functional.cross_entropy(model(data.x_test), data.y_test).item()


# 1. Plain SGD, the baseline.
model = fresh()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for x, y in batches():
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print(f"SGD                       test loss {test_loss(model):.3f}")

# 2. The same SGD, preconditioned by K-FAC: one extra line per step.
model = fresh()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
pre = natgrad.FisherPreconditioner(model, kind="kfac", damping=0.1, update_every=5, kl_clip=1e-3)
for x, y in batches():
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step((x, y), lr=0.05)  # .grad <- K-FAC step (factored damping), in place
    opt.step()
print(f"SGD + K-FAC preconditioner test loss {test_loss(model):.3f}")

# 3. One object that behaves as a torch.optim.Optimizer (diagonal Fisher here).
model = fresh()
opt = natgrad.NaturalGradient(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    natgrad.FisherPreconditioner(model, kind="diag", damping=0.1, kl_clip=1e-3),
)
for x, y in batches():

    def closure(x=x, y=y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure, batch=(x, y))
print(f"NaturalGradient(SGD, diag) test loss {test_loss(model):.3f}")

# The optimizer state (including the curvature) round-trips like any optimizer's.
state = opt.state_dict()
opt.load_state_dict(state)
