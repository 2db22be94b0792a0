"""Per-sample gradients against one backward pass per sample."""

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from natgrad import CustomLikelihood, per_sample_grads, select_params
from tests.conftest import mlp
from tests.reference import assert_close_dict, ce_sum, loop_grads


@pytest.mark.parametrize("case", ["mlp_case", "cnn_case", "embed_case"])
def test_matches_loop(case, request):
    model, x, y = request.getfixturevalue(case)
    got = per_sample_grads(model, (x, y))
    assert_close_dict(got, loop_grads(model, ce_sum, x, y))


def test_transformer_dict_batch_with_attention_mask(encoder_case):
    model, ids, mask, y = encoder_case
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    got = per_sample_grads(model, batch)
    ref = loop_grads(model, ce_sum, {"input_ids": ids, "attention_mask": mask}, y)
    assert_close_dict(got, ref)


def test_transformer_positional_input(encoder_case):
    model, ids, _, y = encoder_case
    assert_close_dict(per_sample_grads(model, (ids, y)), loop_grads(model, ce_sum, ids, y))


def test_exact_labels_are_factor_weighted_class_gradients(mlp_case):
    model, x, _ = mlp_case
    g = per_sample_grads(model, x, labels="exact")
    # Σ_c (weighted gradient)² equals Σ_c p_c g_c² from a loop over classes
    for i in range(3):
        p = model(x[i : i + 1]).softmax(-1)[0].detach()
        ref = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
        for c in range(4):
            gc = loop_grads(model, lambda o, _, c=c: -o.log_softmax(-1)[0, c], x[i : i + 1], None)
            for k in ref:
                ref[k] += p[c] * gc[k][0] ** 2
        assert_close_dict({k: (v[i] ** 2).sum(0) for k, v in g.items()}, ref)


def test_mc_labels_reproducible_and_equal_loop_on_drawn_labels(mlp_case):
    model, x, _ = mlp_case
    g1 = per_sample_grads(
        model, x, labels="mc", mc_samples=3, generator=torch.Generator().manual_seed(5)
    )
    g2 = per_sample_grads(
        model, x, labels="mc", mc_samples=3, generator=torch.Generator().manual_seed(5)
    )
    assert_close_dict(g1, g2, rtol=0, atol=0)
    # the same draws as the likelihood's sampler, gradients as a loop
    from natgrad import Categorical

    with torch.no_grad():
        draws = Categorical().sample(model(x), torch.Generator().manual_seed(5), 3)
    for j in range(3):
        ref = loop_grads(model, ce_sum, x, draws[j])
        assert_close_dict({k: v[:, j] for k, v in g1.items()}, ref)


def test_chunked_equals_unchunked(cnn_case):
    model, x, y = cnn_case
    a = per_sample_grads(model, (x, y), chunk_size=1)
    b = per_sample_grads(model, (x, y), chunk_size=4)
    c = per_sample_grads(model, (x, y))
    assert_close_dict(a, c, rtol=1e-12, atol=1e-14)
    assert_close_dict(b, c, rtol=1e-12, atol=1e-14)


def test_params_selection(mlp_case):
    model, x, y = mlp_case
    ref = loop_grads(model, ce_sum, x, y)
    by_name = per_sample_grads(model, (x, y), params=["2.weight"])
    assert list(by_name) == ["2.weight"]
    assert_close_dict(by_name, {"2.weight": ref["2.weight"]})
    by_module = per_sample_grads(model, (x, y), params=[model[0]])
    assert sorted(by_module) == ["0.bias", "0.weight"]
    by_pred = per_sample_grads(model, (x, y), params=lambda n, p: n.endswith("bias"))
    assert sorted(by_pred) == ["0.bias", "2.bias"]
    assert_close_dict(by_pred, {k: ref[k] for k in by_pred})


def test_frozen_params_left_out(mlp_case):
    model, x, y = mlp_case
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in per_sample_grads(model, (x, y))


def test_pruning_hooks_do_not_break_engine(mlp_case):
    model, x, y = mlp_case
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    got = per_sample_grads(model, (x, y))
    assert "0.weight_orig" in got
    assert_close_dict(got, loop_grads(model, ce_sum, x, y))
    # gradients of pruned entries are zero
    assert (got["0.weight_orig"][:, model[0].weight_mask == 0] == 0).all()


