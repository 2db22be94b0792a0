"""Fault suite, class "wrong results": every per-sample path is exact or falls back to an
exact one, checked against brute-force loops (one backward pass per sample) from
``tests/reference.py``.

Classes: modules torch.func composes wrongly (PReLU), tensors shared by the whole
batch, pruned Conv weights on the capture path, modules vmap cannot trace (GRU, LSTM,
Embedding with ``max_norm`` or ``sparse=True``), float64 precision, ``chunk_size``
validation on every engine.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import natgrad
from tests.reference import (
    assert_close_dict,
    exact_categorical_fisher_by,
    fisher_from_grads,
    loop_grads_by,
)

ENGINES = ("vmap", "auto")


def ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def rel_err(a: dict, b: dict) -> float:
    return max(
        ((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-300)).item()
        for k in b
    )


def fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "per-sample loop" in str(w.message)]


# -- 1. modules whose vjp-inside-vmap composition torch.func gets wrong (PReLU) ------------


def prelu_net(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, classes)).double()


@pytest.mark.parametrize("chunk_size", [None, 2, 1])
def test_prelu_per_sample_grads_shapes_and_values(chunk_size):
    model = prelu_net()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = natgrad.per_sample_grads(model, (x, y), chunk_size=chunk_size)
    for k, p in model.named_parameters():
        assert got[k].shape == (6, *p.shape), k
    ref = loop_grads_by(model, lambda i: ce(model(x[i : i + 1]), y[i : i + 1]), 6)
    assert_close_dict(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunk_size", [None, 2, 3])
def test_prelu_exact_fisher(engine, chunk_size):
    """Two classes: the label columns (2) equal the chunk (2), where the nested vmap
    composition mixed samples with columns without changing any shape."""
    model = prelu_net(classes=2)
    x = torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = natgrad.estimate_fisher(
            model, x, labels="exact", engine=engine, chunk_size=chunk_size
        )
    ref = exact_categorical_fisher_by(model, lambda i: model(x[i : i + 1])[0], 6)
    assert rel_err(got, ref) < 1e-10
    assert not fallback_warnings(record)  # a vmap composition without nesting suffices


def test_prelu_exact_per_sample_grads_have_label_axis():
    model = prelu_net()
    x = torch.randn(5, 4, dtype=torch.float64)
    got = natgrad.per_sample_grads(model, x, labels="exact", chunk_size=3)
    for k, p in model.named_parameters():
        assert got[k].shape == (5, 2, *p.shape), k  # C - 1 = 2 factor columns (3 classes)
    ref = exact_categorical_fisher_by(model, lambda i: model(x[i : i + 1])[0], 5)
    assert rel_err({k: (g**2).sum(1).mean(0) for k, g in got.items()}, ref) < 1e-10


def test_prelu_gaussian_exact_fisher():
    """Constant label columns (``e_d / σ``): ``F = (1/N) Σ_n Σ_d (∂f_d/∂θ)²``."""
    model = prelu_net(classes=2)
    x = torch.randn(4, 4, dtype=torch.float64)
    got = natgrad.estimate_fisher(model, x, "gaussian", labels="exact", chunk_size=2)
    named = dict(model.named_parameters())
    ref = {k: torch.zeros_like(p) for k, p in named.items()}
    for i in range(4):
        for d in range(2):
            grads = torch.autograd.grad(model(x[i : i + 1])[0, d], list(named.values()))
            for k, g in zip(named, grads, strict=True):
                ref[k] += g**2 / 4
    assert rel_err(got, ref) < 1e-10


def laplace_reference(model, x, fisher, n_data, delta, forward=None):
    """``Var f_c(x_n) = Σ_i J_ci(x_n)² / (N F_i + δ)`` by one backward per sample and output."""
    forward = forward or (lambda i: model(x[i : i + 1])[0])
    named = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        out = forward(i)
        row = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(forward(i)[c], list(named.values()))
            row.append(sum((g**2 / (n_data * fisher[k] + delta)).sum() for k, g in zip(named, grads, strict=True)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("classes,n", [(2, 2), (3, 5)])
def test_prelu_fisher_uncertainty(classes, n):
    """jacrev inside vmap mixed samples with output rows (0.32 off at 2 classes, 2 samples)."""
    model = prelu_net(classes)
    x = torch.randn(n, 4, dtype=torch.float64)
    torch.manual_seed(1)
    fisher = natgrad.DiagonalFisher(
        {k: torch.rand_like(p) + 0.1 for k, p in model.named_parameters()}, 10
    )
    rep = natgrad.fisher_uncertainty(model, x, fisher, prior_precision=0.5, chunk_size=2)
    ref = laplace_reference(model, x, fisher, 10, 0.5)
    torch.testing.assert_close(rep.logit_variance.double(), ref, rtol=1e-10, atol=1e-12)


def test_wrong_shapes_from_vmap_fall_back_to_the_exact_loop(monkeypatch):
    """If torch.func returns per-sample results of the wrong shape, they are never
    returned: one warning, then the exact loop."""
    import natgrad.engine.per_sample as engine

    real = torch.func.vmap

    def broken_vmap(fn, *args, **kwargs):
        inner = real(fn, *args, **kwargs)
        return lambda *a: {k: v.unsqueeze(1) for k, v in inner(*a).items()}

    monkeypatch.setattr(engine, "vmap", broken_vmap)
    model = prelu_net()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.warns(RuntimeWarning, match=r"vmap returned per-sample results of shape"):
        got = natgrad.estimate_fisher(model, (x, y), engine="vmap", chunk_size=2)
    ref = loop_grads_by(model, lambda i: ce(model(x[i : i + 1]), y[i : i + 1]), 5)
    assert rel_err(got, fisher_from_grads(ref)) < 1e-10


@pytest.mark.parametrize(
    "mode,shapes,phrase",
    [
        ("squares", {"w": (4, 4, 2, 3)}, r"shape \(4, 4, 2, 3\) for 'w' \(expected \(4, 2, 3\)\)"),
        ("grads", {"w": (4, 2, 3)}, r"for 'w' \(expected \(4, J, 2, 3\)\)"),
        ("grads", {"w": (4, 1, 2, 3), "b": (4, 2, 2)}, r"for 'b'"),
    ],
)
def test_shape_guard_names_the_parameter(mode, shapes, phrase):
    import re

    from natgrad.engine.per_sample import bad_shape

    params = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    res = {k: torch.zeros(shapes.get(k, (4, 1, *p.shape) if mode == "grads" else (4, *p.shape)))
           for k, p in params.items()}  # fmt: skip
    msg = bad_shape(res, params, 4, mode)
    assert msg is not None and re.search(phrase, msg), msg
    good = {k: torch.zeros(4, 1, *p.shape) if mode == "grads" else torch.zeros(4, *p.shape)
            for k, p in params.items()}  # fmt: skip
    assert bad_shape(good, params, 4, mode) is None


# -- 2. tensors shared by the whole batch reach the model unchanged -------------------------


class Scaled(nn.Module):
    """``logits = lin(x) * temp[0] + temp[1]``: ``temp`` (2,) is one setting for all samples."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, temp):
        if temp.shape != (2,):
            raise AssertionError(f"temp reached the model as {tuple(temp.shape)}")
        return self.lin(x) * temp[0] + temp[1]


