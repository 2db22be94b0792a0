"""Fisher pruning: importance, masks, torch.nn.utils.prune integration, overlap, metrics.

References are independent: element loops in plain Python, sorted lists of
(score, position), Python sets, brute-force per-sample backward loops.
"""

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from natgrad import (
    apply_masks,
    estimate_fisher,
    fisher_importance,
    fisher_pruning_masks,
    make_permanent,
    mask_overlap,
)
from tests.reference import assert_close_dict, ce_sum, loop_grads, random_diag_fisher


def _rand_importance(shapes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def _ranked(scores):
    """Brute force: [(score, tensor index, flat index)] sorted ascending (ties by position)."""
    rows = []
    for t, (_, v) in enumerate(scores.items()):
        rows += [(float(s), t, i) for i, s in enumerate(v.reshape(-1).tolist())]
    return sorted(rows)


# -- importance -----------------------------------------------------------------------


def test_importance_matches_elementwise_formula(mlp_case):
    model, _, _ = mlp_case
    F = random_diag_fisher(model)
    raw = fisher_importance(F, model, normalize=False)
    expected = {}
    for k, p in model.named_parameters():
        vals = [0.5 * f * t * t for f, t in zip(F[k].reshape(-1).tolist(), p.reshape(-1).tolist(), strict=True)]
        expected[k] = torch.tensor(vals, dtype=torch.float64).reshape(p.shape)
    assert_close_dict(raw, expected, rtol=1e-12, atol=0)
    total = sum(float(v.sum()) for v in expected.values())
    norm = fisher_importance(F, model)
    assert_close_dict(norm, {k: v / total for k, v in expected.items()}, rtol=1e-12, atol=0)
    assert abs(sum(float(v.sum()) for v in norm.values()) - 1.0) < 1e-12


def test_importance_does_not_mutate_inputs(mlp_case):
    model, _, _ = mlp_case
    F = random_diag_fisher(model)
    before = (
        {k: v.clone() for k, v in F.items()},
        {k: p.clone() for k, p in model.state_dict().items()},
    )
    fisher_importance(F, model)
    assert_close_dict(F, before[0], rtol=0, atol=0)
    assert_close_dict(model.state_dict(), before[1], rtol=0, atol=0)


def test_importance_of_pruned_model_uses_effective_weight(mlp_case):
    model, x, y = mlp_case
    mask = torch.ones_like(model[0].weight, dtype=torch.bool)
    mask[0, :3] = False
    prune.custom_from_mask(model[0], "weight", mask)
    F = estimate_fisher(model, (x, y))
    assert "0.weight_orig" in F
    imp = fisher_importance(F, model, normalize=False)
    assert "0.weight" in imp and "0.weight_orig" not in imp
    w_eff = model[0].weight_orig.detach() * mask
    expected = 0.5 * F["0.weight_orig"].double() * w_eff**2
    torch.testing.assert_close(imp["0.weight"], expected, rtol=1e-12, atol=0)
    assert (imp["0.weight"][0, :3] == 0).all()
    # a Fisher estimated before pruning (effective names) scores the pruned model too
    before = {"0.weight": F["0.weight_orig"]}
    torch.testing.assert_close(
        fisher_importance(before, model, normalize=False)["0.weight"], expected
    )


def test_importance_errors(mlp_case):
    model, _, _ = mlp_case
    with pytest.raises(ValueError, match="parameters the model lacks: \\['nope'\\]"):
        fisher_importance({"nope": torch.ones(2)}, model)
    with pytest.raises(
        ValueError, match="'0.bias' has shape \\(3,\\) but the parameter has \\(7,\\)"
    ):
        fisher_importance({"0.bias": torch.ones(3)}, model)
    zero = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot be normalized; pass normalize=False"):
        fisher_importance(zero, model)


# -- masks: exact sparsity, ties, min_keep, threshold ----------------------------------

SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (4, 7), "b.bias": (4,)}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.9, 0.99])
def test_global_sparsity_exact_and_lowest(sparsity):
    imp = _rand_importance(SHAPES)
    masks = fisher_pruning_masks(imp, sparsity=sparsity, min_keep=0)
    assert set(masks) == {"a.weight", "b.weight"}  # default: tensors with dim >= 2
    cand = {k: imp[k] for k in masks}
    n = sum(v.numel() for v in cand.values())
    k = int(sparsity * n + 0.5)
    removed = {
        (t, i)
        for t, (_, v) in enumerate(masks.items())
        for i in (~v).reshape(-1).nonzero().reshape(-1).tolist()
    }
    assert len(removed) == k
    assert removed == {(t, i) for _, t, i in _ranked(cand)[:k]}
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == imp[name].shape


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_layer_sparsity_exact_per_tensor(sparsity):
    imp = _rand_importance(SHAPES)
    masks = fisher_pruning_masks(imp, sparsity=sparsity, scope="layer", prune="all", min_keep=0)
    assert set(masks) == set(SHAPES)
    for name, m in masks.items():
        n = m.numel()
        k = int(sparsity * n + 0.5)
        assert int((~m).sum()) == k, name
        lowest = {i for _, _, i in _ranked({name: imp[name]})[:k]}
        assert set((~m).reshape(-1).nonzero().reshape(-1).tolist()) == lowest


