"""The Laplace predictive on the capture path against a dense float64 posterior.

Reference: ``Var f_c(x) = J_c [(N F + δ I)⁻¹]_{SS} J_cᵀ`` with ``J`` from one backward per
sample and output (:func:`tests.reference.output_jacobian`), ``F`` the curvature's dense
matrix read off through ``mv`` and ``S`` the chosen parameters (rows off ``S`` are zero).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import natgrad
from natgrad import laplace
from tests.reference import assert_close_dict, dense_from_mv, output_jacobian


class SmallCNN(nn.Module):
    """A Conv1d branch and a Conv2d branch (stride, padding) feeding a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(3 * 5 + 2 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = torch.relu(self.c1(x[:, :10].unsqueeze(1))).flatten(1)
        h2 = torch.tanh(self.c2(x[:, 10:26].reshape(-1, 1, 4, 4))).flatten(1)
        return self.fc(torch.cat([h1, h2], 1))


class DeepCNN(nn.Module):
    """Two Conv1d layers, the first with fewer patch entries than positions (``d_A = 4 <
    T = 6``), the second with more (``d_A = 13 >= T = 3``), and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv1d(4, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x.unsqueeze(1)))
        return self.fc(torch.tanh(self.c2(h)).flatten(1))


class SeqModel(nn.Module):
    """Linear over positions (N, T, I), a LayerNorm (not on the capture path), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4)
        self.l2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.ln(torch.tanh(self.l1(x.reshape(-1, 4, 3)))).mean(1))


def _case(name: str, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    if name == "mlp":
        model, d = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), 5
    elif name == "cnn":
        model, d = SmallCNN(), 26
    elif name == "deep_cnn":
        model, d = DeepCNN(), 12
    else:
        model, d = SeqModel(), 12
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(24, d, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, x, y


def _curvature(model, x, y, kind, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K-FAC names the parameters it keeps diagonal
        return natgrad.estimate_curvature(model, (x, y), kind=kind, labels="exact", **kw)


class Dense:
    """The dense float64 posterior of ``curv`` and the brute-force Jacobian of ``model`` at
    ``x``, computed once; :meth:`variance` for any δ and parameter subset."""

    def __init__(self, model, x, curv):
        shapes = {k: p.shape for k, p in model.named_parameters() if k in curv.names()}
        self.names = list(shapes)
        self.F = dense_from_mv(curv, shapes).double()
        self.n = curv.n_samples
        sizes = [shapes[k].numel() for k in self.names]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.index = {k: torch.arange(s, s + z) for k, s, z in zip(self.names, starts, sizes,
                                                                   strict=True)}
        self.J = output_jacobian(model, x, self.names).double()

    def variance(self, delta, names=None):
        return self.covariance(delta, names).diagonal(dim1=1, dim2=2)

    def covariance(self, delta, names=None):
        """``(N, D, D)``: ``J_S [(N F + δ I)⁻¹]_{SS} J_Sᵀ``."""
        idx = torch.cat([self.index[k] for k in (names or self.names)])
        eye = torch.eye(self.F.shape[0], dtype=torch.float64)
        cov = torch.linalg.inv(self.n * self.F + delta * eye)[idx][:, idx]
        J = self.J[..., idx]
        return torch.einsum("ndp,pq,neq->nde", J, cov, J)


def _reference(model, x, curv, delta, names=None):
    return Dense(model, x, curv).variance(delta, names)


def _last(model):
    return [k for k, _ in model.named_parameters()][-2:]


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_capture_path_matches_the_dense_posterior(name, kind):
    model, x, y = _case(name)
    curv = _curvature(model, x, y, kind)
    xt = x[:5] + 0.3
    names_all = [k for k, _ in model.named_parameters()]
    first_weight = [names_all[0]]  # a weight without its bias: splits a K-FAC block
    dense = Dense(model, xt, curv)
    for subset, params, names in [
        ("all", None, names_all),
        ("last_layer", None, _last(model)),
        (None, first_weight, first_weight),
    ]:
        r = natgrad.fisher_uncertainty(model, xt, curv, prior_precision=0.7, subset=subset,
                                       params=params, engine="fast")
        want = dense.variance(0.7, names)
        torch.testing.assert_close(r.logit_variance, want, rtol=1e-9, atol=1e-13)
        mean = model(xt).detach()
        torch.testing.assert_close(
            r.probs, torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * want), -1),
            rtol=1e-9, atol=1e-13,
        )


