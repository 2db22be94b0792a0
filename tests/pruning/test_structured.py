"""Structured pruning: mask gradients and Fisher against per-sample loops, the search,
least-squares tuning against lstsq, shrinking against the masked model, hand counts."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.engine.batch import default_output_fn
from natgrad.pruning.attention import from_multihead, shrink_heads
from natgrad.pruning.search import (
    BudgetError,
    CostModel,
    build_cost_model,
    greedy_search,
    rearrange,
)
from natgrad.pruning.shrink import count_flops, count_params, shrink_model, tune_layers
from natgrad.pruning.structured import convert_attention
from natgrad.pruning.structures import (
    apply_masks_to,
    estimate_mask_fisher,
    find_groups,
    mask_grads,
)
from tests.conftest import TinyCNN, TinyEncoder, mlp
from tests.reference import ce_sum, loop_grads


class ConvNet(nn.Module):
    """Conv1d -> BatchNorm -> ReLU -> MaxPool -> Conv1d -> GELU -> flatten -> Linear, on (N, 2, 12)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 5, 3, padding=1)
        self.bn = nn.BatchNorm1d(5)
        self.pool = nn.MaxPool1d(2)
        self.c2 = nn.Conv1d(5, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 3, 3)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.c1(x))))
        h = F.gelu(self.c2(h))
        return self.fc(h.flatten(1))


def conv_case():
    torch.manual_seed(1)
    model = ConvNet().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.3, 0.3)
    x = torch.randn(7, 2, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    return model, x, y


def mlp_case():
    torch.manual_seed(0)
    model = mlp((5, 7, 6, 4)).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    return model, x, y


def cnn2d_case():
    torch.manual_seed(2)
    model = TinyCNN().double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    return model, x, y


def encoder_case(n=5, padded=((1, 4), (3, 2))):
    """TinyEncoder (q/k/v as HeadAttention) and ``n`` sequences of 6 tokens; row ``r`` of
    ``padded`` pads from position ``t`` on for each ``(r, t)``."""
    torch.manual_seed(3)
    model = TinyEncoder().double().eval()
    convert_attention(model)
    ids = torch.randint(0, 13, (n, 6))
    mask = torch.ones(n, 6, dtype=torch.long)
    for r, t in padded:
        mask[r, t:] = 0
    y = torch.randint(0, 3, (n,))
    return model, {"input_ids": ids, "attention_mask": mask}, y


def bert_case():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(4)
    cfg = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )
    model = BertForSequenceClassification(cfg).double().eval()
    ids = torch.randint(0, 30, (6, 7))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[2, 5:] = 0
    y = torch.randint(0, 3, (6,))
    return model, {"input_ids": ids, "attention_mask": mask}, y


def vit_case():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(5)
    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=12, num_hidden_layers=1,
        num_attention_heads=3, intermediate_size=20, num_labels=3,
    )
    model = ViTForImageClassification(cfg).double().eval()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    return model, {"pixel_values": x}, y


def gpt2_case():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(6)
    cfg = GPT2Config(
        vocab_size=30, n_embd=16, n_layer=2, n_head=4, n_positions=16, num_labels=3,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, use_cache=False,
    )
    model = GPT2ForSequenceClassification(cfg).double().eval()
    convert_attention(model)  # GPT-2's Conv1D layers become nn.Linear
    ids = torch.randint(1, 30, (6, 7))
    y = torch.randint(0, 3, (6,))
    return model, {"input_ids": ids}, y


CASES = {
    "mlp": mlp_case,
    "conv1d": conv_case,
    "cnn2d": cnn2d_case,
    "encoder": encoder_case,
    "bert": bert_case,
    "vit": vit_case,
    "gpt2": gpt2_case,
}


def _batch(x, y):
    return {**x, "labels": y} if isinstance(x, dict) else (x, y)


def _reference_mask_grads(model, groups, x, y):
    """∂l_n/∂m_s from per-sample weight gradients of one backward per sample: the mask on
    structure s scales the consumer's input columns of s, so ∂l/∂m_s = Σ W[:, cols] G[:, cols]."""
    names = []
    for g in groups:
        attn = g.consumer_kind == "attention"
        names.append(f"{g.consumer}.out_proj.weight" if attn else f"{g.consumer}.weight")
    grads = loop_grads(model, lambda o, t: ce_sum(default_output_fn(o), t), x, y, names=names)
    out = {}
    for g, name in zip(groups, names, strict=True):
        w = dict(model.named_parameters())[name].detach()
        prod = w.unsqueeze(0) * grads[name]  # (N, out, in, *k)
        prod = prod.sum(1)  # (N, in, *k)
        prod = prod.flatten(2).sum(2) if prod.dim() > 2 else prod
        width = g.head_dim if g.consumer_kind == "attention" else g.repeat
        out[g.name] = prod.view(prod.shape[0], g.size, width).sum(2)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_mask_grads_match_per_sample_loop(case):
    model, x, y = CASES[case]()
    groups, _ = find_groups(model, _batch(x, y))
    assert groups
    got = mask_grads(model, groups, _batch(x, y))[0]
    want = _reference_mask_grads(model, groups, x, y)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10)


def test_groups_found():
    model, x, y = conv_case()
    groups, skipped = find_groups(model, (x, y))
    assert [(g.name, g.consumer, g.norms, g.repeat) for g in groups] == [
        ("c1", "c2", ["bn"], 1),
        ("c2", "fc", [], 3),
    ]
    assert "output" in skipped["fc"]
    model, x, y = encoder_case()
    groups, skipped = find_groups(model, x)
    assert [(g.name, g.kind, g.size) for g in groups] == [
        ("enc.layers.0.self_attn", "head", 2),
        ("enc.layers.0.linear1", "neuron", 16),
        ("enc.layers.1.self_attn", "head", 2),
        ("enc.layers.1.linear1", "neuron", 16),
    ]


