"""The Torch-Pruning baseline of ``benchmarks/exp_structured.py`` on a tiny encoder: it
removes whole heads and feed-forward neurons only, lands on the requested FLOPs, and the
pruned model computes what the dense model with those structures zeroed computes."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torch_pruning")

from benchmarks.exp_structured import Mnist1dEncoder, torch_pruning_baseline  # noqa: E402
from natgrad.pruning.shrink import count_flops  # noqa: E402
from natgrad.pruning.structured import convert_attention  # noqa: E402


def _kept_rows(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """Index in ``big`` of each row of ``small`` (exact copies)."""
    out = []
    for row in small:
        hits = (big == row).all(1).nonzero().flatten().tolist()
        assert len(hits) == 1
        out.append(hits[0])
    return out


@pytest.mark.parametrize(("keep", "heads"), [(0.6, True), (0.5, True), (0.6, False)])
def test_torch_pruning_baseline_on_a_tiny_encoder(keep, heads):
    torch.manual_seed(0)
    d, heads, ff, layers = 16, 4, 48, 2
    model = Mnist1dEncoder(d=d, heads=heads, ff=ff, layers=layers).eval()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    got = []

    def evaluate(m):
        got.append(m)
        return 0.5

    acc, kept, _ = torch_pruning_baseline(model, keep, x[:2], (x, y), evaluate, heads=heads)
    assert acc == 0.5 and len(got) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    pruned = got[0]

    dense = copy.deepcopy(model)
    convert_attention(dense)
    base = count_flops(dense, (x, y))
    # the reported fraction is the measured one, at or under the budget, and within the
    # bisection's resolution: a few feed-forward neurons (a neuron: 2 · 2 · d FLOPs a
    # token, 10 tokens). Torch-Pruning's global threshold also ranks the head dims it does
    # not prune, so one step of its ratio can remove more than one neuron.
    assert kept == pytest.approx(count_flops(pruned, (x, y)) / base, rel=1e-12)
    neuron = 2 * 2 * d * 10 / base
    assert keep - 3 * neuron <= kept <= keep

    # the residual width and the classifier head stay; whole heads and neurons go
    assert pruned.embed.out_features == d and pruned.head.in_features == d
    removed_heads = 0
    masked = copy.deepcopy(dense)
    for lp, lm in zip(pruned.enc.layers, masked.enc.layers, strict=True):
        att_p, att_m = lp.self_attn, lm.self_attn
        assert att_p.head_dim == d // heads and att_p.out_proj.out_features == d
        assert att_p.num_heads * att_p.head_dim == att_p.q_proj.out_features
        hd = att_p.head_dim
        rows = _kept_rows(att_p.q_proj.weight, att_m.q_proj.weight)
        kept_heads = sorted({r // hd for r in rows})
        assert len(kept_heads) == att_p.num_heads >= 1
        removed_heads += heads - len(kept_heads)
        neurons = _kept_rows(lp.linear1.weight, lm.linear1.weight)
        assert 1 <= len(neurons) < ff
        with torch.no_grad():
            for h in set(range(heads)) - set(kept_heads):
                att_m.out_proj.weight[:, h * hd:(h + 1) * hd] = 0
            gone = sorted(set(range(ff)) - set(neurons))
            lm.linear1.weight[gone] = 0
            lm.linear1.bias[gone] = 0
    assert removed_heads >= 1 if heads else removed_heads == 0
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_torch_pruning_baseline_out_of_reach_is_nan():
    """Feed-forward neurons alone (at most 95% of each layer) are about half the FLOPs of
    this encoder: 60% cannot be removed without heads, and no model comes back."""
    torch.manual_seed(0)
    model = Mnist1dEncoder(d=16, heads=4, ff=48, layers=2).eval()
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    got = []
    acc, kept, _ = torch_pruning_baseline(
        model, 0.4, x[:2], (x, y), lambda m: got.append(m) or 0.0, heads=False
    )
    assert acc != acc and kept != kept and not got