def _mc_reference(mean, cov, n_samples, seed):
    """Softmax MC predictive with draws ``μ + Σ^{1/2} ε`` (eigendecomposition square root)."""
    lam, U = torch.linalg.eigh(cov)
    root = U @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ U.transpose(-1, -2)
    eps = torch.randn((n_samples, *mean.shape), generator=torch.Generator().manual_seed(seed),
                      dtype=mean.dtype)
    return torch.softmax(mean + torch.einsum("nde,sne->snd", root, eps), -1).mean(0)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("kind", ["diag", "kfac", "lowrank"])
def test_mc_link_draws_from_the_full_dense_output_covariance(name, kind):
    """``link="mc"``: the ``D x D`` logit covariance of every engine (capture path with one
    or several positions, the vmap path for the LayerNorm model) equals the dense
    ``J (N F + δ I)⁻¹ Jᵀ``, and the draws are ``μ + Σ^{1/2} ε``."""
    model, x, y = _case(name, seed=2)
    curv = _curvature(model, x, y, kind)
    xt = x[:5] - 0.2
    dense = Dense(model, xt, curv)
    mean = model(xt).detach()
    subsets = [("all", None)] if kind == "lowrank" else [("all", None),
                                                         ("last_layer", _last(model))]
    for engine in ("auto", "vmap"):
        for subset, names in subsets:
            r = natgrad.fisher_uncertainty(model, xt, curv, prior_precision=0.4, subset=subset,
                                           link="mc", n_samples=30, engine=engine,
                                           generator=torch.Generator().manual_seed(5))
            want = dense.covariance(0.4, names)
            if subset == "all":  # (a diagonal last layer alone leaves the logits independent)
                off = want - torch.diag_embed(want.diagonal(dim1=1, dim2=2))
                assert off.abs().max() > 1e-3
            torch.testing.assert_close(r.logit_covariance, want, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(r.logit_variance, want.diagonal(dim1=1, dim2=2),
                                       rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(r.probs, _mc_reference(mean, want, 30, 5), rtol=1e-7,
                                       atol=1e-10)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_grid_with_the_mc_link_matches_the_dense_nll(kind):
    """``optimize_prior_precision(link="mc")`` scores every candidate with the full-covariance
    draws (the same ``ε`` for every candidate)."""
    model, x, y = _case("cnn", seed=1)
    curv = _curvature(model, x, y, kind)
    xv, yv = x[:6] * 1.5, y[:6]
    grid = [0.05, 0.5, 5.0]
    r = natgrad.optimize_prior_precision(model, curv, (xv, yv), grid=grid, link="mc",
                                         n_samples=40, generator=torch.Generator().manual_seed(2))
    mean = model(xv).detach()
    dense = Dense(model, xv, curv)
    for g, score in zip(grid, r.scores, strict=True):
        p = _mc_reference(mean, dense.covariance(g), 40, 2)
        nll = -p.gather(1, yv.view(-1, 1)).log().mean()
        assert score == pytest.approx(float(nll), rel=1e-8)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
def test_lowrank_matches_the_dense_posterior(name):
    """Capture path (all parameters on Linear / Conv: ``‖J‖²/δ - Σ_k w_k (J·v_k)²``) or,
    with a LayerNorm, the general path; exact and rank-truncated rows."""
    model, x, y = _case(name, seed=3)
    full = _curvature(model, x, y, "lowrank")
    top = natgrad.estimate_curvature(model, (x, y), kind="lowrank", labels="mc", rank=4)
    engine = "auto" if name == "seq" else "fast"
    for curv in (full, top):
        dense = Dense(model, x[:4], curv)
        for delta in (0.4, 1e-3):
            r = natgrad.fisher_uncertainty(model, x[:4], curv, prior_precision=delta,
                                           engine=engine)
            torch.testing.assert_close(r.logit_variance, dense.variance(delta), rtol=1e-8,
                                       atol=1e-12)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_grid_of_prior_precisions_matches_the_dense_nll(kind):
    """Several candidates at once (one inverse precision per δ) on the capture path."""
    model, x, y = _case("cnn", seed=1)
    curv = _curvature(model, x, y, kind)
    xv, yv = x[:6] * 1.5, y[:6]
    grid = [0.05, 0.5, 5.0]
    r = natgrad.optimize_prior_precision(model, curv, (xv, yv), grid=grid, engine="fast")
    mean = model(xv).detach()
    dense = Dense(model, xv, curv)
    for g, score in zip(grid, r.scores, strict=True):
        var = dense.variance(g)
        p = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)
        nll = -p.gather(1, yv.view(-1, 1)).log().mean()
        assert score == pytest.approx(float(nll), rel=1e-9)


@pytest.mark.parametrize("name", ["mlp", "cnn", "deep_cnn", "seq"])
@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_one_output_column_at_a_time_matches_the_dense_posterior(name, kind, monkeypatch):
    """Large batches pull the output columns back one at a time: the single-column routes
    (one position: ``Σ_o (Q_Gᵀ b)²_o M_o`` in place; several positions: the rotated
    Jacobian, rotating ``b`` or, for small patches, ``J``), in several sample chunks,
    against the dense float64 posterior, for one δ and for a grid of three."""
    monkeypatch.setattr(laplace, "_GROUP_FLOATS", 1)  # one column per group
    monkeypatch.setattr(laplace, "_PRODUCT_FLOATS", 64)  # per-sample products in chunks
    model, x, y = _case(name, seed=7)
    curv = _curvature(model, x, y, kind)
    xt, yt = x[:7] * 1.3, y[:7]
    dense = Dense(model, xt, curv)
    r = natgrad.fisher_uncertainty(model, xt, curv, prior_precision=0.7, engine="fast")
    torch.testing.assert_close(r.logit_variance, dense.variance(0.7), rtol=1e-9, atol=1e-13)
    grid = [0.05, 0.5, 5.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the best δ may sit at the grid's edge
        scores = natgrad.optimize_prior_precision(model, curv, (xt, yt), grid=grid,
                                                  engine="fast").scores
    mean = model(xt).detach()
    for g, score in zip(grid, scores, strict=True):
        p = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * dense.variance(g)), -1)
        assert score == pytest.approx(float(-p.gather(1, yt.view(-1, 1)).log().mean()), rel=1e-9)


