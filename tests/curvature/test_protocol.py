"""The Curvature contract, for every registered kind, against dense float64 matrices.

Each kind is estimated on a small float64 model; its dense matrix ``D`` is read off
column by column through ``mv``. Every other method must agree with ``D``: ``solve`` with a
dense solve, ``quad`` with ``vᵀ D v``, ``inverse_diagonal`` and ``logdet`` with the dense
inverse and ``slogdet``, ``diagonal`` with ``diag D``; ``D`` is symmetric PSD. For ``diag``
``D`` itself is checked against the brute-force per-sample Fisher.
"""

import pytest
import torch

import natgrad
from natgrad.curvature.protocol import BLOCK_KINDS
from tests.conftest import mlp
from tests.reference import (
    ce_sum,
    check_against_dense,
    dense_fisher,
    dense_from_mv,
    flatten_params,
    loop_grads,
    unflatten_params,
)

KINDS = sorted(natgrad.CURVATURE_KINDS)
LAM = 0.3


def _case():
    torch.manual_seed(0)
    model = mlp((4, 3, 3)).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, x, y


@pytest.fixture(params=KINDS)
def estimated(request):
    model, x, y = _case()
    curv = natgrad.estimate_curvature(model, (x, y), kind=request.param)
    shapes = {k: p.shape for k, p in model.named_parameters() if k in curv.structure()}
    return request.param, model, x, y, curv, shapes, dense_from_mv(curv, shapes)


def test_is_a_curvature_with_its_kind(estimated):
    kind, _, _, _, curv, shapes, _ = estimated
    assert isinstance(curv, natgrad.Curvature)
    assert set(curv.structure()) == set(shapes)
    assert curv.n_samples == 12


def test_dense_is_symmetric_psd(estimated):
    *_, dense = estimated
    torch.testing.assert_close(dense, dense.T, atol=1e-10, rtol=0)
    assert torch.linalg.eigvalsh(dense).min() > -1e-10


def test_methods_agree_with_dense(estimated):
    _, _, _, _, curv, shapes, dense = estimated
    names = list(shapes)
    torch.manual_seed(1)
    v = unflatten_params(torch.randn(dense.shape[0], dtype=torch.float64), shapes)
    vf = flatten_params(v, names)
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    inv = torch.linalg.inv(dense + LAM * eye)
    torch.testing.assert_close(flatten_params(curv.solve(v, LAM), names), inv @ vf)
    torch.testing.assert_close(curv.quad(v).double(), vf @ dense @ vf)
    torch.testing.assert_close(flatten_params(curv.diagonal(), names), dense.diagonal())
    torch.testing.assert_close(flatten_params(curv.inverse_diagonal(LAM), names), inv.diagonal())
    torch.testing.assert_close(
        curv.logdet(LAM).double(), torch.linalg.slogdet(dense + LAM * eye).logabsdet
    )


def test_quad_is_differentiable_with_gradient_2Dv(estimated):
    _, _, _, _, curv, shapes, dense = estimated
    names = list(shapes)
    torch.manual_seed(2)
    flat = torch.randn(dense.shape[0], dtype=torch.float64)
    v = {k: t.clone().requires_grad_(True) for k, t in unflatten_params(flat, shapes).items()}
    grads = torch.autograd.grad(curv.quad(v), [v[k] for k in names])
    got = torch.cat([g.reshape(-1) for g in grads]).double()
    torch.testing.assert_close(got, 2 * dense @ flat)


def test_state_dict_round_trips(estimated):
    kind, _, _, _, curv, shapes, dense = estimated
    clone = natgrad.CURVATURE_KINDS[kind].from_state_dict(curv.state_dict())
    torch.testing.assert_close(dense_from_mv(clone, shapes), dense, atol=0, rtol=0)



def test_curvature_load_reads_every_kind(estimated, tmp_path):
    # natgrad.Curvature.load dispatches on the file's format tag to the class that wrote it
    kind, model, _, _, curv, shapes, dense = estimated
    path = tmp_path / f"{kind}.safetensors"
    curv.save(path)
    for loaded in (natgrad.Curvature.load(path), natgrad.Curvature.load(path, model)):
        assert type(loaded) is type(curv)
        torch.testing.assert_close(dense_from_mv(loaded, shapes), dense, atol=0, rtol=0)
    again = type(curv).load(path, model, device="cpu")
    torch.testing.assert_close(dense_from_mv(again, shapes), dense, atol=0, rtol=0)

