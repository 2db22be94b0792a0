"""Groups and mask Fisher of natgrad.pruning.structures (cases found by review)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad.pruning.structured import convert_attention
from natgrad.pruning.structures import apply_masks_to, estimate_mask_fisher, find_groups


class SeqFirstEncoder(nn.Module):
    """Batch-first data, a sequence-first nn.TransformerEncoderLayer inside."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=False), 1,
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x).transpose(0, 1)).transpose(0, 1).mean(1))


class SeqFirstMLP(nn.Module):
    """Traced Linear layers reading (T, N, F) tensors."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(6, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.l2(torch.relu(self.l1(x.transpose(0, 1))))
        return self.head(h.mean(0))


def _loop_fisher(model, groups, x, y):
    """(1/N) Σ_n g_n g_nᵀ, each g_n from a forward of sample n alone (shared (S,) masks)."""
    ref = {g.name: torch.zeros(g.size, g.size, dtype=torch.float64) for g in groups}
    for n in range(x.shape[0]):
        masks = {g.name: torch.ones(g.size, dtype=torch.float64, requires_grad=True) for g in groups}
        with apply_masks_to(model, groups, masks):
            loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
            gs = torch.autograd.grad(loss, [masks[g.name] for g in groups])
        for g, gr in zip(groups, gs, strict=True):
            ref[g.name] += torch.outer(gr, gr) / x.shape[0]
    return ref


@pytest.mark.parametrize("make", [SeqFirstEncoder, SeqFirstMLP])
def test_mask_fisher_of_sequence_first_layers_matches_a_per_sample_loop(make):
    torch.manual_seed(0)
    model = make().double().eval()
    convert_attention(model)
    n = t = 5  # N == T: a wrong sample axis would broadcast silently
    x, y = torch.randn(n, t, 6, dtype=torch.float64), torch.randint(0, 3, (n,))
    groups, _ = find_groups(model, (x, y))
    assert groups
    fisher = estimate_mask_fisher(model, groups, (x, y))
    ref = _loop_fisher(model, groups, x, y)
    for g in groups:
        torch.testing.assert_close(fisher.blocks[g.name], ref[g.name], rtol=1e-9, atol=1e-12)


def test_an_excluded_layer_keeps_its_structures_and_is_never_refitted():
    """exclude= names layers whose own structures (output rows, heads) are never removed
    and whose weights are never re-fitted (an excluded consumer was re-fitted; found by
    review); a layer feeding it may still be pruned, taking the matching input columns
    (Torch-Pruning's ignored_layers convention, e.g. a kept classifier head): every
    column of the excluded layer is one of its original columns, unchanged."""
    import natgrad

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 4)
    ).eval()
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    groups, skipped = find_groups(m, (x, y), exclude=["4"])
    assert [g.name for g in groups] == ["0", "2"]

    def columns_of(small, big):
        return all(any(torch.equal(c, d) for d in big.T) for c in small.T)

    for scope in ("consumers", "downstream"):
        small, rep = natgrad.prune_structured(
            m, (x, y), params=0.7, measure=False, exclude=(e for e in ["4"]), tune_scope=scope,
        )
        assert small[4].out_features == 4 and "4" not in rep.tuned_layers
        assert columns_of(small[4].weight, m[4].weight) and torch.equal(small[4].bias, m[4].bias)
    groups, skipped = find_groups(m, (x, y), exclude=["2"])
    assert [g.name for g in groups] == ["0"] and "excluded" in skipped["2"]
    small, rep = natgrad.prune_structured(m, (x, y), params=0.8, measure=False, exclude=["2"])
    assert small[2].out_features == 10 and "2" not in rep.tuned_layers
    assert columns_of(small[2].weight, m[2].weight) and torch.equal(small[2].bias, m[2].bias)