class MaskedAttention(nn.Module):
    """Single-head attention over ``x (N, T, D)`` with a shared additive mask ``(T, T)``."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x, mask):
        if mask.dim() != 2:
            raise AssertionError(f"mask reached the model as {tuple(mask.shape)}")
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask.unsqueeze(0)
        return self.head((scores.softmax(-1) @ v).mean(1))


def causal(T):
    return torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)


def scaled_case(n=6):
    torch.manual_seed(0)
    model = Scaled().double()
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    temp = torch.tensor([1.7, -0.3], dtype=torch.float64)
    ref = loop_grads_by(model, lambda i: ce(model(x[i : i + 1], temp), y[i : i + 1]), n)
    return model, x, y, temp, ref


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_shared_vector_in_dict_batch(engine, chunk_size):
    """chunk_size=2 equals temp's length: a chunk must not mistake it for per-sample."""
    model, x, y, temp, ref = scaled_case()
    batch = {"temp": temp, "x": x, "labels": y}  # the shared tensor first: N comes from labels
    got = natgrad.estimate_fisher(model, batch, engine=engine, chunk_size=chunk_size)
    assert rel_err(got, fisher_from_grads(ref)) < 1e-10


def test_shared_vector_per_sample_grads():
    model, x, y, temp, ref = scaled_case()
    got = natgrad.per_sample_grads(model, {"x": x, "temp": temp, "labels": y})
    assert_close_dict(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("labels", ["empirical", "exact"])
def test_shared_attention_mask(engine, labels):
    torch.manual_seed(0)
    model = MaskedAttention().double()
    x, y, mask = torch.randn(5, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,)), causal(4)
    got = natgrad.estimate_fisher(
        model, {"x": x, "mask": mask, "labels": y}, engine=engine, labels=labels
    )
    if labels == "exact":
        ref = exact_categorical_fisher_by(model, lambda i: model(x[i : i + 1], mask)[0], 5)
    else:
        one = lambda i: ce(model(x[i : i + 1], mask), y[i : i + 1])  # noqa: E731
        ref = fisher_from_grads(loop_grads_by(model, one, 5))
    assert rel_err(got, ref) < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