class ScaledHead(nn.Module):
    """A Linear head whose output is scaled in place before it is returned: the head's
    output gradient is ``2 e_c``, not the one-hot ``e_c`` of an unmodified output."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.l2(torch.tanh(self.l1(x)))
        y.mul_(2.0)
        return y


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_output_layer_read_without_a_backward_pass_matches_the_dense_posterior(kind):
    """The last layer's output is the model's output, so its gradient for column ``c`` is
    ``e_c`` and its share is ``Σ_o Q_G[c, o]² M_o`` for every column at once (last-layer
    Laplace needs no backward pass); an output modified in place after the layer is not
    read that way."""
    torch.manual_seed(8)
    for model in (nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), ScaledHead()):
        model = model.double().eval()
        x = torch.randn(20, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (20,))
        curv = _curvature(model, x, y, kind)
        dense = Dense(model, x[:6], curv)
        for subset in ("all", "last_layer"):
            r = natgrad.fisher_uncertainty(model, x[:6], curv, prior_precision=0.4,
                                           subset=subset, engine="fast")
            names = None if subset == "all" else _last(model)
            torch.testing.assert_close(r.logit_variance, dense.variance(0.4, names),
                                       rtol=1e-9, atol=1e-13)


def test_remembered_capture_split_follows_the_parameters_and_the_batch():
    """The capture path's split is remembered per model, parameters and batch signature
    (as the Fisher's is): repeated calls, a call with other parameters and a call on
    inputs of another per-sample shape each match the dense posterior."""
    model, x, y = _case("seq", seed=9)
    curv = _curvature(model, x, y, "kfac")
    first = [k for k, _ in model.named_parameters()][:2]  # l1, on the capture path
    dense = Dense(model, x[:5], curv)
    for params, names in [(None, None), (first, first), (None, None)]:
        r = natgrad.fisher_uncertainty(model, x[:5], curv, prior_precision=0.6, params=params)
        torch.testing.assert_close(r.logit_variance, dense.variance(0.6, names), rtol=1e-9,
                                   atol=1e-13)
    model2, x2, y2 = _case("mlp", seed=9)
    curv2 = _curvature(model2, x2, y2, "diag")
    for xs in (x2[:4], x2[:4, None, :]):  # (N, 5), then (N, 1, 5): another signature
        r = natgrad.fisher_uncertainty(model2, xs, curv2, prior_precision=0.6)
        torch.testing.assert_close(r.logit_variance, _reference(model2, x2[:4], curv2, 0.6),
                                   rtol=1e-9, atol=1e-13)


def test_factored_damping_is_read_with_exact_damping():
    model, x, y = _case("mlp", seed=2)
    exact = _curvature(model, x, y, "kfac")
    factored = _curvature(model, x, y, "kfac", damping_mode="factored")
    a = natgrad.fisher_uncertainty(model, x[:4], factored, prior_precision=0.3)
    torch.testing.assert_close(a.logit_variance, _reference(model, x[:4], exact, 0.3),
                               rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_float32_capture_equals_vmap(kind):
    model, x, y = _case("cnn", seed=4, dtype=torch.float32)
    curv = _curvature(model, x, y, kind)
    a = natgrad.fisher_uncertainty(model, x[:8], curv, prior_precision=0.2, engine="fast")
    b = natgrad.fisher_uncertainty(model, x[:8], curv, prior_precision=0.2, engine="vmap")
    assert a.logit_variance.dtype == torch.float32
    torch.testing.assert_close(a.logit_variance, b.logit_variance, rtol=2e-4, atol=1e-6)


def test_chunks_and_batches_give_the_same_result():
    model, x, y = _case("seq", seed=5)
    curv = _curvature(model, x, y, "kfac")
    whole = natgrad.fisher_uncertainty(model, x, curv, prior_precision=0.5)
    chunked = natgrad.fisher_uncertainty(model, x, curv, prior_precision=0.5, chunk_size=5)
    loader = [(x[i : i + 7], y[i : i + 7]) for i in range(0, len(x), 7)]
    batched = natgrad.fisher_uncertainty(model, loader, curv, prior_precision=0.5)
    torch.testing.assert_close(chunked.logit_variance, whole.logit_variance, rtol=1e-12, atol=0)
    torch.testing.assert_close(batched.logit_variance, whole.logit_variance, rtol=1e-12, atol=0)


def test_model_inputs_and_curvature_are_left_unchanged():
    model, x, y = _case("cnn", seed=6)
    curv = _curvature(model, x, y, "ekfac")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = {k: [t.clone() for t in b.tensors().values()] for k, b in curv.blocks.items()}
    x0 = x.clone()
    natgrad.fisher_uncertainty(model, x, curv, prior_precision=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, b in curv.blocks.items():
        for t, t0 in zip(b.tensors().values(), stats[k], strict=True):
            assert torch.equal(t, t0)
    assert torch.equal(x, x0)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


class TinyEncoder(nn.Module):
    """An ``nn.TransformerEncoder``: its ``MultiheadAttention`` reads ``out_proj.weight``
    without calling the ``out_proj`` module, so no forward hook sees that layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x.reshape(-1, 4, 3))).mean(1))


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_transformer_encoder_default_engine_matches_the_dense_posterior(kind):
    # engine="auto" used to put MultiheadAttention's out_proj on the capture path and
    # then fail: "expected a NonDynamicallyQuantizableLinear to run in this forward pass"
    torch.manual_seed(7)
    model = TinyEncoder().double().eval()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    curv = _curvature(model, x, y, kind)
    xt = x[:3] + 0.2
    r = natgrad.fisher_uncertainty(model, xt, curv, prior_precision=0.9)
    torch.testing.assert_close(r.logit_variance, _reference(model, xt, curv, 0.9),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["diag", "kfac", "lowrank"])