def test_rounding_is_half_up():
    imp = {"w": torch.arange(1.0, 5.0).reshape(2, 2)}  # n = 4
    assert int((~fisher_pruning_masks(imp, sparsity=0.375)["w"]).sum()) == 2  # 1.5 -> 2
    assert int((~fisher_pruning_masks(imp, sparsity=0.125)["w"]).sum()) == 1  # 0.5 -> 1


def test_ties_broken_by_position():
    imp = {"x.weight": torch.ones(2, 3), "y.weight": torch.ones(3, 2)}
    masks = fisher_pruning_masks(imp, sparsity=0.5, min_keep=0)
    assert (~masks["x.weight"]).all() and masks["y.weight"].all()  # first 6 positions removed
    again = fisher_pruning_masks({k: v.clone() for k, v in imp.items()}, sparsity=0.5, min_keep=0)
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_min_keep_global_keeps_exact_count():
    imp = {"small.weight": torch.full((2, 3), 1e-9), "big.weight": torch.rand(4, 5) + 1.0}
    n = 6 + 20
    masks = fisher_pruning_masks(imp, sparsity=0.5, min_keep=2)
    assert int(masks["small.weight"].sum()) == 2  # would be emptied without min_keep
    assert sum(int((~m).sum()) for m in masks.values()) == int(0.5 * n + 0.5)
    # the removed big entries are its lowest (13 - 4 = 9 of them)
    removed_big = set((~masks["big.weight"]).reshape(-1).nonzero().reshape(-1).tolist())
    assert removed_big == {i for _, _, i in _ranked({"b": imp["big.weight"]})[:9]}
    plain = fisher_pruning_masks(imp, sparsity=0.5, min_keep=0)
    assert int(plain["small.weight"].sum()) == 0


def test_min_keep_layer_caps_and_global_raises_when_impossible():
    imp = {"w": torch.rand(2, 2), "v": torch.rand(3, 3)}
    masks = fisher_pruning_masks(imp, sparsity=0.95, scope="layer", min_keep=1)
    assert int(masks["w"].sum()) == 1 and int(masks["v"].sum()) == 1
    assert masks["w"].reshape(-1)[imp["w"].reshape(-1).argmax()]  # keeps its most important
    with pytest.raises(ValueError, match="remove 12 of 13 units, but min_keep=2 protects 4"):
        fisher_pruning_masks(imp, sparsity=0.9, min_keep=2)


def test_threshold_global_and_layer():
    imp = _rand_importance(SHAPES, seed=5)
    total = sum(float(v.sum()) for v in imp.values())
    t = 0.8 / 72  # a bit below the mean normalized entry
    masks = fisher_pruning_masks(imp, threshold=t, min_keep=0)
    for k, m in masks.items():
        expected = [v / total >= t for v in imp[k].reshape(-1).tolist()]
        assert m.reshape(-1).tolist() == expected
    layer = fisher_pruning_masks(imp, threshold=0.02, scope="layer", min_keep=0)
    for k, m in layer.items():
        s = float(imp[k].sum())
        assert m.reshape(-1).tolist() == [v / s >= 0.02 for v in imp[k].reshape(-1).tolist()]
    # min_keep protects the most important entry of a tensor the threshold would empty
    kept = fisher_pruning_masks(imp, threshold=1.0, min_keep=1)
    for k, m in kept.items():
        assert int(m.sum()) == 1 and m.reshape(-1)[imp[k].reshape(-1).argmax()]


