"""Hand counts, design rows and re-fits of natgrad.pruning.shrink (cases found by review)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.pruning.search import build_cost_model
from natgrad.pruning.shrink import count_flops, count_params, design_rows
from natgrad.pruning.structures import find_groups


def _tiny_gpt2(n_layer: int = 1):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(3)
    cfg = GPT2Config(
        vocab_size=30, n_embd=16, n_layer=n_layer, n_head=4, n_positions=16, num_labels=3,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, use_cache=False,
    )
    return GPT2ForSequenceClassification(cfg).double().eval(), cfg


def _gpt2_hand_flops(e: int, heads: list[int], hidden: list[int], hd: int, t: int, c: int) -> float:
    """2·MACs of c_attn (3·h·hd rows), c_proj, c_fc, mlp c_proj per token, QKᵀ and AV per
    head, and the classifier on every token."""
    total = 2.0 * e * c * t
    for h, f in zip(heads, hidden, strict=True):
        total += 2.0 * t * (e * 3 * h * hd + h * hd * e + e * f + f * e) + 4.0 * t * t * h * hd
    return total


def test_gpt2_flops_count_conv1d_layers_before_and_after_pruning():
    pytest.importorskip("transformers")
    model, cfg = _tiny_gpt2(n_layer=1)
    t = 7
    ids = torch.randint(1, 30, (6, t))
    y = torch.randint(0, 3, (6,))
    e, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    full = _gpt2_hand_flops(e, [cfg.n_head], [4 * e], hd, t, 3)
    # the unconverted model: its Conv1D layers and the attention matmuls are counted
    assert count_flops(model, {"input_ids": ids}) == full
    small, rep = natgrad.prune_structured(
        model, ({"input_ids": ids}, y), flops=0.6, measure=False, tune=False, min_keep=0.25,
    )
    assert all(type(small.transformer.h[i].attn.c_attn).__name__ == "Conv1D" for i in range(1))
    kept = rep.kept
    heads = [kept[f"transformer.h.{i}.attn"][0] for i in range(1)]
    hidden = [kept[f"transformer.h.{i}.mlp.c_fc"][0] for i in range(1)]
    assert sum(heads) + sum(hidden) < cfg.n_head + 4 * e  # something was removed
    assert rep.flops_before == full
    assert rep.flops_after == _gpt2_hand_flops(e, heads, hidden, hd, t, 3)
    assert rep.flops_after <= 0.6 * rep.flops_before * (1 + 1e-9)


def test_cost_model_counts_unconverted_conv1d_as_a_constant():
    pytest.importorskip("transformers")
    model, cfg = _tiny_gpt2()
    ids = torch.randint(1, 30, (2, 5))
    cost = build_cost_model(model, [], {"input_ids": ids})
    e = cfg.n_embd
    # Conv1D layers (no groups: constants) and the classifier; the attention matmuls of an
    # unconverted GPT-2 have no per-head term here (no head group)
    assert cost.total("flops") == 2.0 * 5 * (e * 3 * e + e * e + e * 4 * e + 4 * e * e) + 2.0 * e * 3 * 5
    assert cost.total("params") == count_params(model)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dim", [1, 2])
def test_design_rows_pad_as_the_conv_pads(mode, dim):
    torch.manual_seed(0)
    conv = (nn.Conv1d if dim == 1 else nn.Conv2d)(3, 4, 3, padding=1, padding_mode=mode).double()
    x = torch.randn(2, 3, *([5] * dim), dtype=torch.float64)
    w = torch.cat([conv.weight.reshape(4, -1), conv.bias[:, None]], 1)
    with torch.no_grad():
        want = conv(x).flatten(2).transpose(1, 2).reshape(-1, 4)
        torch.testing.assert_close(design_rows(conv, x) @ w.T, want)


def _conv3d_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 8, 3), nn.ReLU(), nn.Flatten(2),  # (8, 8)
        nn.ConvTranspose1d(8, 6, 3), nn.ReLU(),  # (6, 10)
        nn.Conv1d(6, 8, 3), nn.ReLU(),  # (8, 8)
        nn.Conv1d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 3),
    ).eval()


def _conv3d_hand_flops(k5: int, k7: int) -> float:
    return (
        2 * (2 * 27) * (8 * 8)  # Conv3d: (in · Πk) per output entry
        + 2 * (6 * 3) * (8 * 8)  # ConvTranspose1d: (out · k) per input entry
        + 2 * (6 * 3) * (k5 * 8) + 2 * (k5 * 3) * (k7 * 6) + 2 * (k7 * 6) * 3
    )


def test_conv3d_and_transposed_convs_are_counted_and_reported_as_skipped():
    m = _conv3d_model()
    x, y = torch.randn(16, 2, 4, 4, 4), torch.randint(0, 3, (16,))
    params = (8 * 2 * 27 + 8) + (8 * 6 * 3 + 6) + (8 * 6 * 3 + 8) + (4 * 8 * 3 + 4) + (24 * 3 + 3)
    assert count_flops(m, x) == _conv3d_hand_flops(8, 4)
    groups, skipped = find_groups(m, (x, y))
    assert "not pruned" in skipped["0"] and "not pruned" in skipped["3"]
    cost = build_cost_model(m, groups, (x, y))
    assert cost.total("flops") == _conv3d_hand_flops(8, 4)
    assert cost.total("params") == params == count_params(m)
    small, rep = natgrad.prune_structured(m, (x, y), flops=0.85, measure=False, tune=False)
    k5, k7 = rep.kept["5"][0], rep.kept["7"][0]
    assert (k5, k7) != (8, 4)
    assert rep.flops_before == _conv3d_hand_flops(8, 4)
    assert rep.flops_after == _conv3d_hand_flops(k5, k7) <= 0.85 * rep.flops_before
    assert "not pruned" in rep.skipped["0"]


def test_float64_batchnorm_without_affine_is_sliced_in_float64():
    from natgrad.pruning.structures import apply_masks_to

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 3),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3),
    ).double().eval()
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(32, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (32,))
    small, rep = natgrad.prune_structured(m, (x, y), flops=0.6, measure=False, tune=False)
    assert small[1].running_mean.dtype == small[1].running_var.dtype == torch.float64
    assert small[1].num_features == rep.kept["0"][0] < 8
    groups, _ = find_groups(m, (x, y))
    masks = {}
    for g in groups:
        masks[g.name] = torch.ones(g.size, dtype=torch.float64)
        masks[g.name][rep.removed[g.name]] = 0
    with torch.no_grad(), apply_masks_to(m, groups, masks):
        torch.testing.assert_close(small(x), m(x), rtol=1e-12, atol=1e-12)


class KeywordAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.att(query=h, key=h, value=h, need_weights=False)[0]
        return self.head(h.mean(1))


def test_attention_called_with_keywords_is_counted():
    torch.manual_seed(0)
    m = KeywordAttention().eval()
    t, e, d = 5, 16, 4
    x, y = torch.randn(24, t, 6), torch.randint(0, 3, (24,))

    def hand(h: int) -> float:  # emb, q/k/v, out projection, QKᵀ and AV, classifier
        return 2.0 * t * 6 * e + 2.0 * t * e * 3 * h * d + 2.0 * t * h * d * e + 4.0 * t * t * h * d + 2.0 * e * 3

    assert count_flops(m, x) == hand(4)
    small, rep = natgrad.prune_structured(m, (x, y), flops=0.7, measure=False, tune=False)
    kept = rep.kept["att"][0]
    assert kept < 4
    assert rep.flops_before == hand(4) and rep.flops_after == hand(kept)


def test_downstream_refit_leaves_grouped_convs_out_and_says_so():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3),
    ).double().eval()
    x, y = torch.randn(64, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    small, rep = natgrad.prune_structured(
        m, (x, y), flops=0.8, measure=False, tune_scope="downstream", damping=1e-6,
    )
    assert rep.tuned_layers == ["2", "7"]
    assert "not re-fitted" in rep.skipped["4"]
    assert torch.equal(small[4].weight, m[4].weight)
    # the last layer: the ridge least-squares fit (dense float64) of the original's
    # output on its input in the pruned model
    with torch.no_grad():
        a = torch.cat([small[:7](x), torch.ones(64, 1, dtype=torch.float64)], 1)
        gram = a.T @ a
        eps = 1e-6 * gram.diagonal().mean()
        sol = torch.linalg.solve(gram + eps * torch.eye(a.shape[1], dtype=torch.float64), a.T @ m(x))
    torch.testing.assert_close(torch.cat([small[7].weight.T, small[7].bias[None]]), sol)