def test_inputs_not_mutated(mlp_case):
    model, x, y = mlp_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0, y0 = x.clone(), y.clone()
    per_sample_grads(model, (x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(p.grad is None for p in model.parameters())


def test_hf_style_output_object(mlp_case):
    model, x, y = mlp_case

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return Out(self.m(x))

    g = per_sample_grads(Wrap(model), (x, y))
    assert_close_dict({k[2:]: v for k, v in g.items()}, loop_grads(model, ce_sum, x, y))
    g2 = per_sample_grads(model, (x, y), output_fn=lambda o: o * 1.0)
    assert_close_dict(g2, loop_grads(model, ce_sum, x, y))


# ---- errors ------------------------------------------------------------------------


def test_train_mode_batchnorm_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError, match=r"'1' \(BatchNorm1d\) is in train mode.*model.eval\(\).*GroupNorm"
    ):
        per_sample_grads(model, (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))
    model.eval()
    per_sample_grads(model, (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))


@pytest.mark.parametrize(
    "batch,kwargs,err,match",
    [
        ((torch.randn(0, 5), torch.zeros(0, dtype=torch.long)), {}, ValueError, "Empty batch"),
        (
            (torch.randn(3, 5), torch.tensor([0, 1])),
            {},
            ValueError,
            "first dimension must be the batch size",
        ),
        ((torch.randn(3, 5), torch.randn(3)), {}, ValueError, "integer class indices"),
        (torch.randn(3, 5), {}, ValueError, "labels='empirical' needs the data's labels"),
        (
            (torch.randn(3, 5), torch.tensor([0, 1, 2])),
            {"labels": "fisher"},
            ValueError,
            "Unknown labels 'fisher'",
        ),
        (
            (torch.randn(3, 5), torch.tensor([0, 1, 2])),
            {"likelihood": "poisson"},
            ValueError,
            "Unknown likelihood 'poisson'.*'categorical'",
        ),
        (
            (torch.randn(3, 5), torch.tensor([0, 1, 2])),
            {"params": ["nope"]},
            ValueError,
            "Unknown parameter names \\['nope'\\]",
        ),
        (
            (torch.randn(3, 5), torch.tensor([0, 1, 2])),
            {"mc_samples": 0, "labels": "mc"},
            ValueError,
            "mc_samples",
        ),
        ("not a batch", {}, TypeError, "Unsupported batch type str"),
        (
            (torch.randn(3, 5), torch.randn(3, 2), torch.randn(3)),
            {},
            ValueError,
            "must be \\(x, y\\) or \\(x,\\)",
        ),
    ],
)
def test_bad_inputs(batch, kwargs, err, match):
    model = mlp().double()
    if isinstance(batch, tuple):
        batch = tuple(b.double() if b.is_floating_point() else b for b in batch)
    with pytest.raises(err, match=match):
        per_sample_grads(model, batch, **kwargs)


def test_gaussian_target_shape_error(mlp_case):
    model, x, _ = mlp_case
    with pytest.raises(ValueError, match=r"gaussian targets must have the output's shape"):
        per_sample_grads(model, (x, torch.randn(len(x), dtype=torch.float64)), "gaussian")


def test_exact_needs_closed_form(mlp_case):
    model, x, _ = mlp_case
    lik = CustomLikelihood(lambda f, t: (f**2).sum(-1))
    with pytest.raises(ValueError, match="no closed-form expectation.*labels='mc'"):
        per_sample_grads(model, x, lik, labels="exact")


def test_select_params_errors(mlp_case):
    model, _, _ = mlp_case
    with pytest.raises(ValueError, match="No parameters selected"):
        select_params(model, lambda n, p: False)
    with pytest.raises(ValueError, match="not part of the model"):
        select_params(model, [nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="params must be"):
        select_params(model, 3)


def test_unreadable_output_names_fix():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(2, 2)

        def forward(self, x):
            return [self.l(x)]

    with pytest.raises(TypeError, match="output_fn=lambda out"):
        per_sample_grads(M(), (torch.randn(2, 2), torch.tensor([0, 1])))


def test_mc_labels_from_non_finite_outputs_raise(mlp_case):
    model, x, _ = mlp_case
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))
    with pytest.raises(
        FloatingPointError, match="(?s)Non-finite values in the model's outputs: NaN.*labels='mc'"
    ):
        per_sample_grads(model, x, labels="mc")
