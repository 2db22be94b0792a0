"""Likelihoods: each one's per-sample gradients against one backward pass per sample
(token_categorical with ignore_index, attention masks and causal shift; gaussian,
bernoulli and custom)."""

import pytest
import torch
import torch.nn.functional as F

from natgrad import CustomLikelihood, Gaussian, per_sample_grads
from natgrad.engine.likelihoods import get_likelihood
from tests.conftest import TinyEncoder
from tests.reference import assert_close_dict, loop_grads


def test_token_categorical_ignore_index_and_mask():
    torch.manual_seed(1)
    model = TinyEncoder(per_token=True).double().eval()
    ids = torch.randint(0, 13, (4, 5))
    labels = torch.randint(0, 13, (4, 5))
    labels[0, 1] = -100
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[2, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    got = per_sample_grads(model, batch, "token_categorical")
    masked = torch.where(mask == 0, torch.full_like(labels, -100), labels)

    def loss(out, yy):
        return F.cross_entropy(out.flatten(0, 1), yy.flatten(), ignore_index=-100, reduction="sum")

    ref = loop_grads(model, loss, {"input_ids": ids, "attention_mask": mask}, masked)
    assert_close_dict(got, ref)


def test_token_categorical_shift_for_causal_lm():
    torch.manual_seed(2)
    model = TinyEncoder(per_token=True).double().eval()
    ids = torch.randint(0, 13, (3, 6))
    got = per_sample_grads(model, {"input_ids": ids, "labels": ids}, natgrad_lik(shift=True))

    def loss(out, yy):
        return F.cross_entropy(out[:, :-1].flatten(0, 1), yy[:, 1:].flatten(), reduction="sum")

    assert_close_dict(got, loop_grads(model, loss, {"input_ids": ids}, ids))


def natgrad_lik(**kw):
    from natgrad import TokenCategorical

    return TokenCategorical(**kw)


@pytest.mark.parametrize(
    "lik,target_fn,loss",
    [
        (
            "gaussian",
            lambda n: torch.randn(n, 4, dtype=torch.float64),
            lambda o, y: 0.5 * ((o - y) ** 2).sum(),
        ),
        (
            "bernoulli",
            lambda n: torch.randint(0, 2, (n, 4)).double(),
            lambda o, y: F.binary_cross_entropy_with_logits(o, y, reduction="sum"),
        ),
    ],
)
def test_other_likelihoods(mlp_case, lik, target_fn, loss):
    model, x, _ = mlp_case
    y = target_fn(len(x))
    assert_close_dict(per_sample_grads(model, (x, y), lik), loop_grads(model, loss, x, y))


def test_custom_likelihood(mlp_case):
    model, x, _ = mlp_case
    y = torch.randn(len(x), 4, dtype=torch.float64)
    lik = CustomLikelihood(lambda f, t: (torch.abs(f - t) ** 3).flatten(1).sum(1), name="cubic")
    ref = loop_grads(model, lambda o, t: (torch.abs(o - t) ** 3).sum(), x, y)
    assert_close_dict(per_sample_grads(model, (x, y), lik), ref)


# -- the inverse-CDF sampler of token_categorical's mc labels -------------------------------

# 0.999 quantile of the chi-square distribution with 5 degrees of freedom.
_CHI2_5_999 = 20.515


def _chi_square(draws, probs):
    counts = torch.bincount(draws.flatten(), minlength=len(probs)).double()
    expected = probs * draws.numel()
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a class of zero probability was drawn"
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())


def test_inverse_cdf_draws_follow_the_softmax():
    """Chi-square goodness of fit on 7 classes (one of probability 0 in float32), 60 000
    draws from a fixed generator, several rows per block of the cumulative sums."""
    from natgrad.engine import likelihoods
    from natgrad.engine.likelihoods import inverse_cdf_draws

    logits = torch.tensor([0.3, -1.2, 2.0, 0.0, -200.0, 1.1, -0.4])
    probs = logits.double().softmax(-1)
    probs[4] = 0.0  # exp(-200) underflows in float32: never drawn
    probs /= probs.sum()
    rows = logits.expand(300, 7)
    old = likelihoods._CDF_FLOATS
    likelihoods._CDF_FLOATS = 7 * 16  # 16 rows per block: blocks and their seams are tested
    try:
        draws = inverse_cdf_draws(rows, 200, torch.Generator().manual_seed(0))
    finally:
        likelihoods._CDF_FLOATS = old
    assert draws.shape == (300, 200) and draws.dtype == torch.long
    assert _chi_square(draws, probs) < _CHI2_5_999
    # The test has power: the same draws against slightly different probabilities fail it.
    wrong = probs.clone()
    wrong[0], wrong[3] = probs[0] + 0.01, probs[3] - 0.01
    assert _chi_square(draws, wrong) > 5 * _CHI2_5_999
    # Per-row distributions differ: each row keeps its own.
    two = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    d2 = inverse_cdf_draws(two, 20000, torch.Generator().manual_seed(1))
    p0, p1 = two.double().softmax(-1)
    assert _chi_square(d2[0], p0) < 13.82 and _chi_square(d2[1], p1) < 13.82  # 2 dof, 0.999


