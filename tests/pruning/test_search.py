"""Cost model of natgrad.pruning.search (cases found by review)."""

from __future__ import annotations

import torch
from torch import nn

import natgrad
from natgrad.pruning.search import build_cost_model
from natgrad.pruning.shrink import count_params
from natgrad.pruning.structures import find_groups


class TiedMLP(nn.Module):
    """A prunable a -> b block, then l1 / l3 holding one weight (a tie)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 20), nn.Linear(20, 6)
        self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 6)
        self.l3, self.l4 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.l3.weight = self.l1.weight

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        h = self.l2(torch.relu(self.l1(h)))
        return self.l4(torch.relu(self.l3(h)))


def test_tied_weights_are_counted_once_and_their_groups_skipped():
    torch.manual_seed(0)
    m = TiedMLP().eval()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    hand = 6 * 20 + 20 + 20 * 6 + 6 + 16 * 6 + 16 + 16 * 6 + 6 + 16 + 16 * 3 + 3
    assert build_cost_model(m, [], (x, y)).total("params") == hand
    groups, skipped = find_groups(m, (x, y))
    assert [g.name for g in groups] == ["a"]
    for name in ("l1", "l2", "l3"):
        assert "tied weights" in skipped[name]
    cost = build_cost_model(m, groups, (x, y))
    # hand count: every parameter once (l1.weight and l3.weight are one tensor)
    assert cost.total("params") == hand == count_params(m)
    small, rep = natgrad.prune_structured(m, (x, y), params=0.85, measure=False, tune=False)
    assert small.l1.weight is small.l3.weight  # the tie survives
    assert small.a.out_features < 20
    assert rep.params_after == count_params(small) <= 0.85 * hand
    # the pruned model computes what the masked model computes
    keep = [i for i in range(20) if i not in rep.removed["a"]]
    with torch.no_grad():
        h = torch.relu(m.a(x))[:, keep] @ m.b.weight[:, keep].T + m.b.bias
        h = m.l2(torch.relu(m.l1(h)))
        torch.testing.assert_close(small(x), m.l4(torch.relu(m.l3(h))))