def test_structured_channel_removes_whole_rows(cnn_case):
    model, _, _ = cnn_case
    F = random_diag_fisher(model, seed=3)
    imp = fisher_importance(F, model)
    masks = fisher_pruning_masks(imp, sparsity=0.5, structured="channel")
    # conv and linear weights, plus the biases of their pruned rows
    assert set(masks) == {"c1.weight", "c1.bias", "c2.weight", "c2.bias", "fc.weight", "fc.bias"}
    rows = {}
    for w in ("c1", "c2", "fc"):
        m = masks[f"{w}.weight"].reshape(masks[f"{w}.weight"].shape[0], -1)
        assert (m.all(1) | (~m).all(1)).all(), "rows are kept or removed whole"
        assert torch.equal(masks[f"{w}.bias"], m[:, 0])
        rows[w] = imp[f"{w}.weight"].reshape(m.shape[0], -1).sum(1) + imp[f"{w}.bias"]
    n_rows = 3 + 4 + 4
    removed = [
        (w, i)
        for w in rows
        for i in (~masks[f"{w}.weight"].reshape(len(rows[w]), -1)[:, 0])
        .nonzero()
        .reshape(-1)
        .tolist()
    ]
    assert len(removed) == int(0.5 * n_rows + 0.5)
    ranked = sorted(
        (float(s), t, i) for t, w in enumerate(rows) for i, s in enumerate(rows[w].tolist())
    )
    names = list(rows)
    assert set(removed) == {(names[t], i) for _, t, i in ranked[: len(removed)]}
    keep_bias = fisher_pruning_masks(imp, sparsity=0.5, structured="channel", channel_bias="keep")
    assert set(keep_bias) == {"c1.weight", "c2.weight", "fc.weight"}
    # prune="all": paired biases follow their rows instead of being ranked on their own
    every = fisher_pruning_masks(imp, sparsity=0.5, structured="channel", prune="all")
    assert all(torch.equal(every[k], masks[k]) for k in masks) and set(every) == set(masks)


def test_structured_removed_channel_outputs_zero(cnn_case):
    model, x, _ = cnn_case
    imp = fisher_importance(random_diag_fisher(model, seed=4), model)
    masks = fisher_pruning_masks(imp, sparsity=0.4, structured="channel", scope="layer")
    apply_masks(model, masks)
    dead = (~masks["c1.weight"].reshape(3, -1)[:, 0]).nonzero().reshape(-1)
    assert len(dead) == 1
    out = model.c1(x)
    assert (out[:, dead] == 0).all()


def test_fisher_keeps_small_weight_with_large_fisher():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(0.5, 1.5, 18).reshape(3, 6))
        lin.weight[1, 2] = 0.01  # smallest magnitude ...
    F = torch.full((3, 6), 1e-3, dtype=torch.float64)
    F[1, 2] = 1e6  # ... but the loss is very sensitive to it
    masks = fisher_pruning_masks(fisher_importance({"weight": F}, lin), sparsity=0.5)
    assert masks["weight"][1, 2]
    magnitude = prune.l1_unstructured(copy.deepcopy(lin), "weight", amount=9)
    assert magnitude.weight_mask[1, 2] == 0  # torch's magnitude pruner removes it