def test_inverse_cdf_draws_are_seeded_and_match_a_float64_inversion():
    """Reproducible for a seeded generator, and the class whose cumulative float64
    probability first exceeds the generator's uniforms (the same uniforms, drawn
    ``(R, k)`` in float64)."""
    from natgrad.engine.likelihoods import inverse_cdf_draws

    torch.manual_seed(0)
    logits = torch.randn(9, 11, dtype=torch.float64) * 3
    a = inverse_cdf_draws(logits, 4, torch.Generator().manual_seed(7))
    b = inverse_cdf_draws(logits, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    u = torch.rand(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    cdf = logits.softmax(-1).cumsum(-1)
    ref = torch.tensor([[int((cdf[r] > u[r, j]).nonzero()[0, 0]) for j in range(4)] for r in range(9)])
    assert torch.equal(a, ref)


def test_token_categorical_mc_draws_and_output_grads():
    """``sample`` draws every token by the inverse-CDF sampler (row-major over (N, T)),
    keeps ignore_index, and pads the shifted position; ``output_grad`` is softmax minus
    the one-hot label, zero at ignored tokens (the dense one-hot formula)."""
    from natgrad import TokenCategorical
    from natgrad.engine.likelihoods import inverse_cdf_draws

    torch.manual_seed(3)
    out = torch.randn(2, 5, 6)
    tgt = torch.randint(0, 6, (2, 5))
    tgt[1, 2] = -100
    lik = TokenCategorical()
    draws = lik.sample(out, torch.Generator().manual_seed(4), 3, tgt)
    ref = inverse_cdf_draws(out.reshape(10, 6), 3, torch.Generator().manual_seed(4))
    ref = ref.t().reshape(3, 2, 5)
    ref[:, 1, 2] = -100
    assert torch.equal(draws, ref)
    shifted = TokenCategorical(shift=True).sample(out, torch.Generator().manual_seed(4), 3, tgt)
    assert shifted.shape == (3, 2, 5) and bool((shifted[:, :, 0] == -100).all())
    g = lik.output_grad(out, tgt)
    safe = tgt.clamp(min=0)
    dense = (out.softmax(-1) - F.one_hot(safe, 6).float()) * (tgt != -100).unsqueeze(-1)
    assert torch.equal(g, dense)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_inverse_cdf_draws_refuse_non_finite_logits(bad):
    from natgrad.engine.likelihoods import inverse_cdf_draws

    logits = torch.zeros(3, 4)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite logits"):
        inverse_cdf_draws(logits, 1, torch.Generator().manual_seed(0))


def _softmax_hessian(logits: torch.Tensor) -> torch.Tensor:
    """``diag(p) - p pᵀ`` per row, in float64 (the closed form)."""
    p = logits.double().softmax(-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


@pytest.mark.parametrize("C", [1, 2, 3, 10])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_categorical_factor_has_c_minus_one_columns_and_is_exact(C, scale):
    lik = get_likelihood("categorical")
    torch.manual_seed(C)
    out = torch.randn(7, C, dtype=torch.float64) * scale
    K = lik.num_factor_columns(out)
    assert max(C - 1, 1) == K
    # built in two slices, as the engines do for many classes
    S = torch.cat([lik.factor_columns(out, 0, K // 2 or K), lik.factor_columns(out, K // 2 or K, K)])
    assert S.shape == (K, 7, C)
    got = torch.einsum("knc,knd->ncd", S, S)
    torch.testing.assert_close(got, _softmax_hessian(out), rtol=0, atol=1e-15)


def _accurate_softmax_hessian(logits: torch.Tensor) -> torch.Tensor:
    """``diag(p) - p pᵀ`` in float64 with each diagonal ``p_c (1 - p_c)`` taken as
    ``p_c Σ_{j≠c} p_j`` (no cancellation for a confident class)."""
    p = logits.double().softmax(-1)
    C = p.shape[-1]
    rest = torch.stack([torch.cat([p[..., :c], p[..., c + 1:]], -1).sum(-1) for c in range(C)], -1)
    eye = torch.eye(C, dtype=p.dtype)
    return -p.unsqueeze(-1) * p.unsqueeze(-2) * (1 - eye) + torch.diag_embed(p * rest)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", [0, 1, -1])
@pytest.mark.parametrize("C", [2, 3, 10])
def test_categorical_factor_is_accurate_row_by_row_for_confident_rows(dtype, where, C):
    """Rows confident in the first, second or last class (logit gaps 5 to 30): each
    row's Σ s sᵀ within float round-off of ``diag(p) - p pᵀ`` relative to the row's own
    norm (an absolute tolerance would pass any confident row, whose entries are tiny)."""
    torch.manual_seed(C)
    out = torch.randn(6, C)
    out[torch.arange(6), where] += torch.tensor([5.0, 10.0, 15.0, 20.0, 25.0, 30.0])
    out = out.to(dtype)
    S = get_likelihood("categorical").factor_columns(out, 0, max(C - 1, 1)).double()
    assert torch.isfinite(S).all()
    got = torch.einsum("knc,knd->ncd", S, S)
    ref = _accurate_softmax_hessian(out)
    err = (got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert err.max() < (1e-13 if dtype == torch.float64 else 2e-6), err


@pytest.mark.parametrize("shift", [False, True])
def test_token_factor_is_accurate_row_by_row_for_confident_tokens(shift):
    torch.manual_seed(0)
    out = torch.randn(2, 4, 9)
    out[..., 3] += 22.0
    lik = get_likelihood("token_categorical", shift=shift)
    S = lik.factor_columns(out, 0, lik.num_factor_columns(out)).double()
    got = torch.einsum("kntc,kntd->ntcd", S, S)
    ref = _accurate_softmax_hessian(out)
    if shift:  # the last position predicts nothing
        got, ref = got[:, :-1], ref[:, :-1]
    err = (got - ref).flatten(2).norm(dim=2) / ref.flatten(2).norm(dim=2)
    assert err.max() < 2e-6, err


@pytest.mark.parametrize("shift", [False, True])
def test_token_categorical_factor_is_exact_on_kept_tokens(shift):
    lik = get_likelihood("token_categorical", shift=shift)
    torch.manual_seed(0)
    out = torch.randn(2, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 4))
    y[0, 2] = -100
    K = lik.num_factor_columns(out)
    T = 3 if shift else 4
    assert K == T * 4
    S = lik.factor_columns(out, 0, K, y)
    assert S.shape == (K, 2, 4, 5)
    got = torch.einsum("kntc,kntd->ntcd", S, S)
    ref = torch.zeros(2, 4, 5, 5, dtype=torch.float64)
    keep = (y != -100).double()
    if shift:  # logits at t predict the label at t + 1; the last position predicts nothing
        ref[:, :-1] = _softmax_hessian(out[:, :-1]) * keep[:, 1:, None, None]
    else:
        ref = _softmax_hessian(out) * keep[..., None, None]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-15)


def test_categorical_factor_under_vmap_matches_the_batch():
    lik = get_likelihood("categorical")
    out = torch.randn(5, 6, dtype=torch.float64)
    batched = lik.factor_columns(out, 0, 5)  # (K, N, C)
    per = torch.vmap(lambda o: lik.factor_columns(o, 0, 5))(out)  # (N, K, C)
    torch.testing.assert_close(per.movedim(0, 1), batched, rtol=0, atol=0)


def test_gaussian_draws_float64_noise_for_a_float64_model():
    # the noise was drawn in float32 whatever the model's dtype (review): a float64
    # model's MC labels carried float32 round-off. Reference: torch.randn in float64 from
    # a generator in the same state.
    out = torch.randn(5, 3, dtype=torch.float64)
    lik = Gaussian(sigma=0.7)
    draws = lik.sample(out, torch.Generator().manual_seed(4), 2)
    eps = torch.randn((2, 5, 3), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert draws.dtype == torch.float64
    torch.testing.assert_close(draws, out + 0.7 * eps, rtol=0, atol=0)