def test_ambiguous_shared_tensor_marked_with_shared(engine):
    """A (T, T) mask with T == N has the batch size as its first dimension; wrapped in
    natgrad.shared it is passed whole to every sample."""
    torch.manual_seed(0)
    model = MaskedAttention().double()
    x, y, mask = torch.randn(4, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)), causal(4)
    batch = {"x": x, "mask": natgrad.shared(mask), "labels": y}
    got = natgrad.estimate_fisher(model, batch, engine=engine, chunk_size=2)
    one = lambda i: ce(model(x[i : i + 1], mask), y[i : i + 1])  # noqa: E731
    ref = loop_grads_by(model, one, 4)
    assert rel_err(got, fisher_from_grads(ref)) < 1e-10
    assert_close_dict(natgrad.per_sample_grads(model, batch), ref, rtol=1e-10, atol=1e-12)


def test_leading_dim_equal_to_n_is_per_sample():
    """The documented rule: without natgrad.shared, a tensor whose first dimension is
    N holds one row per sample (here a per-sample temperature pair)."""
    torch.manual_seed(0)
    model = Scaled().double()
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 3, (2,))
    temps = torch.tensor([[1.5, 0.1], [0.5, -0.2]], dtype=torch.float64)

    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, temp):
            return self.inner(x, temp[0])  # one sample: temp (1, 2)

    wrapped = PerSample()
    got = natgrad.per_sample_grads(wrapped, {"x": x, "temp": temps, "labels": y})
    one = lambda i: ce(wrapped(x[i : i + 1], temps[i : i + 1]), y[i : i + 1])  # noqa: E731
    assert_close_dict(got, loop_grads_by(wrapped, one, 2), rtol=1e-10, atol=1e-12)


def test_shared_tensor_in_fisher_uncertainty():
    """``Var f_c(x_n) = Σ_i J_ci(x_n)² / (N F_i + δ)`` with a shared ``temp``."""
    model, x, _, temp, _ = scaled_case(n=4)
    torch.manual_seed(1)
    fisher = natgrad.DiagonalFisher(
        {k: torch.rand_like(p) + 0.1 for k, p in model.named_parameters()}, 10
    )
    rep = natgrad.fisher_uncertainty(model, {"x": x, "temp": temp}, fisher, prior_precision=0.5)
    ref = laplace_reference(model, x, fisher, 10, 0.5, lambda i: model(x[i : i + 1], temp)[0])
    torch.testing.assert_close(rep.logit_variance.double(), ref, rtol=1e-10, atol=1e-12)


def test_shared_marker_rejects_non_tensors():
    with pytest.raises(TypeError, match="natgrad.shared expects a tensor"):
        natgrad.shared([1.0, 2.0])


# -- 3. pruned Conv weights on the capture path --------------------------------------------


def pruned_conv(dim: int, kernel: int, how: str):
    torch.manual_seed(0)
    conv = (nn.Conv1d if dim == 1 else nn.Conv2d)(2, 4, kernel, padding=kernel // 2)
    side = 5
    flat = 4 * side**dim
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3)).double()
    if how == "l1":
        prune.l1_unstructured(model[0], "weight", amount=0.4)
    elif how == "out_channels":
        prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    else:  # input channels
        prune.ln_structured(model[0], "weight", amount=0.5, n=1, dim=1)
    prune.random_unstructured(model[0], "bias", amount=0.5)
    x = torch.randn(5, 2, *([side] * dim), dtype=torch.float64)
    return model, x, torch.randint(0, 3, (5,))


@pytest.mark.parametrize(
    "dim,kernel,how",
    [(1, 3, "l1"), (1, 1, "out_channels"), (2, 3, "out_channels"), (2, 1, "l1"),
     (2, 3, "in_channels")],
)  # fmt: skip
def test_pruned_conv_fast_engine(dim, kernel, how):
    model, x, y = pruned_conv(dim, kernel, how)
    got = natgrad.estimate_fisher(model, (x, y), engine="fast")
    ref = fisher_from_grads(loop_grads_by(model, lambda i: ce(model(x[i : i + 1]), y[i : i + 1]), 5))
    assert "0.weight_orig" in got and "0.bias_orig" in got
    assert rel_err(got, ref) < 1e-10
    assert (got["0.weight_orig"][model[0].weight_mask == 0] == 0).all()