def test_mask_errors():
    imp = {"w": torch.rand(2, 2), "b": torch.rand(2)}
    with pytest.raises(ValueError, match="exactly one of sparsity= .* or threshold="):
        fisher_pruning_masks(imp)
    with pytest.raises(ValueError, match="exactly one"):
        fisher_pruning_masks(imp, sparsity=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="Invalid sparsity: 1.0; it must lie in \\[0, 1\\)"):
        fisher_pruning_masks(imp, sparsity=1.0)
    with pytest.raises(
        ValueError, match="Unknown scope 'model'; expected one of 'global', 'layer'"
    ):
        fisher_pruning_masks(imp, sparsity=0.5, scope="model")
    with pytest.raises(ValueError, match="Unknown structured 'row'; expected one of 'channel'"):
        fisher_pruning_masks(imp, sparsity=0.5, structured="row")
    with pytest.raises(ValueError, match="Invalid min_keep: -1"):
        fisher_pruning_masks(imp, sparsity=0.5, min_keep=-1)
    with pytest.raises(ValueError, match="prune lists names not in importance: \\['x'\\]"):
        fisher_pruning_masks(imp, sparsity=0.5, prune=["x"])
    with pytest.raises(ValueError, match="No tensor to prune.*pass prune='all'"):
        fisher_pruning_masks({"b": torch.rand(3)}, sparsity=0.5)
    with pytest.raises(ValueError, match="importance\\['w'\\] has negative"):
        fisher_pruning_masks({"w": -torch.ones(2, 2)}, sparsity=0.5)
    only_b = fisher_pruning_masks(imp, sparsity=0.5, prune=["b"])
    assert set(only_b) == {"b"} and int((~only_b["b"]).sum()) == 1


# -- apply_masks / make_permanent -----------------------------------------------------


def test_apply_masks_uses_torch_prune_and_engine_still_works(mlp_case):
    model, x, y = mlp_case
    w0 = model[0].weight.detach().clone()
    imp = fisher_importance(random_diag_fisher(model), model)
    masks = fisher_pruning_masks(imp, sparsity=0.5, scope="layer")
    saved = {k: v.clone() for k, v in masks.items()}
    assert apply_masks(model, masks) is model
    assert all(torch.equal(masks[k], saved[k]) for k in masks)  # masks untouched
    assert prune.is_pruned(model)
    names = dict(model.named_parameters())
    assert {"0.weight_orig", "2.weight_orig"} <= set(names) and "0.weight" not in names
    torch.testing.assert_close(model[0].weight_orig.detach(), w0, rtol=0, atol=0)
    torch.testing.assert_close(model[0].weight, w0 * masks["0.weight"])
    # the engine on the pruned model against a brute-force per-sample loop
    F = estimate_fisher(model, (x, y))
    g = loop_grads(model, ce_sum, x, y)
    assert_close_dict(dict(F), {k: (v**2).mean(0) for k, v in g.items()}, rtol=1e-5, atol=1e-9)
    assert (F["0.weight_orig"][~masks["0.weight"]] == 0).all()
    # forward still right after the engine ran
    ref = (
        torch.tanh(x @ (w0 * masks["0.weight"]).T + model[0].bias) @ model[2].weight.T
        + model[2].bias
    )
    torch.testing.assert_close(model(x), ref)


def test_make_permanent_removes_reparametrization(mlp_case):
    model, x, _ = mlp_case
    masks = {"0.weight": torch.rand(7, 5) > 0.5, "2.bias": torch.tensor([True, False, True, True])}
    apply_masks(model, masks)
    out = model(x).detach()
    eff = model[0].weight.detach().clone()
    assert make_permanent(model) is model
    assert not prune.is_pruned(model)
    assert sorted(n for n, _ in model.named_parameters()) == [
        "0.bias",
        "0.weight",
        "2.bias",
        "2.weight",
    ]
    assert list(model.named_buffers()) == []
    torch.testing.assert_close(model[0].weight.detach(), eff, rtol=0, atol=0)
    assert model[2].bias[1] == 0
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)


def test_apply_masks_twice_multiplies_and_accepts_orig_names(mlp_case):
    model, _, _ = mlp_case
    a = torch.rand(7, 5) > 0.3
    b = torch.rand(7, 5) > 0.3
    apply_masks(model, {"0.weight": a})
    apply_masks(model, {"0.weight_orig": b.float()})
    assert torch.equal(model[0].weight_mask.bool(), a & b)


def test_apply_masks_errors_leave_model_untouched(mlp_case):
    model, _, _ = mlp_case
    good = torch.ones(7, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="Mask '1.weight' names no parameter of the model; it has"):
        apply_masks(model, {"0.weight": good, "1.weight": good})
    with pytest.raises(
        ValueError, match="Mask '2.weight' has shape \\(7, 5\\) but the parameter has \\(4, 7\\)"
    ):
        apply_masks(model, {"0.weight": good, "2.weight": good})
    assert not prune.is_pruned(model)