# Kinds whose ``a + b`` pools their statistics (the estimate on both batches together)
# instead of averaging the two operators: a sample-weighted mean of two Kronecker products
# is no Kronecker product. EKFAC also re-fits its diagonal in the pooled eigenbasis, which
# equals the operator mean only when both share the basis (checked with curv + curv here;
# differing bases against a dense projection in test_kronecker.py).
POOLED = {"kfac": "union", "ekfac": "same-basis"}


def test_sample_weighted_sum_and_scale(estimated):
    kind, model, x, y, curv, shapes, dense = estimated
    other = natgrad.estimate_curvature(model, (x[:5], y[:5]), kind=kind)
    d_other = dense_from_mv(other, shapes)
    both = curv + other
    assert both.n_samples == 17
    if POOLED.get(kind) is None:
        expected = (12 * dense + 5 * d_other) / 17
    elif POOLED[kind] == "union":
        union = (torch.cat([x, x[:5]]), torch.cat([y, y[:5]]))
        expected = dense_from_mv(natgrad.estimate_curvature(model, union, kind=kind), shapes)
    else:
        both = curv + curv
        assert both.n_samples == 24
        expected = dense
    torch.testing.assert_close(dense_from_mv(both, shapes), expected)
    torch.testing.assert_close(dense_from_mv(2.5 * curv, shapes), 2.5 * dense)


def test_restrict_to_the_last_layer_is_its_dense_block(estimated):
    """``restrict(last layer)``: every method equals the dense block ``D[last, last]``
    (block-diagonal kinds); a coupled kind refuses, naming the fix."""
    kind, _, _, _, curv, shapes, dense = estimated
    last = ["2.weight", "2.bias"]
    if kind not in BLOCK_KINDS:
        with pytest.raises(ValueError, match="cannot be restricted.*params="):
            curv.restrict(last)
        return
    sub = curv.restrict(last)
    assert isinstance(sub, natgrad.Curvature) and sub.names() == last
    lo = sum(s.numel() for k, s in shapes.items() if k not in last)
    assert torch.count_nonzero(dense[lo:, :lo]) == 0  # nothing couples the last layer
    check_against_dense(sub, {k: shapes[k] for k in last}, dense[lo:, lo:])


def test_diag_dense_is_the_brute_force_fisher():
    model, x, y = _case()
    curv = natgrad.estimate_curvature(model, (x, y), kind="diag")
    shapes = {k: p.shape for k, p in model.named_parameters()}
    ref = dense_fisher(loop_grads(model, ce_sum, x, y), list(shapes))
    torch.testing.assert_close(dense_from_mv(curv, shapes), torch.diag(ref.diagonal()))


def test_unknown_kind_lists_the_valid_ones():
    model, x, y = _case()
    with pytest.raises(ValueError, match="valid kinds"):
        natgrad.estimate_curvature(model, (x, y), kind="shampoo")


# -- the model check: once per estimate_curvature call ----------------------------------------

_BN_MESSAGE = (
    r"Module '1' \(BatchNorm1d\) is in train mode: it normalizes with batch statistics, so "
    r"one sample's output depends on the others and per-sample gradients do not exist\. "
    r"Call model.eval\(\) before estimating the Fisher, or replace BatchNorm with "
    r"GroupNorm/LayerNorm\."
)


def _count_model_checks(monkeypatch):
    """Wrap ``check_fixed_model`` wherever a natgrad module imported it; return the count."""
    import sys

    from natgrad.engine import checks

    original, calls = checks.check_fixed_model, []

    def counting(model, what):
        calls.append(what)
        return original(model, what)

    for name, mod in list(sys.modules.items()):
        if name.startswith("natgrad") and getattr(mod, "check_fixed_model", None) is original:
            monkeypatch.setattr(mod, "check_fixed_model", counting)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_estimate_curvature_checks_the_model_once(kind, monkeypatch):
    model, x, y = _case()
    calls = _count_model_checks(monkeypatch)
    natgrad.estimate_curvature(model, [(x, y), (x, y)], kind=kind)
    assert len(calls) == 1, calls