def test_pruned_conv_fast_engine_exact_labels():
    model, x, _ = pruned_conv(2, 3, "out_channels")
    got = natgrad.estimate_fisher(model, x, labels="exact", engine="fast")
    ref = exact_categorical_fisher_by(model, lambda i: model(x[i : i + 1])[0], 5)
    assert rel_err(got, ref) < 1e-10


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_pruned_conv_preconditioner(kind):
    """First refresh: ``C = C_batch``. ``diag``: the pruned conv's parameters are
    preconditioned ``Δ = g / (F + λ)``, with ``F`` from the brute-force loop; ``kfac``: by
    the masked K-FAC step ``M ⊙ (G ⊗ A + λI)⁻¹ (M ⊙ g)`` (dense float64, factors from the
    recorded inputs and per-sample output gradients)."""
    model, x, y = pruned_conv(2, 3, "out_channels")
    lam = 0.1
    pre = natgrad.FisherPreconditioner(model, kind=kind, damping=lam, kfac_damping="exact")
    if kind == "kfac":
        from tests.curvature.test_kfac_masked import _block, _dense, hand_factors

        P = _dense(hand_factors(model, x, y), model, "0", model[0], lam, project=True)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        g = {k: p.grad.clone() for k, p in model.named_parameters()}
        pre.step((x, y))
        step = _block({k: p.grad for k, p in model.named_parameters()}, model, "0", model[0])
        torch.testing.assert_close(step, P @ _block(g, model, "0", model[0]), rtol=1e-9,
                                   atol=1e-12)
        assert pre.curvature.structure()["0.weight_orig"] == "kfac"
        return
    F_ref = fisher_from_grads(
        loop_grads_by(model, lambda i: ce(model(x[i : i + 1]), y[i : i + 1]), 5)
    )
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = {k: p.grad.clone() for k, p in model.named_parameters()}
    pre.step((x, y))
    for k in ("0.weight_orig", "0.bias_orig"):
        p = dict(model.named_parameters())[k]
        torch.testing.assert_close(p.grad, g[k] / (F_ref[k] + lam), rtol=1e-8, atol=1e-12)


# -- 4. modules vmap cannot trace: one warning, then the exact per-sample loop -----------


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def recurrent_case(cell, dtype):
    torch.manual_seed(0)
    model = Recurrent(cell).to(dtype)
    return model, torch.randn(5, 4, 3, dtype=dtype), torch.randint(0, 3, (5,))


def embedding_case(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 4, **kw), nn.Flatten(), nn.Linear(8, 3)).double()
    ids = torch.randint(0, 9, (5, 2))
    if kw.get("max_norm") is not None:
        with torch.no_grad():
            model[0].weight.mul_(3.0)  # rows above max_norm: renormalized in every forward
    return model, ids, torch.randint(0, 3, (5,))


UNTRACEABLE = {
    "gru-float32": (lambda: recurrent_case(nn.GRU, torch.float32), "GRU"),
    "gru-float64": (lambda: recurrent_case(nn.GRU, torch.float64), "GRU"),
    "lstm-float64": (lambda: recurrent_case(nn.LSTM, torch.float64), "LSTM"),
    "embedding-max_norm": (lambda: embedding_case(max_norm=1.0), "Embedding"),
    "embedding-sparse": (lambda: embedding_case(sparse=True), "Embedding"),
}


def brute_force(model, x, y):
    return loop_grads_by(model, lambda i: ce(model(x[i : i + 1]), y[i : i + 1]), len(y))


@pytest.mark.parametrize("case", list(UNTRACEABLE))
def test_untraceable_module_falls_back_with_one_warning(case):
    make, module = UNTRACEABLE[case]
    model, x, y = make()
    ref = brute_force(model, x, y)  # Embedding(max_norm) renormalizes here, once and for all
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = natgrad.estimate_fisher(model, (x, y), engine="vmap", chunk_size=2)
    msgs = fallback_warnings(record)
    assert len(msgs) == 1 and module in msgs[0], msgs
    tol = 1e-5 if x.dtype == torch.float32 else 1e-10
    assert rel_err(got, fisher_from_grads(ref)) < tol