class _TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight (an LM head tied as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids).mean(1))))


def test_apply_masks_masks_every_module_of_a_tied_weight():
    # the mask used to reach only the module named in the mask: the tied head kept
    # computing with the unmasked weight, and a fine-tune moved its pruned entries
    torch.manual_seed(0)
    model = _TiedLM()
    ids, y = torch.randint(0, 10, (16, 3)), torch.randint(0, 10, (16,))
    keep = torch.rand(10, 4) > 0.5
    apply_masks(model, {"emb.weight": keep})
    w = model.emb.weight_orig.detach() * keep
    want = nn.functional.linear(torch.tanh(model.mid(nn.functional.embedding(ids, w).mean(1))), w)
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), y).backward()
        opt.step()
    assert torch.all(model.head.weight[~keep] == 0) and torch.all(model.emb.weight[~keep] == 0)
    make_permanent(model)
    assert model.head.weight is model.emb.weight  # still tied
    assert torch.all(model.head.weight[~keep] == 0)


# -- overlap ----------------------------------------------------------------------------


def test_overlap_against_python_sets():
    g = torch.Generator().manual_seed(7)
    m1 = {"a": torch.rand(4, 5, generator=g) > 0.4, "b": torch.rand(6, generator=g) > 0.5}
    m2 = {"a": torch.rand(4, 5, generator=g) > 0.6, "b": torch.rand(6, generator=g) > 0.5}

    def kept(m):
        return {(k, i) for k, v in m.items() for i, on in enumerate(v.reshape(-1).tolist()) if on}

    A, B = kept(m1), kept(m2)
    r = mask_overlap(m1, m2)
    assert r.total.jaccard == pytest.approx(len(A & B) / len(A | B))
    assert r.total.overlap == pytest.approx(len(A & B) / min(len(A), len(B)))
    assert (r.total.kept1, r.total.kept2, r.total.size) == (len(A), len(B), 26)
    for k in m1:
        a = {i for (n, i) in A if n == k}
        b = {i for (n, i) in B if n == k}
        assert r.per_tensor[k].jaccard == pytest.approx(len(a & b) / len(a | b))
        assert r.per_tensor[k].intersection == len(a & b)
    d = r.to_dict()
    json.dumps(d)
    assert d["per_tensor"]["a"]["union"] == len({i for (n, i) in A | B if n == "a"})
    same = mask_overlap(m1, m1)
    assert same.total.jaccard == 1.0 and same.total.overlap == 1.0


def test_overlap_empty_sets_and_mismatch():
    empty = {"w": torch.zeros(3, dtype=torch.bool)}
    full = {"w": torch.ones(3, dtype=torch.bool)}
    r = mask_overlap(empty, empty)
    assert (r.total.jaccard, r.total.overlap) == (1.0, 1.0)
    r = mask_overlap(empty, full)
    assert (r.total.jaccard, r.total.overlap) == (0.0, 1.0)
    with pytest.raises(ValueError, match="only in masks2: v"):
        mask_overlap(full, {**full, "v": full["w"]})
    with pytest.raises(ValueError, match="w: \\(3,\\) vs \\(4,\\)"):
        mask_overlap(full, {"w": torch.ones(4, dtype=torch.bool)})


# -- metrics -------------------------------------------------------------------------------


def test_apply_masks_on_a_tied_weight_one_alias_of_which_torch_already_pruned():
    # torch's prune on one holder, then apply_masks: both holders get old & new
    torch.manual_seed(1)
    model = _TiedLM()
    old, new = torch.rand(10, 4) > 0.3, torch.rand(10, 4) > 0.3
    torch.nn.utils.prune.custom_from_mask(model.emb, "weight", old)
    apply_masks(model, {"emb.weight": new})
    assert torch.equal(model.emb.weight_mask.bool(), old & new)
    assert torch.equal(model.head.weight_mask.bool(), old & new)
    assert torch.equal(model.emb.weight, model.head.weight)