@pytest.mark.parametrize("kind", KINDS)
def test_train_mode_batchnorm_error_is_the_batch_mixing_one(kind, monkeypatch):
    model, x, y = _case()
    model = torch.nn.Sequential(model[0], torch.nn.BatchNorm1d(3), *model[1:]).double().train()
    calls = _count_model_checks(monkeypatch)
    with pytest.raises(ValueError, match=_BN_MESSAGE):
        natgrad.estimate_curvature(model, (x, y), kind=kind)
    assert len(calls) == 1, calls


def test_a_registered_kind_with_its_own_estimate_is_checked_by_the_dispatcher(monkeypatch):
    # a kind whose estimate never looks at the model's mode still refuses a train-mode
    # BatchNorm model: overriding estimate resets CHECKS_MODEL, so estimate_curvature checks
    from natgrad.curvature import protocol
    from natgrad.curvature.diagonal import DiagonalFisher

    @protocol.register_curvature("diag_zero_test")
    class Zero(DiagonalFisher):
        kind = "diag_zero_test"

        @classmethod
        def estimate(cls, model, data, likelihood="categorical", **options):
            return cls({k: torch.zeros_like(p) for k, p in model.named_parameters()}, 1)

    class Fast:  # a mixin (no Curvature) whose estimate comes first in the MRO
        @classmethod
        def estimate(cls, model, data, likelihood="categorical", **options):
            return DiagonalFisher({k: torch.zeros_like(p) for k, p in model.named_parameters()}, 1)

    class Mixed(Fast, DiagonalFisher):
        pass

    class Plain(DiagonalFisher):  # inherits the checking estimate
        pass

    try:
        assert DiagonalFisher.CHECKS_MODEL and not Zero.CHECKS_MODEL
        assert not Mixed.CHECKS_MODEL and Plain.CHECKS_MODEL
        model, x, y = _case()
        calls = _count_model_checks(monkeypatch)
        natgrad.estimate_curvature(model, (x, y), kind="diag_zero_test")
        assert calls == ["estimate_curvature(kind='diag_zero_test')"]
        bn = torch.nn.Sequential(model[0], torch.nn.BatchNorm1d(3), *model[1:]).train()
        with pytest.raises(ValueError, match=_BN_MESSAGE):
            natgrad.estimate_curvature(bn, (x, y), kind="diag_zero_test")
    finally:
        del protocol.CURVATURE_KINDS["diag_zero_test"]


def _leaves(state, prefix=""):
    """``{path: leaf}`` of a nested state_dict (tensors and plain values)."""
    if isinstance(state, dict):
        return {k2: v2 for k, v in state.items() for k2, v2 in _leaves(v, f"{prefix}/{k}").items()}
    if isinstance(state, (list, tuple)):
        return {k2: v2 for i, v in enumerate(state) for k2, v2 in _leaves(v, f"{prefix}/{i}").items()}
    return {prefix: state}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("saved", "model_dtype"), [(torch.float32, torch.float64),
                                                    (torch.float64, torch.float32)])
def test_load_with_a_model_follows_its_dtype(kind, saved, model_dtype, tmp_path):
    """With a model, every tensor is the exact cast of the stored one to the model's
    accumulation dtype; without one, the file's dtype; plain values unchanged."""
    model, x, y = _case()
    stored = natgrad.estimate_curvature(model, (x, y), kind=kind).to(saved)
    stored.save(tmp_path / "c.safetensors")
    want = _leaves(stored.state_dict())
    loaded = natgrad.Curvature.load(tmp_path / "c.safetensors", model.to(model_dtype))
    plain = natgrad.Curvature.load(tmp_path / "c.safetensors")
    for got, dtype in ((_leaves(loaded.state_dict()), model_dtype),
                       (_leaves(plain.state_dict()), saved)):
        assert got.keys() == want.keys()
        for k, v in want.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k
            else:
                assert type(got[k]) is type(v) and (got[k] == v if not isinstance(v, torch.Tensor)
                                                    else torch.equal(got[k], v)), k