@pytest.mark.parametrize("case", ["gru-float64", "embedding-sparse"])
def test_untraceable_module_per_sample_grads(case):
    make, module = UNTRACEABLE[case]
    model, x, y = make()
    with pytest.warns(RuntimeWarning, match=module):
        got = natgrad.per_sample_grads(model, (x, y), engine="vmap")
    ref = brute_force(model, x, y)
    assert_close_dict(got, ref, rtol=1e-10, atol=1e-12)
    # engine="auto": the capture path covers the sparse Embedding (no fallback needed)
    assert_close_dict(natgrad.per_sample_grads(model, (x, y)), ref, rtol=1e-10, atol=1e-12)


def test_untraceable_module_on_auto_engine():
    """Linear head on the capture path, the GRU through the fallback."""
    model, x, y = recurrent_case(nn.GRU, torch.float64)
    with pytest.warns(RuntimeWarning, match="GRU"):
        got = natgrad.estimate_fisher(model, (x, y), engine="auto", labels="exact")
    ref = exact_categorical_fisher_by(model, lambda i: model(x[i : i + 1])[0], 5)
    assert rel_err(got, ref) < 1e-10


class FailingBackward(torch.autograd.Function):
    """Identity whose backward always fails: the forward checks pass, every per-sample
    gradient fails (under vmap and in the loop alike)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("the model's own backward failed")


def test_model_error_is_not_hidden_by_the_fallback():
    """An error the exact loop raises too is the model's own: it surfaces as it is,
    with no fallback warning."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return FailingBackward.apply(self.lin(x))

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="the model's own backward failed"):
            natgrad.estimate_fisher(
                Broken(), (torch.randn(3, 4), torch.tensor([0, 1, 2])), engine="vmap"
            )
    assert not fallback_warnings(record)


# -- 5. precision: a float64 model gets float64 sums and results ----------------------------


def mlp64():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.LayerNorm(3)).double()


def mc_reference(model, x, k, seed=0):
    """``(1/N) Σ_n (1/k) Σ_j g(x_n, ỹ_nj)²``, with the draws natgrad documents: ``k``
    categorical draws per sample from a generator seeded with ``seed``."""
    with torch.no_grad():
        p = model(x).softmax(-1)
    draws = torch.multinomial(p, k, replacement=True, generator=torch.Generator().manual_seed(seed))
    acc = None
    for j in range(k):
        yj = draws[:, j]
        g = fisher_from_grads(
            loop_grads_by(model, lambda i, yj=yj: ce(model(x[i : i + 1]), yj[i : i + 1]), len(x))
        )
        acc = g if acc is None else {n: acc[n] + g[n] for n in acc}
    return {n: v / k for n, v in acc.items()}


@pytest.mark.parametrize("engine", ["vmap", "auto", "fast"])
@pytest.mark.parametrize("labels", ["empirical", "mc", "exact"])
def test_float64_model_gets_float64_fisher(engine, labels):
    model = mlp64()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = natgrad.estimate_fisher(
        model,
        (x, y),
        labels=labels,
        mc_samples=3,
        engine=engine,
        generator=torch.Generator().manual_seed(0),
    )
    if labels == "empirical":
        ref = fisher_from_grads(brute_force(model, x, y))
    elif labels == "exact":
        ref = exact_categorical_fisher_by(model, lambda i: model(x[i : i + 1])[0], 7)
    else:
        ref = mc_reference(model, x, 3)
    assert all(v.dtype == torch.float64 for v in got.values())
    assert rel_err(got, ref) < 1e-12  # float32 sums gave ~4e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models_accumulate_in_float32(dtype):
    model = mlp64().to(dtype)
    x, y = torch.randn(7, 4, dtype=dtype), torch.randint(0, 3, (7,))
    got = natgrad.estimate_fisher(model, (x, y))
    ref = fisher_from_grads(
        {k: g.double() for k, g in brute_force(model, x, y).items()}
    )
    assert all(v.dtype == torch.float32 for v in got.values())
    assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 5e-2)


# -- 6. chunk_size is validated on every engine (one message) ------------------------------


@pytest.mark.parametrize("engine", ["vmap", "auto", "fast"])
@pytest.mark.parametrize("chunk_size", [0, -2, 1.5])
def test_chunk_size_validated_on_every_engine(engine, chunk_size):
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"Invalid chunk_size: .*integer >= 1 or None"):
        natgrad.estimate_fisher(
            model, (torch.randn(3, 4), torch.tensor([0, 1, 2])), engine=engine,
            chunk_size=chunk_size,
        )  # fmt: skip