def test_conv_bias_without_its_weight_matches_the_dense_posterior(kind):
    # a convolution whose bias is uncertain and whose weight is not (frozen, or left out
    # by params=) crashed on the capture path: "mat1 and mat2 shapes cannot be multiplied"
    model, x, y = _case("cnn", seed=9)
    model.c1.weight.requires_grad_(False)
    curv = _curvature(model, x, y, kind)
    xt = x[:4] - 0.2
    dense = Dense(model, xt, curv)
    r = natgrad.fisher_uncertainty(model, xt, curv, prior_precision=0.6)
    torch.testing.assert_close(r.logit_variance, dense.variance(0.6), rtol=1e-9, atol=1e-13)
    if kind != "lowrank":  # a low-rank curvature cannot be cut to a subset
        r = natgrad.fisher_uncertainty(model, xt, curv, prior_precision=0.6, params=["c2.bias"])
        torch.testing.assert_close(
            r.logit_variance, dense.variance(0.6, ["c2.bias"]), rtol=1e-9, atol=1e-13
        )


# -- review of the capture split: hooks, control flow, one-sample batches, groups -------


class _Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.reuse = False

    def forward(self, x):
        h = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        if self.reuse:
            h = torch.tanh(self.l2(h))
        return self.l3(h)


class _Centered(nn.Module):
    """Mixes samples (subtracts half the batch mean): no per-sample gradient exists."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h - 0.5 * h.mean(0, keepdim=True))


def _xy(n=30):
    torch.manual_seed(4)
    return torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 4, (n,))


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_a_forward_hook_that_changes_a_layer_output_takes_the_vmap_path(kind):
    # the capture path read the layer's own output (e_c ⊗ a) and ignored the hook's x2
    x, y = _xy()
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double().eval()
    m[2].register_forward_hook(lambda mod, i, o: o * 2.0)
    c = natgrad.estimate_curvature(m, (x, y), kind=kind, labels="exact", engine="vmap")
    got = natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5)
    want = natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5, engine="vmap")
    torch.testing.assert_close(got.logit_variance, want.logit_variance, rtol=1e-10, atol=1e-12)
    fast = natgrad.estimate_fisher(m, (x, y))
    slow = natgrad.estimate_fisher(m, (x, y), engine="vmap")
    assert_close_dict(dict(fast), dict(slow), rtol=1e-10, atol=1e-14)


def test_a_control_flow_change_after_a_remembered_split_is_refused_then_rechecked():
    x, y = _xy()
    m = _Flag().double().eval()
    c = natgrad.estimate_curvature(m, (x, y), kind="diag", labels="exact", engine="vmap")
    natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5)  # remembers the split
    m.reuse = True  # l2 now runs twice per forward
    with pytest.raises(RuntimeError, match="'l2' running once.*control flow changed"):
        natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5)
    got = natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5)  # checked again
    want = natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5, engine="vmap")
    torch.testing.assert_close(got.logit_variance, want.logit_variance, rtol=1e-10, atol=1e-12)
    m = _Flag().double().eval()  # the Fisher's capture path, alike
    natgrad.estimate_fisher(m, (x, y))
    m.reuse = True
    with pytest.raises(RuntimeError, match="'l2' running once.*control flow changed"):
        natgrad.estimate_fisher(m, (x, y))
    fast = natgrad.estimate_fisher(m, (x, y))
    assert_close_dict(dict(fast), dict(natgrad.estimate_fisher(m, (x, y), engine="vmap")),
                      rtol=1e-10, atol=1e-14)


def test_a_one_sample_first_call_does_not_vouch_for_later_batches():
    # one sample cannot show that the model mixes samples: its split is not remembered
    x, y = _xy()
    m = _Centered().double().eval()
    c = natgrad.estimate_curvature(m, (x, y), kind="diag", labels="exact", engine="vmap")
    natgrad.fisher_uncertainty(m, x[:1], c, prior_precision=0.5)
    got = natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5)
    want = natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5, engine="vmap")
    torch.testing.assert_close(got.logit_variance, want.logit_variance, rtol=1e-10, atol=1e-12)


def test_a_grouped_conv_with_a_diagonal_posterior_takes_the_vmap_path():
    # it crashed with a shape error: the unfolded inputs spanned every channel
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3))
    m = m.double().eval()
    x, y = torch.randn(12, 2, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    c = natgrad.estimate_curvature(m, (x, y), kind="diag", labels="exact")
    got = natgrad.fisher_uncertainty(m, x[:4], c, prior_precision=0.5)
    want = natgrad.fisher_uncertainty(m, x[:4], c, prior_precision=0.5, engine="vmap")
    torch.testing.assert_close(got.logit_variance, want.logit_variance, rtol=1e-10, atol=1e-12)


def test_per_sample_grads_refuses_a_layer_that_runs_twice_after_a_remembered_split():
    # its capture pass kept no run-once check: 1.44 relative error, silently
    x, y = _xy()
    m = _Flag().double().eval()
    natgrad.per_sample_grads(m, (x, y))
    m.reuse = True
    with pytest.raises(RuntimeError, match="'l2' running once.*control flow changed"):
        natgrad.per_sample_grads(m, (x, y))
    got = natgrad.per_sample_grads(m, (x, y))
    assert_close_dict(got, natgrad.per_sample_grads(m, (x, y), engine="vmap"),
                      rtol=1e-10, atol=1e-14)


def test_a_global_forward_hook_that_changes_an_output_takes_the_vmap_path():
    # a global hook runs before every module hook, so the capture path cannot read the
    # layer's own output: it used to read the hooked one (0.75 relative error)
    x, y = _xy()
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double().eval()
    target = m[2]
    h = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: 2.0 * o if mod is target else None
    )
    try:
        fast = natgrad.estimate_fisher(m, (x, y))
        slow = natgrad.estimate_fisher(m, (x, y), engine="vmap")
        assert_close_dict(dict(fast), dict(slow), rtol=1e-10, atol=1e-14)
        c = natgrad.estimate_curvature(m, (x, y), kind="diag", labels="exact", engine="vmap")
        got = natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5)
        want = natgrad.fisher_uncertainty(m, x[:6], c, prior_precision=0.5, engine="vmap")
        torch.testing.assert_close(got.logit_variance, want.logit_variance, rtol=1e-10, atol=1e-12)
    finally:
        h.remove()


def test_validation_batches_with_other_nested_inputs_take_their_own_split():
    # The first batch's context list is empty, so lin.weight is used once and its split
    # puts it on the capture path; the second's has one tensor, so lin.weight is also
    # read outside its layer and must take vmap: the grid's scores equal vmap's.
    from tests.engine.test_capture import ContextTied

    torch.manual_seed(0)
    model = ContextTied().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    c = torch.randn(5, 4, dtype=torch.float64)
    curv = natgrad.estimate_curvature(
        model, {"x": x, "context": [c], "labels": y}, kind="diag", labels="exact", engine="vmap"
    )
    val = [{"x": x[:4], "context": [], "labels": y[:4]},
           {"x": x[4:], "context": [c], "labels": y[4:]}]  # fmt: skip
    grid = [0.1, 1.0]
    got = natgrad.optimize_prior_precision(model, curv, val, grid=grid)
    want = natgrad.optimize_prior_precision(model, curv, val, grid=grid, engine="vmap")
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(want.scores),
                               rtol=1e-10, atol=1e-12)