@pytest.mark.parametrize("case", ["mlp", "conv1d", "encoder", "bert"])
def test_block_fisher_matches_dense_reference(case):
    model, x, y = CASES[case]()
    groups, _ = find_groups(model, _batch(x, y))
    want = _reference_mask_grads(model, groups, x, y)
    if isinstance(x, dict):
        data = [_batch({k: v[:2] for k, v in x.items()}, y[:2]), _batch({k: v[2:] for k, v in x.items()}, y[2:])]
    else:
        data = [(x[:4], y[:4]), (x[4:], y[4:])]
    fisher = estimate_mask_fisher(model, groups, data)
    assert fisher.n_samples == len(y)
    for name, g in want.items():
        dense = g.T @ g / len(y)
        torch.testing.assert_close(fisher.blocks[name], dense, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(fisher.diagonal(name), (g**2).mean(0), rtol=1e-8, atol=1e-12)


def test_mc_fisher_matches_loop_over_drawn_labels():
    model, x, _ = mlp_case()
    groups, _ = find_groups(model, x)
    fisher = estimate_mask_fisher(model, groups, x, labels="mc", mc_samples=3, seed=5)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        draws = natgrad.Categorical().sample(model(x), gen, 3)
    acc = {g.name: torch.zeros(g.size, g.size, dtype=torch.float64) for g in groups}
    for d in draws:
        ref = _reference_mask_grads(model, groups, x, d)
        for k, g in ref.items():
            acc[k] += g.T @ g / 3
    for k in acc:
        torch.testing.assert_close(fisher.blocks[k], acc[k] / len(x), rtol=1e-8, atol=1e-12)


def test_predicted_increase_block_and_diagonal():
    model, x, y = mlp_case()
    groups, _ = find_groups(model, (x, y))
    fisher = estimate_mask_fisher(model, groups, (x, y))
    removed = {"0": torch.tensor([1, 4, 5]), "2": torch.tensor([0])}
    f0, f2 = fisher.blocks["0"], fisher.blocks["2"]
    e0 = torch.zeros(7, dtype=torch.float64)
    e0[[1, 4, 5]] = 1
    block = 0.5 * float(e0 @ f0 @ e0) + 0.5 * float(f2[0, 0])
    diag = 0.5 * float(f0.diagonal()[[1, 4, 5]].sum()) + 0.5 * float(f2[0, 0])
    assert fisher.predicted_increase(removed) == pytest.approx(block, rel=1e-12)
    assert fisher.predicted_increase(removed, block=False) == pytest.approx(diag, rel=1e-12)


def test_predicted_increase_tracks_measured_for_small_removals():
    # second order: for one structure with small Fisher the prediction and the measured
    # change of the mean loss agree in sign and order of magnitude at a trained-ish point
    torch.manual_seed(0)
    model = mlp((5, 16, 4)).double()
    x = torch.randn(200, 5, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    groups, _ = find_groups(model, (x, y))
    fisher = estimate_mask_fisher(model, groups, (x, y))
    base = float(F.cross_entropy(model(x), y).detach())
    for s in range(16):
        mask = torch.ones(16, dtype=torch.float64)
        mask[s] = 0.9  # a small step: the second-order term dominates at a minimum
        with torch.no_grad(), apply_masks_to(model, groups, {"0": mask}):
            measured = float(F.cross_entropy(model(x), y)) - base
        predicted = 0.5 * 0.01 * float(fisher.blocks["0"][s, s])
        assert measured == pytest.approx(predicted, rel=0.5, abs=1e-6)


# -- counts and the cost model ---------------------------------------------------------------


def test_counts_match_hand_counts_mlp():
    model, x, y = mlp_case()
    groups, _ = find_groups(model, (x, y))
    assert count_flops(model, x) == 2 * (5 * 7 + 7 * 6 + 6 * 4)
    assert count_params(model) == 5 * 7 + 7 + 7 * 6 + 6 + 6 * 4 + 4
    removed = {"0": torch.tensor([0, 2, 3, 6]), "2": torch.tensor([1, 2, 3, 5])}
    small = shrink_model(copy.deepcopy(model), groups, removed)
    cost = build_cost_model(model, groups, x)
    assert count_flops(small, x) == 2 * (5 * 3 + 3 * 2 + 2 * 4) == cost.total("flops", {"0": 3, "2": 2})
    assert count_params(small) == 15 + 3 + 6 + 2 + 8 + 4 == cost.total("params", {"0": 3, "2": 2})


def test_counts_match_hand_counts_conv():
    model, x, y = conv_case()
    groups, _ = find_groups(model, (x, y))
    assert count_flops(model, x) == 2 * (5 * 2 * 3 * 12 + 4 * 5 * 3 * 3 + 12 * 3)
    assert count_params(model) == 30 + 5 + 10 + 60 + 4 + 36 + 3
    removed = {"c1": torch.tensor([0, 4]), "c2": torch.tensor([1, 2])}
    small = shrink_model(copy.deepcopy(model), groups, removed)
    cost = build_cost_model(model, groups, x)
    flops = 2 * (3 * 2 * 3 * 12 + 2 * 3 * 3 * 3 + 6 * 3)
    assert count_flops(small, x) == flops == cost.total("flops", {"c1": 3, "c2": 2})
    params = 18 + 3 + 6 + 18 + 2 + 18 + 3
    assert count_params(small) == params == cost.total("params", {"c1": 3, "c2": 2})


def test_counts_match_hand_counts_encoder():
    model, x, y = encoder_case()
    groups, _ = find_groups(model, x)
    # per layer: q,k,v,o projections 4·2·T·E·E, QKᵀ and AV 4·T·T·E, FFN 2·2·T·E·16; head 2·8·3
    layer = 4 * 2 * 6 * 8 * 8 + 4 * 6 * 6 * 8 + 2 * 2 * 6 * 8 * 16
    assert count_flops(model, x) == 2 * layer + 48
    removed = {
        "enc.layers.0.self_attn": torch.tensor([1]),
        "enc.layers.0.linear1": torch.arange(11),
    }
    small = shrink_model(copy.deepcopy(model), groups, removed)
    layer0 = 4 * 2 * 6 * 8 * 4 + 4 * 6 * 6 * 4 + 2 * 2 * 6 * 8 * 5
    cost = build_cost_model(model, groups, x)
    kept = {g.name: g.size for g in groups} | {"enc.layers.0.self_attn": 1, "enc.layers.0.linear1": 5}
    assert count_flops(small, x) == layer0 + layer + 48 == cost.total("flops", kept)
    assert count_params(small) == cost.total("params", kept)
    attn0 = 3 * (8 * 4 + 4) + 4 * 8 + 8
    ffn0 = 8 * 5 + 5 + 5 * 8 + 8
    assert count_params(model) - count_params(small) == (3 * (8 * 8 + 8) + 8 * 8 + 8 - attn0) + (
        8 * 16 + 16 + 16 * 8 + 8 - ffn0
    )


def test_counts_match_hand_counts_bert():
    model, x, y = bert_case()
    groups, skipped = find_groups(model, x)
    assert sorted(g.name for g in groups) == sorted(
        [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
        + [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    )
    assert "classifier" in skipped and "bert.pooler.dense" in skipped
    t, e, i = 7, 16, 32

    def layer(h, n):  # h heads of width 4, n feed-forward neurons
        return 4 * 2 * t * e * h * 4 + 4 * t * t * h * 4 + 2 * 2 * t * e * n

    tail = 2 * e * e + 2 * e * 3  # pooler + classifier
    assert count_flops(model, x) == 2 * layer(4, i) + tail
    removed = {
        "bert.encoder.layer.0.attention.self": torch.tensor([0, 2, 3]),
        "bert.encoder.layer.1.intermediate.dense": torch.arange(20),
    }
    small = shrink_model(copy.deepcopy(model), groups, removed)
    kept = {g.name: g.size for g in groups} | {
        "bert.encoder.layer.0.attention.self": 1,
        "bert.encoder.layer.1.intermediate.dense": 12,
    }
    cost = build_cost_model(model, groups, x)
    want = layer(1, i) + layer(4, 12) + tail
    assert count_flops(small, x) == want == cost.total("flops", kept)
    assert count_params(small) == cost.total("params", kept)
    lost = 3 * 3 * (e * 4 + 4) + 3 * 4 * e + 20 * (e + 1) + 20 * e
    assert count_params(model) - count_params(small) == lost


# -- shrinking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_shrunken_equals_masked_and_exports(case):
    model, x, y = CASES[case]()
    groups, _ = find_groups(model, _batch(x, y))
    gen = torch.Generator().manual_seed(0)
    removed, masks = {}, {}
    for g in groups:
        r = torch.randperm(g.size, generator=gen)[: g.size // 2]
        removed[g.name] = r
        m = torch.ones(g.size, dtype=torch.float64)
        m[r] = 0
        masks[g.name] = m
    small = shrink_model(copy.deepcopy(model), groups, removed)
    call = _caller(x)
    with torch.no_grad(), apply_masks_to(model, groups, masks):
        want = call(model)
    with torch.no_grad():
        got = call(small)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the cost polynomial of the search agrees with the hook count of the shrunken model
    cost = build_cost_model(model, groups, _batch(x, y))
    kept = {g.name: g.size - len(removed[g.name]) for g in groups}
    assert count_flops(small, _batch(x, y)) == pytest.approx(cost.total("flops", kept), rel=1e-12)
    assert count_params(small) == pytest.approx(cost.total("params", kept), rel=1e-12)
    assert sum(v.numel() for v in small.state_dict().values()) < sum(
        v.numel() for v in model.state_dict().values()
    )
    if isinstance(x, dict):
        kw = {k: v[:2] for k, v in x.items()}
        exported = torch.export.export(small, (), kw)
        torch.testing.assert_close(
            default_output_fn(exported.module()(**kw)), default_output_fn(small(**kw))
        )
        traced = torch.jit.trace(small, example_kwarg_inputs=kw, strict=False)
        torch.testing.assert_close(default_output_fn(traced(**kw)), default_output_fn(small(**kw)))
    else:
        args = (x[:2],)
        exported = torch.export.export(small, args)
        torch.testing.assert_close(exported.module()(*args), small(*args))
        traced = torch.jit.trace(small, args)
        torch.testing.assert_close(traced(*args), small(*args))


def _caller(x):
    if isinstance(x, dict):
        return lambda m: default_output_fn(m(**x))
    return lambda m: m(x)


def masked_output(model, data, removed, x):
    """The output of ``model`` on ``x`` with the structures of ``removed`` (a report's
    ``{group: indices}``) masked to zero, the reference a shrunken model must equal."""
    groups, _ = find_groups(model, data)
    masks = {}
    for g in groups:
        m = torch.ones(g.size, dtype=torch.float64)
        m[removed[g.name]] = 0
        masks[g.name] = m
    with torch.no_grad(), apply_masks_to(model, groups, masks):
        return _caller(x)(model)


def test_from_multihead_matches_multihead_attention():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
        att = from_multihead(mha)
        q = torch.randn(3, 5, 8, dtype=torch.float64)
        kv = torch.randn(3, 4, 8, dtype=torch.float64)
        if not batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        pad = torch.zeros(3, 4, dtype=torch.bool)
        pad[1, 2:] = True
        am = torch.randn(5, 4, dtype=torch.float64)
        for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": am}, {"attn_mask": am > 1.0}):
            want = mha(q, kv, kv, need_weights=False, **kwargs)[0]
            got = att(q, kv, kv, need_weights=False, **kwargs)[0]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        # removing a head = zeroing its out_proj columns in the full module
        small = shrink_heads(att, torch.tensor([1]))
        full = copy.deepcopy(mha)
        with torch.no_grad():
            full.out_proj.weight[:, :4] = 0
        torch.testing.assert_close(small(q, kv, kv)[0], full(q, kv, kv, need_weights=False)[0])


def test_head_attention_fast_path_matches_module_path():
    """The inference path (one fused q/k/v product) computes what the module path
    computes, sees every change of a projection, and steps aside for hooks."""
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 4, batch_first=batch_first).double().eval()
        att = shrink_heads(from_multihead(mha), torch.tensor([0, 2, 3]))
        x = torch.randn(3, 5, 8, dtype=torch.float64)
        if not batch_first:
            x = x.transpose(0, 1)
        pad = torch.zeros(3, 5, dtype=torch.bool)
        pad[1, 3:] = True
        for kwargs in ({}, {"key_padding_mask": pad}, {"is_causal": True}):
            with torch.enable_grad():
                slow = att(x, x, x, **kwargs)[0]  # parameters require grad: module path
            assert slow.requires_grad
            with torch.no_grad():
                assert att._fast_path_ok(x, x, x)
                fast = att(x, x, x, **kwargs)[0]
            torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)
        # a changed projection is seen by the fused product, also a write through .data
        # (which leaves the parameter's version counter alone)
        for weight in (att.k_proj.weight, att.q_proj.weight.data):
            with torch.no_grad():
                att(x, x, x)
                weight.mul_(0.5)
                fast = att(x, x, x)[0]
            with torch.enable_grad():
                slow = att(x, x, x)[0].detach()
            torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    # hooks on a projection (Fisher, tuning, FLOP counts) see it called: no fast path
    seen = []
    h = att.q_proj.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        att(x, x, x)
    h.remove()
    assert seen == [(3, 5, 6)]
    # cross-attention (query is not key) takes the module path
    with torch.no_grad():
        assert not att._fast_path_ok(x, x.clone(), x)


# -- least-squares tuning -------------------------------------------------------------------------


def test_tuning_matches_lstsq_sequentially():
    model, x, y = mlp_case()
    x = torch.randn(40, 5, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    removed = {"0": torch.tensor([1, 3]), "2": torch.tensor([0, 4])}
    keep0, keep2 = torch.tensor([0, 2, 4, 5, 6]), torch.tensor([1, 2, 3, 5])
    small = shrink_model(copy.deepcopy(model), groups, removed)
    tuned = tune_layers(model, small, groups, removed, x, damping=0.0)
    assert tuned == ["2", "4"]
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        y2 = model[2](h)[:, keep2]
        xt = torch.cat([h[:, keep0], torch.ones(40, 1, dtype=torch.float64)], 1)
        sol2 = torch.linalg.lstsq(xt, y2).solution
        torch.testing.assert_close(small[2].weight, sol2[:-1].T, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(small[2].bias, sol2[-1], rtol=1e-8, atol=1e-10)
        h2 = torch.tanh(xt @ sol2)
        y4 = model(x)
        sol4 = torch.linalg.lstsq(torch.cat([h2, torch.ones(40, 1, dtype=torch.float64)], 1), y4).solution
        torch.testing.assert_close(small[4].weight, sol4[:-1].T, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(small[4].bias, sol4[-1], rtol=1e-8, atol=1e-10)


def test_conv_tuning_solves_the_normal_equations():
    model, x, y = conv_case()
    x = torch.randn(30, 2, 12, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    removed = {"c1": torch.tensor([0, 3]), "c2": torch.tensor([2])}
    small = shrink_model(copy.deepcopy(model), groups, removed)
    tune_layers(model, small, groups, removed, [(x[:10],), (x[10:],)], damping=0.0)
    # the re-fitted c2 minimizes ||c2'(x̃) - c2(x)[kept]||²: its gradient vanishes
    cap = {}
    hk = small.c2.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        small(x)
    hk.remove()
    target = model.c2(model.pool(torch.relu(model.bn(model.c1(x)))))[:, [0, 1, 3]].detach()
    loss = ((small.c2(cap["x"]) - target) ** 2).sum()
    gw, gb = torch.autograd.grad(loss, [small.c2.weight, small.c2.bias])
    assert float(gw.abs().max()) < 1e-8 * float(loss.detach()) + 1e-9
    assert float(gb.abs().max()) < 1e-8 * float(loss.detach()) + 1e-9
    # and it is better than the untuned slice
    untuned = shrink_model(copy.deepcopy(model), groups, removed)
    with torch.no_grad():
        base = ((untuned.c2(cap["x"]) - target) ** 2).sum()
    assert float(loss) < float(base)


def test_downstream_tuning_refits_every_later_layer_by_lstsq():
    model, _, _ = mlp_case()
    x = torch.randn(40, 5, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    removed = {"0": torch.tensor([1, 3]), "2": torch.zeros(0, dtype=torch.long)}
    keep0 = torch.tensor([0, 2, 4, 5, 6])
    small = shrink_model(copy.deepcopy(model), groups, removed)
    only = tune_layers(model, copy.deepcopy(small), groups, removed, x, damping=0.0)
    assert only == ["2"]  # the consumer of the pruned group only
    tuned = tune_layers(model, small, groups, removed, x, damping=0.0, scope="downstream")
    assert tuned == ["2", "4"]  # and the output layer after it
    one = torch.ones(40, 1, dtype=torch.float64)
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        xt = torch.cat([h[:, keep0], one], 1)
        sol2 = torch.linalg.lstsq(xt, model[2](h)).solution
        torch.testing.assert_close(small[2].weight, sol2[:-1].T, rtol=1e-8, atol=1e-10)
        # layer 4 sees the re-fitted layer 2's output and matches the original logits
        x4 = torch.cat([torch.tanh(xt @ sol2), one], 1)
        sol4 = torch.linalg.lstsq(x4, model(x)).solution
        torch.testing.assert_close(small[4].weight, sol4[:-1].T, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(small[4].bias, sol4[-1], rtol=1e-8, atol=1e-10)


def test_tuning_targets_survive_an_in_place_activation():
    """The re-fit targets are recorded in one forward of the original model: a
    ReLU(inplace=True) after a layer must not change its stored output (it did: the
    targets became relu'd and the re-fit silently fitted them). Layer 2's weights solve
    lstsq against its own pre-activation output, rows kept."""
    torch.manual_seed(41)

    def net(inplace):
        return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=inplace), nn.Linear(7, 6),
                             nn.ReLU(inplace=inplace), nn.Linear(6, 3)).double()

    model = net(True)
    plain = net(False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(40, 5, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    # layer 2 keeps every output (no row selection copies its recorded output)
    removed = {"0": torch.tensor([1, 3]), "2": torch.zeros(0, dtype=torch.long)}
    keep0 = torch.tensor([0, 2, 4, 5, 6])
    small = shrink_model(copy.deepcopy(model), groups, removed)
    assert tune_layers(model, small, groups, removed, x, damping=0.0) == ["2"]
    with torch.no_grad():
        h = torch.relu(plain[0](x))
        xt = torch.cat([h[:, keep0], torch.ones(40, 1, dtype=torch.float64)], 1)
        sol2 = torch.linalg.lstsq(xt, plain[2](h)).solution
    torch.testing.assert_close(small[2].weight, sol2[:-1].T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(small[2].bias, sol2[-1], rtol=1e-8, atol=1e-10)
    small_plain = shrink_model(copy.deepcopy(plain), groups, removed)
    tune_layers(plain, small_plain, groups, removed, x, damping=0.0)
    for a, b in zip(small.parameters(), small_plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _mask_fit_reference(layer_w, layer_b, x_rows, y, per):
    """Least-squares scales of column blocks, from the explicit design: the column of
    structure s is vec(X_s W_sᵀ), the target vec(Y - b) (dense lstsq)."""
    k = x_rows.shape[1] // per
    cols = []
    for s in range(k):
        sl = slice(s * per, (s + 1) * per)
        cols.append((x_rows[:, sl] @ layer_w[:, sl].T).flatten())
    design = torch.stack(cols, 1)
    target = (y - (0 if layer_b is None else layer_b)).flatten()
    return torch.linalg.lstsq(design, target[:, None]).solution.flatten()


def test_mask_tuning_matches_dense_lstsq_linear():
    model, _, _ = mlp_case()
    x = torch.randn(30, 5, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    removed = {"0": torch.tensor([1, 3]), "2": torch.tensor([0])}
    small = shrink_model(copy.deepcopy(model), groups, removed)
    before = copy.deepcopy(small)
    tuned = tune_layers(model, small, groups, removed, [(x[:12],), (x[12:],)], damping=0.0, fit="masks")
    assert tuned == ["2", "4"]
    with torch.no_grad():
        h = torch.tanh(before[0](x))  # layer 2's input (layer 0 is not changed)
        want = _mask_fit_reference(before[2].weight, before[2].bias, h, model[2](torch.tanh(model[0](x)))[:, 1:], 1)
        got = small[2].weight / before[2].weight
        torch.testing.assert_close(got, want[None, :].expand_as(got), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(small[2].bias, before[2].bias)  # bias kept
        h4 = torch.tanh(small[2](h))
        want4 = _mask_fit_reference(before[4].weight, before[4].bias, h4, model(x), 1)
        torch.testing.assert_close(small[4].weight / before[4].weight, want4[None, :].expand(4, -1), rtol=1e-7, atol=1e-9)


def test_tuning_solves_a_singular_calibration_gram():
    """A kept neuron that is silent on the calibration set (zero weights and bias: its
    input column is 0) makes the Gram rank-deficient; without damping both fits still
    reach the least-squares optimum: the fitted outputs of a dense lstsq on the design
    without the silent column (the silent neuron's coefficient is not determined, so
    outputs are compared)."""
    model, _, _ = mlp_case()
    with torch.no_grad():
        model[0].weight[4] = 0.0
        model[0].bias[4] = 0.0
    x = torch.randn(30, 5, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    removed = {"0": torch.tensor([1, 3]), "2": torch.zeros(0, dtype=torch.long)}
    small = shrink_model(copy.deepcopy(model), groups, removed)
    with torch.no_grad():
        h = torch.tanh(small[0](x))
        assert bool((h[:, 2] == 0).all())  # the silent neuron (index 4, kept as the 3rd)
        gram = h.T @ h
        assert int(torch.linalg.matrix_rank(gram)) < gram.shape[0]
        y = model[2](torch.tanh(model[0](x)))
        live = torch.tensor([0, 1, 3, 4])
        w, b = small[2].weight, small[2].bias
        # masks: one scale per live column, target Y - b
        design = torch.stack([(h[:, [s]] @ w[:, [s]].T).flatten() for s in live.tolist()], 1)
        scales = torch.linalg.lstsq(design, (y - b).flatten()[:, None]).solution.flatten()
        want_masks = (h[:, live] * scales) @ w[:, live].T + b
        # weights: [h_live, 1] -> Y
        xt = torch.cat([h[:, live], torch.ones(30, 1, dtype=torch.float64)], 1)
        want_weights = xt @ torch.linalg.lstsq(xt, y).solution
    for fit, want in (("weights", want_weights), ("masks", want_masks)):
        tuned = copy.deepcopy(small)
        tune_layers(model, tuned, groups, removed, x, damping=0.0, fit=fit)
        assert torch.isfinite(tuned[2].weight).all()
        with torch.no_grad():
            torch.testing.assert_close(tuned[2](h), want, rtol=1e-7, atol=1e-9)


def test_mask_tuning_matches_dense_lstsq_conv_and_heads():
    model, _, _ = conv_case()
    x = torch.randn(20, 2, 12, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    removed = {"c1": torch.tensor([0, 3]), "c2": torch.zeros(0, dtype=torch.long)}
    small = shrink_model(copy.deepcopy(model), groups, removed)
    before = copy.deepcopy(small)
    tune_layers(model, small, groups, removed, x, damping=0.0, fit="masks")
    with torch.no_grad():
        xin = before.pool(torch.relu(before.bn(before.c1(x))))
        rows = F.unfold(F.pad(xin, (1, 1)).unsqueeze(-2), (1, 3), stride=(1, 2))  # (N, 3*3, L)
        rows = rows.transpose(1, 2).reshape(-1, rows.shape[1])
        y = model.c2(model.pool(torch.relu(model.bn(model.c1(x)))))
        y = y.flatten(2).transpose(1, 2).reshape(-1, 4)
        want = _mask_fit_reference(before.c2.weight.flatten(1), before.c2.bias, rows, y, 3)
        got = (small.c2.weight / before.c2.weight)[0, :, 0]
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    # attention heads: the output projection's head blocks of head_dim columns
    enc, batch, _ = encoder_case()
    groups, _ = find_groups(enc, batch)
    head = next(g for g in groups if g.kind == "head")
    removed = {g.name: (torch.tensor([1]) if g is head else torch.zeros(0, dtype=torch.long)) for g in groups}
    small = shrink_model(copy.deepcopy(enc), groups, removed)
    before = copy.deepcopy(small)
    tuned = tune_layers(enc, small, groups, removed, batch, damping=0.0, fit="masks")
    name = f"{head.consumer}.out_proj"
    assert tuned == [name]
    cap = {}
    hooks = [
        before.get_submodule(name).register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0])),
        enc.get_submodule(name).register_forward_hook(lambda m, a, o: cap.__setitem__("y", o)),
    ]
    with torch.no_grad():
        before(**batch)
        enc(**batch)
    for h in hooks:
        h.remove()
    w_b = before.get_submodule(name).weight
    d = head.head_dim
    real = batch["attention_mask"].reshape(-1) != 0  # padded tokens are left out
    want = _mask_fit_reference(
        w_b, before.get_submodule(name).bias, cap["x"].reshape(-1, w_b.shape[1])[real],
        cap["y"].reshape(-1, w_b.shape[0])[real], d,
    )
    got = (small.get_submodule(name).weight / w_b)[0].view(-1, d)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_downstream_refit_of_an_encoder_with_heads_pruned_in_two_layers():
    """Heads removed in both layers of a 2-layer encoder (and feed-forward neurons in the
    second): before tuning the shrunken model computes what the masked model computes;
    the downstream re-fit equals a sequence of dense (ridge) lstsq fits, layer by layer
    in call order from the first layer's output projection on (layer 1's q/k/v on their
    kept rows, the classifier head included), each on the real tokens of the already
    re-fitted model's inputs against the original model's outputs."""
    enc, batch, _ = encoder_case(12, ((1, 4), (3, 2), (8, 5)))
    mask = batch["attention_mask"]
    groups, _ = find_groups(enc, batch)
    heads = [g for g in groups if g.kind == "head"]
    assert [g.consumer for g in heads] == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    removed = {g.name: torch.zeros(0, dtype=torch.long) for g in groups}
    removed[heads[0].name] = torch.tensor([0])
    removed[heads[1].name] = torch.tensor([1])
    removed["enc.layers.1.linear1"] = torch.tensor([2, 7, 11])
    small = shrink_model(copy.deepcopy(enc), groups, removed)
    masks = {g.name: torch.ones(g.size, dtype=torch.float64) for g in groups}
    for name, rem in removed.items():
        masks[name][rem] = 0.0
    with torch.no_grad(), apply_masks_to(enc, groups, masks):
        masked = enc(**batch)
    with torch.no_grad():
        torch.testing.assert_close(small(**batch), masked, rtol=1e-10, atol=1e-12)

    ref = copy.deepcopy(small)
    tuned = tune_layers(enc, small, groups, removed, batch, damping=1e-4, scope="downstream")
    attn = [f"enc.layers.{i}.self_attn" for i in (0, 1)]
    want_order = [
        f"{attn[0]}.out_proj", "enc.layers.0.linear1", "enc.layers.0.linear2",
        *[f"{attn[1]}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
        "enc.layers.1.linear1", "enc.layers.1.linear2", "head",
    ]
    assert tuned == want_order
    kept_q1 = torch.tensor([0, 1, 2, 3])  # head 1 of layer 1 removed: head 0's 4 rows kept
    kept_ff1 = torch.tensor([i for i in range(16) if i not in (2, 7, 11)])
    rows = {**{f"{attn[1]}.{p}": kept_q1 for p in ("q_proj", "k_proj", "v_proj")},
            "enc.layers.1.linear1": kept_ff1}
    real = mask.reshape(-1) != 0

    def io(model, name, output):
        cap = {}
        h = model.get_submodule(name).register_forward_hook(
            lambda m, a, o: cap.update(x=a[0], y=o)
        )
        with torch.no_grad():
            model(**batch)
        h.remove()
        t = cap["y" if output else "x"]
        t = t.reshape(-1, t.shape[-1])
        return t[real] if len(t) == len(real) else t  # token rows: the real ones

    for name in want_order:
        x = io(ref, name, output=False)
        y = io(enc, name, output=True)
        if name in rows:
            y = y[:, rows[name]]
        xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        # ridge ε = damping · mean diag(X̃ᵀX̃) as stacked rows √ε I -> 0 (a LayerNorm output
        # and the ones column are linearly dependent: without it the fit is not unique)
        eps = 1e-4 * float((xt**2).sum(0).mean())
        n = xt.shape[1]
        aug = torch.cat([xt, eps**0.5 * torch.eye(n, dtype=x.dtype)])
        sol = torch.linalg.lstsq(aug, torch.cat([y, torch.zeros(n, y.shape[1], dtype=y.dtype)])).solution
        lin = ref.get_submodule(name)
        with torch.no_grad():
            lin.weight.copy_(sol[:-1].T)
            lin.bias.copy_(sol[-1])
        got = small.get_submodule(name)
        torch.testing.assert_close(got.weight, lin.weight, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got.bias, lin.bias, rtol=1e-6, atol=1e-8)


def test_tuning_leaves_padding_out():
    """With an attention mask, the re-fit of a token-wise Linear uses the real tokens only:
    it equals lstsq on the unpadded rows."""
    enc, batch, _ = encoder_case()
    groups, _ = find_groups(enc, batch)
    ff = next(g for g in groups if g.kind == "neuron")
    removed = {
        g.name: (torch.tensor([0, 3, 5]) if g is ff else torch.zeros(0, dtype=torch.long))
        for g in groups
    }
    small = shrink_model(copy.deepcopy(enc), groups, removed)
    before = copy.deepcopy(small)
    tune_layers(enc, small, groups, removed, batch, damping=0.0)
    cap = {}
    hooks = [
        before.get_submodule(ff.consumer).register_forward_pre_hook(
            lambda m, a: cap.__setitem__("x", a[0])
        ),
        enc.get_submodule(ff.consumer).register_forward_hook(lambda m, a, o: cap.__setitem__("y", o)),
    ]
    with torch.no_grad():
        before(**batch)
        enc(**batch)
    for h in hooks:
        h.remove()
    real = batch["attention_mask"].reshape(-1) != 0
    assert not bool(real.all())
    xr = cap["x"].reshape(-1, cap["x"].shape[-1])[real]
    xr = torch.cat([xr, torch.ones(len(xr), 1, dtype=xr.dtype)], 1)
    sol = torch.linalg.lstsq(xr, cap["y"].reshape(-1, cap["y"].shape[-1])[real]).solution
    lin = small.get_submodule(ff.consumer)
    torch.testing.assert_close(lin.weight, sol[:-1].T, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(lin.bias, sol[-1], rtol=1e-7, atol=1e-9)


def test_prune_structured_downstream_and_mask_fits():
    """The fits reached through prune_structured: the same structures are removed, the
    re-fitted layers are the ones the scope names, and each fit lowers the reconstruction
    error of the first re-fitted layer (its least-squares objective) below the plain one."""
    model, _, _ = mlp_case()
    torch.manual_seed(0)
    x = torch.randn(60, 5, dtype=torch.float64)
    y = model(x).argmax(-1).detach()
    plain, rep0 = natgrad.prune_structured(model, (x, y), params=0.6, tune=False, measure=False)
    first = "2" if rep0.removed["0"] else "4"
    keep = [i for i in range(model[2].out_features) if i not in rep0.removed["2"]]

    def error(m):
        h = torch.tanh(m[0](x))
        out = m[2](h) if first == "2" else m(x)
        ref = model[2](torch.tanh(model[0](x)))[:, keep] if first == "2" else model(x)
        return float(((out - ref) ** 2).sum())

    for scope, fit in (("consumers", "masks"), ("downstream", "weights")):
        small, rep = natgrad.prune_structured(
            model, (x, y), params=0.6, tune_scope=scope, tune_fit=fit, measure=False,
        )
        assert rep.removed == rep0.removed
        assert rep.tuned_layers[0] == first
        assert ("4" in rep.tuned_layers) == (scope == "downstream" or bool(rep0.removed["2"]))
        with torch.no_grad():
            assert error(small) < error(plain)


def test_tuning_options_are_checked():
    model, x, _ = mlp_case()
    groups, _ = find_groups(model, x)
    removed = {"0": torch.tensor([1]), "2": torch.zeros(0, dtype=torch.long)}
    small = shrink_model(copy.deepcopy(model), groups, removed)
    with pytest.raises(ValueError, match="Unknown scope 'all'"):
        tune_layers(model, small, groups, removed, x, scope="all")
    with pytest.raises(ValueError, match="Unknown fit 'scales'"):
        tune_layers(model, small, groups, removed, x, fit="scales")
    with pytest.raises(ValueError, match="scope='consumers'"):
        tune_layers(model, small, groups, removed, x, fit="masks", scope="downstream")


# -- search ---------------------------------------------------------------------------------------


def test_greedy_removes_lowest_scores_under_linear_cost():
    cost = CostModel([(10.0, ("a",)), (5.0, ())], [], {"a": 10})
    scores = {"a": torch.tensor([5.0, 1.0, 9.0, 0.5, 3.0, 8.0, 2.0, 7.0, 6.0, 4.0])}
    removed = greedy_search(scores, cost, kind="flops", keep=0.6, min_keep={"a": 1})
    # 10 k + 5 <= 63  ->  k <= 5 kept: the five lowest scores go
    assert removed["a"].tolist() == [1, 3, 4, 6, 9]


def test_greedy_weighs_score_by_cost_saved():
    cost = CostModel([(1.0, ("a",)), (100.0, ("b",))], [], {"a": 4, "b": 4})
    scores = {"a": torch.ones(4), "b": torch.full((4,), 5.0)}
    removed = greedy_search(scores, cost, kind="flops", keep=0.76, min_keep={"a": 1, "b": 1})
    # b saves 100 per structure for a score of 5 (0.05 per FLOP); a saves 1 for 1
    assert len(removed["b"]) == 1 and len(removed["a"]) == 0


def test_greedy_respects_min_keep_and_budget():
    model, x, y = conv_case()
    groups, _ = find_groups(model, x)
    cost = build_cost_model(model, groups, x)
    scores = {g.name: torch.rand(g.size) for g in groups}
    removed = greedy_search(scores, cost, kind="params", keep=0.5, min_keep={"c1": 2, "c2": 2})
    kept = {g.name: g.size - len(removed[g.name]) for g in groups}
    assert min(kept.values()) >= 2
    assert cost.total("params", kept) <= 0.5 * cost.total("params")
    with pytest.raises(BudgetError, match="out of reach"):
        greedy_search(scores, cost, kind="params", keep=0.05, min_keep={"c1": 2, "c2": 2})


def test_rearrange_reaches_a_swap_local_optimum():
    torch.manual_seed(0)
    a = torch.randn(8, 8, dtype=torch.float64)
    f = a @ a.T + torch.randn(8, 1, dtype=torch.float64) @ torch.randn(1, 8, dtype=torch.float64) * 0
    f = f + 3 * torch.outer(torch.ones(8), torch.ones(8)).double() * 0.1
    start = torch.tensor([0, 1, 2])

    def obj(idx):
        return float(f[idx][:, idx].sum())

    out = rearrange(f, start)
    assert out.numel() == 3 and obj(out) <= obj(start) + 1e-12
    inr = set(out.tolist())
    for i, j in itertools.product(sorted(inr), sorted(set(range(8)) - inr)):
        swapped = torch.tensor(sorted((inr - {i}) | {j}))
        assert obj(swapped) >= obj(out) - 1e-10


# -- the entry point ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlp", "conv1d", "encoder", "bert", "gpt2"])
def test_prune_structured_end_to_end(case):
    model, x, y = CASES[case]()
    data = _batch(x, y)
    before = copy.deepcopy(model.state_dict())
    small, rep = natgrad.prune_structured(model, data, flops=0.6, tune=False, measure=False)
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert rep.flops_after <= 0.6 * rep.flops_before + 1e-9
    assert rep.flops_after == count_flops(small, data)
    assert all(p.dtype == torch.float64 for p in small.parameters())
    # before tuning, the shrunken model is the masked model
    groups, _ = find_groups(model, data)
    call = _caller(x)
    want = masked_output(model, data, rep.removed, x)
    ce_masked = float(F.cross_entropy(want, y))
    with torch.no_grad():
        ce_dense = float(F.cross_entropy(call(model), y))
    torch.testing.assert_close(call(small), want, rtol=1e-10, atol=1e-12)
    assert rep.measured_loss_increase == pytest.approx(ce_masked - ce_dense, rel=1e-9, abs=1e-12)
    fisher = estimate_mask_fisher(model, groups, data)
    removed = {k: torch.tensor(v, dtype=torch.long) for k, v in rep.removed.items()}
    assert rep.predicted_loss_increase == pytest.approx(fisher.predicted_increase(removed), rel=1e-9)



def _mha_encoder_case():
    """TinyEncoder with its nn.MultiheadAttention left as is (prune_structured converts it)."""
    torch.manual_seed(3)
    model = TinyEncoder().double().eval()
    ids, y = torch.randint(0, 13, (5, 6)), torch.randint(0, 3, (5,))
    return model, {"input_ids": ids}, y


@pytest.mark.parametrize("case", ["mlp", "conv1d", "mha_encoder", "bert", "gpt2"])
def test_prune_structured_keeps_frozen_parameters_frozen(case):
    # the rebuilt Linear/Conv/BatchNorm/attention modules came back with requires_grad=True
    if case in ("bert", "gpt2"):
        pytest.importorskip("transformers")
    model, x, y = _mha_encoder_case() if case == "mha_encoder" else CASES[case]()
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(head + "."))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    small, rep = natgrad.prune_structured(model, _batch(x, y), flops=0.6, measure=False)
    assert any(k < n for k, n in rep.kept.values())  # something was pruned
    assert {n for n, p in small.named_parameters() if p.requires_grad} == trainable

def test_prune_structured_tunes_and_budgets_params():
    torch.manual_seed(0)
    model = mlp((6, 20, 20, 3), act=nn.ReLU).double()
    x = torch.randn(120, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (120,))
    small, rep = natgrad.prune_structured(model, (x, y), params=0.5, measure=False)
    assert rep.params_after <= 0.5 * rep.params_before
    assert rep.params_after == count_params(small)
    assert rep.tuned_layers == ["2", "4"]
    # tuning reconstructs the layer outputs better than the plain slice
    _, plain = natgrad.prune_structured(model, (x, y), params=0.5, tune=False, measure=False)
    assert plain.removed == rep.removed
    out_t, out_p, out_d = small(x), None, model(x)
    untuned = natgrad.prune_structured(model, (x, y), params=0.5, tune=False, measure=False)[0]
    out_p = untuned(x)
    assert float(((out_t - out_d) ** 2).sum()) < float(((out_p - out_d) ** 2).sum())


def test_prune_structured_criteria_and_latency_report():
    model, x, y = conv_case()
    for criterion in ("magnitude", "random"):
        small, rep = natgrad.prune_structured(
            model, (x, y), flops=0.5, criterion=criterion, latency_repeats=2
        )
        assert rep.criterion == criterion and rep.flops_after <= 0.5 * rep.flops_before
        assert set(rep.latency_before) == set(rep.latency_after) == {1, 32}
        assert all(v > 0 for v in rep.speedup.values())
        assert "FLOPs" in str(rep)


def test_magnitude_criterion_orders_by_l1():
    torch.manual_seed(0)
    model = mlp((4, 6, 3), act=nn.ReLU).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 7, dtype=torch.float64)[:, None].expand(6, 4))
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    _, rep = natgrad.prune_structured(
        model, (x, y), flops=0.5, criterion="magnitude", measure=False, tune=False
    )
    k = len(rep.removed["0"])
    assert rep.removed["0"] == list(range(k)) and k > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models(dtype):
    torch.manual_seed(0)
    model = mlp((6, 16, 3), act=nn.ReLU).to(dtype)
    x = torch.randn(50, 6).to(dtype)
    y = torch.randint(0, 3, (50,))
    small, rep = natgrad.prune_structured(model, (x, y), flops=0.5, measure=False)
    assert all(p.dtype == dtype for p in small.parameters())
    assert small[0].out_features < 16 and torch.isfinite(small(x).float()).all()


def test_latency_budget_bisects_over_flops(monkeypatch):
    # a deterministic stand-in for the clock: "latency" = 1 µs per parameter
    import natgrad.pruning.structured as st

    def fake_latency(models, batch, sizes, repeats=20):
        one = lambda m: {b: 1e-6 * count_params(m) for b in sizes}  # noqa: E731
        return [one(m) for m in models] if isinstance(models, list) else one(models)

    monkeypatch.setattr(st, "measure_latency", fake_latency)
    torch.manual_seed(0)
    model = mlp((6, 30, 30, 3), act=nn.ReLU).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    small, rep = natgrad.prune_structured(model, (x, y), latency=0.5, tune=False)
    assert rep.budget == ("latency", 0.5)
    assert rep.latency_after[32] <= 0.5 * rep.latency_before[32]
    # bisection keeps the largest FLOPs budget that fits: a bit more FLOPs would not fit
    assert rep.latency_after[32] > 0.4 * rep.latency_before[32]
    with pytest.raises(BudgetError, match="latency budget"):
        natgrad.prune_structured(model, (x, y), latency=0.001, tune=False, min_keep=0.5)


def test_conv1d_conversion_keeps_the_function():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(7)
    cfg = GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=8, num_labels=2,
                     pad_token_id=0, bos_token_id=1, eos_token_id=1, use_cache=False)
    model = GPT2ForSequenceClassification(cfg).double().eval()
    ids = torch.randint(1, 30, (3, 5))
    want = model(input_ids=ids).logits
    conv = copy.deepcopy(model)
    convert_attention(conv)
    assert isinstance(conv.transformer.h[0].attn.c_attn, nn.Linear)
    torch.testing.assert_close(conv(input_ids=ids).logits, want, rtol=1e-12, atol=1e-12)


class StringPadConv(nn.Module):
    """Conv1d layers with padding="same" (an even kernel: asymmetric padding) and "valid"."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding="same")
        self.c2 = nn.Conv1d(6, 5, 4, padding="same", dilation=2)
        self.c3 = nn.Conv1d(5, 4, 3, padding="valid")
        self.fc = nn.Linear(4 * 8, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(torch.relu(self.c3(h)).flatten(1))


def test_string_padding_convs_shrink_and_tune():
    torch.manual_seed(7)
    model = StringPadConv().double().eval()
    x = torch.randn(30, 2, 10, dtype=torch.float64)
    groups, _ = find_groups(model, x)
    assert [g.name for g in groups] == ["c1", "c2", "c3"]
    removed = {"c1": torch.tensor([0, 4]), "c2": torch.tensor([1, 2]), "c3": torch.tensor([3])}
    masks = {}
    for g in groups:
        m = torch.ones(g.size, dtype=torch.float64)
        m[removed[g.name]] = 0
        masks[g.name] = m
    small = shrink_model(copy.deepcopy(model), groups, removed)
    with torch.no_grad(), apply_masks_to(model, groups, masks):
        want = model(x)
    torch.testing.assert_close(small(x), want, rtol=1e-10, atol=1e-12)
    assert small.c2.padding == "same" and small.c3.padding == "valid"
    # the design rows reproduce the convolutions (asymmetric "same" padding included)
    from natgrad.pruning.shrink import design_rows

    for conv, inp in ((model.c2, torch.relu(model.c1(x))), (model.c3, torch.randn(4, 5, 10).double())):
        rows = design_rows(conv, inp.detach())
        w = torch.cat([conv.weight.flatten(1), conv.bias[:, None]], 1)
        got = (rows @ w.T).view(inp.shape[0], -1, conv.out_channels).transpose(1, 2)
        torch.testing.assert_close(got, conv(inp).detach(), rtol=1e-10, atol=1e-12)
    # tuning the "same" conv c2: the least-squares gradient vanishes at the re-fitted weights
    tune_layers(model, small, groups, removed, x, damping=0.0)
    cap = {}
    hk = small.c2.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        small(x)
    hk.remove()
    target = model.c2(torch.relu(model.c1(x)))[:, [0, 3, 4]].detach()
    loss = ((small.c2(cap["x"]) - target) ** 2).sum()
    gw, gb = torch.autograd.grad(loss, [small.c2.weight, small.c2.bias])
    assert float(gw.abs().max()) < 1e-8 * float(loss.detach()) + 1e-9
    assert float(gb.abs().max()) < 1e-8 * float(loss.detach()) + 1e-9


# -- knapsack, removal curves, compensated (OBS) curves -------------------------------------------


def test_nested_order_takes_the_cheapest_block_increase():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    f = a @ a.T
    order, values = natgrad.pruning.search.nested_order(f)
    assert sorted(order.tolist()) == list(range(6))
    chosen: list[int] = []
    for k in range(6):
        # brute force: the next index is the one whose addition gives the smallest 1ᵀF_RR1
        def quad(r):
            idx = torch.tensor(r, dtype=torch.long)
            return 0.5 * float(f[idx][:, idx].sum())

        best = min((i for i in range(6) if i not in chosen), key=lambda i: quad([*chosen, i]))
        assert int(order[k]) == best
        chosen.append(best)
        assert float(values[k + 1]) == pytest.approx(quad(chosen), rel=1e-12)


def test_knapsack_is_optimal_for_separable_costs():
    from natgrad.pruning.search import knapsack_search

    gen = torch.Generator().manual_seed(3)
    sizes = {"a": 4, "b": 5, "c": 3}
    per = {"a": 3.0, "b": 5.0, "c": 7.0}
    cost = CostModel([(per[g], (g,)) for g in sizes] + [(10.0, ())], [], sizes)
    curves = {}
    for g, s in sizes.items():
        inc = torch.rand(s, generator=gen, dtype=torch.float64) * torch.rand(1, generator=gen).item()
        curves[g] = (torch.randperm(s, generator=gen), torch.cat([torch.zeros(1, dtype=torch.float64), inc.cumsum(0)]))
    mins = {"a": 1, "b": 1, "c": 0 + 1}
    full = cost.total("flops")
    for keep in (0.9, 0.7, 0.55):
        target = keep * full
        best = math_inf = float("inf")
        for js in itertools.product(*(range(sizes[g] - mins[g] + 1) for g in sizes)):
            kept = {g: sizes[g] - j for g, j in zip(sizes, js, strict=True)}
            if cost.total("flops", kept) <= target + 1e-9:
                val = sum(float(curves[g][1][j]) for g, j in zip(sizes, js, strict=True))
                best = min(best, val)
        assert best < math_inf
        removed = knapsack_search(curves, cost, kind="flops", keep=keep, min_keep=mins, bins=4000)
        kept = {g: sizes[g] - len(removed[g]) for g in sizes}
        assert cost.total("flops", kept) <= target + 1e-9
        got = sum(float(curves[g][1][len(removed[g])]) for g in sizes)
        assert got == pytest.approx(best, rel=1e-9)
        for g in sizes:  # the removed are the first ones of each curve's order
            assert sorted(removed[g].tolist()) == sorted(curves[g][0][: len(removed[g])].tolist())


def test_knapsack_meets_coupled_budgets_and_minimums():
    from natgrad.pruning.search import curve_greedy_search, knapsack_search

    model, x, y = mlp_case()
    groups, _ = find_groups(model, x)
    cost = build_cost_model(model, groups, x)
    gen = torch.Generator().manual_seed(0)
    curves = {}
    for g in groups:
        inc = torch.rand(g.size, generator=gen, dtype=torch.float64)
        curves[g.name] = (torch.randperm(g.size, generator=gen), torch.cat([torch.zeros(1, dtype=torch.float64), inc.cumsum(0)]))
    mins = {g.name: 2 for g in groups}
    for keep in (0.8, 0.5):
        for fn in (knapsack_search, curve_greedy_search):
            removed = fn(curves, cost, kind="flops", keep=keep, min_keep=mins)
            kept = {g.name: g.size - len(removed[g.name]) for g in groups}
            assert cost.total("flops", kept) <= keep * cost.total("flops") * (1 + 1e-12)
            assert all(kept[g] >= 2 for g in kept)
    with pytest.raises(BudgetError, match="out of reach"):
        knapsack_search(curves, cost, kind="flops", keep=0.01, min_keep=mins)


def _kfac_reference(model, layer, x, y):
    """A = mean of the layer's design rows [x̃, 1][x̃, 1]ᵀ (unfolded patches for a conv);
    G = (1/N) Σ_n Σ_t g_nt g_ntᵀ from a per-sample loop (g = ∂l_n/∂ layer output)."""
    from natgrad.pruning.shrink import design_rows

    ins, gs = [], []
    for n in range(x.shape[0]):
        cap = {}
        h = layer.register_forward_hook(lambda m, a, o, cap=cap: cap.update(x=a[0], y=o))
        out = model(x[n : n + 1])
        h.remove()
        loss = F.cross_entropy(out, y[n : n + 1], reduction="sum")
        (g,) = torch.autograd.grad(loss, cap["y"])
        ins.append(design_rows(layer, cap["x"].detach()))
        gs.append(g.detach()[0].reshape(g.shape[1], -1).T)  # (positions, out)
    xa, ga = torch.cat(ins), torch.cat(gs)
    return xa.T @ xa / len(xa), ga.T @ ga / len(x)


@pytest.mark.parametrize("case", ["mlp", "conv1d"])
def test_compensated_curves_match_brute_force_obs(case):
    from natgrad.pruning.shrink import compensated_curves

    model, x, _ = CASES[case]()
    torch.manual_seed(1)
    x = torch.randn(40, *x.shape[1:], dtype=torch.float64)
    y = torch.randint(0, 3 if case == "conv1d" else 4, (40,))
    groups, _ = find_groups(model, x)
    groups = [g for g in groups if g.consumer_kind != "linear" or case == "mlp"]
    curves = compensated_curves(model, groups, (x, y), damping=0.0)
    for g in groups:
        layer = model.get_submodule(g.consumer)
        a, gm = _kfac_reference(model, layer, x, y)
        w = torch.cat([layer.weight.reshape(layer.weight.shape[0], -1), layer.bias[:, None]], 1).detach()
        per = (w.shape[1] - 1) // g.size  # columns of one structure (a channel's kernel)

        def increase(removed, w=w, a=a, gm=gm, per=per):
            return _obs_increase(w, a, gm, per, removed)

        order, values = curves[g.name]
        first = min(range(g.size), key=lambda s: increase([s]))
        assert int(order[0]) == first
        for k in (1, 2, 3):
            assert float(values[k]) == pytest.approx(increase(order[:k].tolist()), rel=1e-7)


def _obs_increase(w, a, gm, per, removed):
    """½ tr(G D A Dᵀ) for the best change D of W with D[:, R] = -W[:, R] (closed form
    D_K = W_R A_RK A_KK⁻¹), R the columns of the structures ``removed``."""
    n = w.shape[1]
    r = torch.tensor([s * per + i for s in removed for i in range(per)], dtype=torch.long)
    k = torch.tensor([i for i in range(n) if i not in set(r.tolist())], dtype=torch.long)
    d = torch.zeros_like(w)
    d[:, r] = -w[:, r]
    d[:, k] = w[:, r] @ a[r][:, k] @ torch.linalg.inv(a[k][:, k])
    return 0.5 * float(torch.trace(gm @ d @ a @ d.T))


def test_compensated_curves_leave_padded_tokens_out():
    """With an attention mask, A and G of the layer reading the structures come from the
    real tokens only: the curves match OBS on factors built by hand from a per-sample loop
    over the unpadded tokens (A with the same ridge: a dead ReLU makes it singular)."""
    from natgrad.pruning.shrink import compensated_curves

    enc, batch, y = encoder_case()
    mask = batch["attention_mask"]
    assert not bool((mask != 0).all())
    groups, _ = find_groups(enc, batch)
    curves = compensated_curves(enc, groups, {**batch, "labels": y}, damping=1e-3)
    for g in groups:
        name = f"{g.consumer}.out_proj" if g.kind == "head" else g.consumer
        layer = enc.get_submodule(name)
        rows, gs = [], []
        for n in range(len(y)):
            cap = {}
            h = layer.register_forward_hook(lambda m, a, o, cap=cap: cap.update(x=a[0], y=o))
            out = enc(input_ids=batch["input_ids"][n : n + 1], attention_mask=mask[n : n + 1])
            h.remove()
            (gy,) = torch.autograd.grad(F.cross_entropy(out, y[n : n + 1], reduction="sum"), cap["y"])
            real = mask[n] != 0
            xr = cap["x"].detach()[0][real]
            rows.append(torch.cat([xr, torch.ones(len(xr), 1, dtype=xr.dtype)], 1))
            gs.append(gy[0][real])
        xa, ga = torch.cat(rows), torch.cat(gs)
        a, gm = xa.T @ xa / len(xa), ga.T @ ga / len(y)
        a = a + 1e-3 * a.diagonal().mean() * torch.eye(len(a), dtype=a.dtype)  # the ridge
        w = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
        per = g.head_dim if g.kind == "head" else 1
        order, values = curves[g.name]
        for k in range(1, g.size if g.kind == "head" else 4):
            want = _obs_increase(w, a, gm, per, order[:k].tolist())
            assert float(values[k]) == pytest.approx(want, rel=1e-7, abs=1e-12)
        assert int(order[0]) == min(range(g.size), key=lambda s: _obs_increase(w, a, gm, per, [s]))


@pytest.mark.parametrize(
    "case", ["conv1d", pytest.param("encoder", marks=pytest.mark.slow), pytest.param("bert", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("search", ["greedy", "knapsack"])
def test_compensated_and_knapsack_end_to_end(case, search):
    model, x, y = CASES[case]()
    data = _batch(x, y)
    for criterion, labels in (("compensated", "empirical"), ("compensated", "mc"), ("fisher", "empirical")):
        small, rep = natgrad.prune_structured(
            model, data, flops=0.7, criterion=criterion, search=search, labels=labels,
            tune=False, measure=False, min_keep=1,
        )
        assert rep.flops_after <= 0.7 * rep.flops_before * (1 + 1e-12)
        assert rep.flops_after == count_flops(small, data)
        assert all(k >= 1 for k, _ in rep.kept.values())
        # the shrunken model is the masked model (checked inside); it runs and exports
        call = _caller(x)
        assert torch.isfinite(call(small)).all()


def test_optional_finetune_lowers_the_loss():
    torch.manual_seed(0)
    model = mlp((6, 20, 20, 3), act=nn.ReLU).double()
    x = torch.randn(60, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    _, base = natgrad.prune_structured(model, (x, y), flops=0.4, tune=False, measure=False)
    small, rep = natgrad.prune_structured(
        model, (x, y), flops=0.4, tune=False, measure=False, finetune_steps=30, finetune_lr=1e-2
    )
    assert rep.removed == base.removed
    assert rep.measured_loss_increase < base.measured_loss_increase
    # the reported loss is the fine-tuned model's (independent recomputation)
    with torch.no_grad():
        want = float(F.cross_entropy(small(x), y) - F.cross_entropy(model(x), y))
    assert rep.measured_loss_increase == pytest.approx(want, rel=1e-9)


def test_structured_report_to_dict_round_trips_through_json():
    import json

    torch.manual_seed(0)
    model = mlp((6, 20, 20, 3), act=nn.ReLU).double().eval()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    _, rep = natgrad.prune_structured(model, (x, y), params=0.5, latency_repeats=1)
    assert rep.latency_before and rep.kept and rep.removed
    got = json.loads(json.dumps(rep.to_dict()))
    want = {  # every field by hand: tuples become lists, int keys strings
        "budget": [rep.budget[0], rep.budget[1]],
        "criterion": rep.criterion,
        "flops_before": rep.flops_before,
        "flops_after": rep.flops_after,
        "params_before": rep.params_before,
        "params_after": rep.params_after,
        "latency_before": {str(b): t for b, t in rep.latency_before.items()},
        "latency_after": {str(b): t for b, t in rep.latency_after.items()},
        "predicted_loss_increase": rep.predicted_loss_increase,
        "predicted_loss_increase_diagonal": rep.predicted_loss_increase_diagonal,
        "measured_loss_increase": rep.measured_loss_increase,
        "measured_loss_increase_untuned": rep.measured_loss_increase_untuned,
        "kept": {g: list(kt) for g, kt in rep.kept.items()},
        "removed": {g: list(r) for g, r in rep.removed.items()},
        "skipped": dict(rep.skipped),
        "tuned_layers": list(rep.tuned_layers),
        "seconds": rep.seconds,
    }
    assert got == want


@pytest.mark.parametrize("budget", [{"flops": 1.0}, {"params": 1.0}])
def test_a_budget_that_removes_nothing_returns_an_unchanged_copy(budget):
    # it used to return the model with its attention converted to HeadAttention (outputs
    # off by rounding, a different module tree)
    torch.manual_seed(3)
    model = TinyEncoder().double().eval()
    ids, mask = torch.randint(0, 13, (5, 6)), torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (5,))}
    before = copy.deepcopy(model.state_dict())
    pruned, rep = natgrad.prune_structured(model, batch, measure=False, **budget)
    assert pruned is not model
    assert [type(m) for m in pruned.modules()] == [type(m) for m in model.modules()]
    assert all(not r for r in rep.removed.values()) and rep.tuned_layers == []
    state = pruned.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p is not q for p, q in zip(pruned.parameters(), model.parameters(), strict=True))
    assert torch.equal(pruned(ids, mask), model(ids, mask))
    assert rep.flops_after == rep.flops_before and rep.measured_loss_increase == 0.0


def test_magnitude_scores_of_fused_gpt2_heads_sum_each_heads_q_k_v_rows():
    from natgrad.pruning.structured import magnitude_scores
    from natgrad.pruning.structures import hf_groups

    model, _, _ = gpt2_case()
    groups, _ = hf_groups(model)
    for g in (g for g in groups if g.kind == "head"):
        w = model.get_submodule(g.name).c_attn.weight.detach().abs()  # (3E, E): [q; k; v]
        e, d = w.shape[1], g.head_dim
        hand = torch.stack([
            sum(w[b * e + h * d : b * e + (h + 1) * d].sum() for b in range(3)) for h in range(g.size)
        ]).double()
        torch.testing.assert_close(magnitude_scores(model, groups)[g.name], hand / hand.mean())
