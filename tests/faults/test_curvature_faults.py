"""Bad inputs to the structured curvatures (KroneckerFisher, LowRankFisher): named errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import natgrad
from natgrad import KroneckerFisher, LowRankFisher
from natgrad.curvature.kronecker import FactorMemoryError, default_factor_bytes
from tests.conftest import mlp


def _case(n=6):
    torch.manual_seed(0)
    model = mlp((3, 4, 3)).double()
    return model, torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 3, (n,))


def _est(model, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return natgrad.estimate_curvature(model, data, **kw)


# -- coverage and memory ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_a_kind_that_covers_no_selected_parameter_is_named(kind):
    model = nn.Sequential(nn.LayerNorm(3)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=f"kind='{kind}' covers none .*0.weight \\(LayerNorm"):
        natgrad.estimate_curvature(model, (x, y), kind=kind)


def test_tied_weights_alone_are_not_covered():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    ids, y = torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="weight shared by 0.weight and 1.weight"):
        natgrad.estimate_curvature(model, (ids, y), kind="kfac")


class _TiedFunctionally(nn.Module):
    """An embedding whose weight is the output head through F.linear (nanoGPT style)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)

    def forward(self, ids):
        return nn.functional.linear(self.emb(ids), self.emb.weight)


def test_a_weight_read_outside_its_layer_alone_is_not_covered():
    ids, y = torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match=r"covers none .*\['emb'\].*read outside the layer's own"
                       r" call .*kind='diag'"):
        natgrad.estimate_curvature(_TiedFunctionally(), (ids, y), kind="kfac")


def test_kfac_factors_names_a_layer_read_outside_its_call():
    from natgrad.curvature.kfac import kfac_factors

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return self.l(x) + nn.functional.linear(x, self.l.weight)

    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"\['l'\].*F.linear\(x, layer.weight\).*leave them "
                       "out of `params`"):
        kfac_factors(Twice(), (x, y))



@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_a_layer_pruned_by_torch_prune_is_covered(kind):
    # pruned layers used to be refused ("no Kronecker form"); their masked Kronecker form
    # is tested against dense references in tests/curvature/test_kfac_masked.py, and a
    # reparametrization that is not a mask is refused in tests/faults/test_masked_kfac_faults.py
    model, x, y = _case()
    natgrad.apply_masks(model, {"0.weight": torch.rand(4, 3) > 0.5})
    c = natgrad.estimate_curvature(model, (x, y), kind=kind, params=["0.weight_orig", "0.bias"])
    assert c.structure() == {"0.bias": kind, "0.weight_orig": kind}
    natgrad.FisherPreconditioner(model, kind="kfac", source="backward").close()


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_a_layer_whose_bias_torch_pruned_is_covered(kind):
    model, x, y = _case()
    natgrad.apply_masks(model, {"0.bias": torch.tensor([1.0, 0.0, 1.0, 1.0])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = natgrad.estimate_curvature(model, (x, y), kind=kind)
    assert c.structure()["0.bias_orig"] == kind
    assert c.diagonal()["0.bias_orig"][1] == 0


def test_a_factor_over_the_memory_limit_names_max_factor_dim():
    model, x, y = _case()
    with pytest.raises(FactorMemoryError, match="max_factor_dim"):
        natgrad.estimate_curvature(model, (x, y), kind="kfac", max_factor_bytes=200)
    ok = natgrad.estimate_curvature(model, (x, y), kind="kfac", max_factor_bytes=400,
                                    max_factor_dim=2)
    assert ok.blocks["0"].A.dim() == 2  # every side diagonal now


def test_a_factor_larger_than_available_memory_is_refused_before_allocating():
    model = nn.Linear(300_000, 2)  # A would be 300001^2 floats (~720 GB with its eigenbasis)
    x, y = torch.randn(2, 300_000), torch.tensor([0, 1])
    with pytest.raises(MemoryError, match="layer '' factor A 300001x300001.*max_factor_dim"):
        natgrad.estimate_curvature(model, (x, y), kind="kfac")


def _fake_meminfo(monkeypatch, available_kb, total_kb):
    """``/proc/meminfo`` reads as given (the rest of ``open`` untouched)."""
    import builtins
    import io

    real = builtins.open
    text = f"MemTotal: {total_kb} kB\nMemFree: 0 kB\nMemAvailable: {available_kb} kB\n"

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            return io.StringIO(text)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_momentary_dip_of_available_memory_does_not_refuse_small_factors(monkeypatch):
    # MemAvailable reading 0 kB under load (a flake: "0.00 GiB allowed"): small factors
    # still fit, since half the total is the floor of the default allowance
    model, x, y = _case()
    _fake_meminfo(monkeypatch, available_kb=0, total_kb=8 * 2**20)
    assert default_factor_bytes(torch.device("cpu")) == 4 * 2**30
    curv = _est(model, (x, y), kind="kfac")
    assert curv.structure()["0.weight"] == "kfac"
    _fake_meminfo(monkeypatch, available_kb=6 * 2**20, total_kb=8 * 2**20)
    assert default_factor_bytes(torch.device("cpu")) == 6 * 2**30


def test_factors_over_half_the_memory_are_refused_during_a_dip(monkeypatch):
    # A 3001x3001 with its eigenbasis: 72 MB of float32 (smaller factors are never refused
    # by the default: half of any machine PyTorch runs on holds them)
    model = nn.Linear(3000, 2)
    x, y = torch.randn(2, 3000), torch.tensor([0, 1])
    _fake_meminfo(monkeypatch, available_kb=0, total_kb=100_000)  # floor: 50 MB
    with pytest.raises(FactorMemoryError,
                       match=r"more than the 48\.83 MiB allowed \(the default: the available "
                             r"memory, at least half the total.*max_factor_dim"):
        _est(model, (x, y), kind="kfac")


@pytest.mark.parametrize("opt,val", [("max_factor_dim", 0), ("max_factor_bytes", -1)])
def test_bad_kronecker_options(opt, val):
    model, x, y = _case()
    with pytest.raises(ValueError, match=opt):
        natgrad.estimate_curvature(model, (x, y), kind="kfac", **{opt: val})


def test_bad_kind_to_a_class_and_bad_rank():
    model, x, y = _case()
    with pytest.raises(ValueError, match="kind.*'kfac', 'ekfac'"):
        KroneckerFisher.estimate(model, (x, y), kind="lowrank")
    with pytest.raises(ValueError, match="rank"):
        natgrad.estimate_curvature(model, (x, y), kind="lowrank", rank=0)


# -- data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank"])
def test_no_samples(kind):
    model, _, _ = _case()
    with pytest.raises(ValueError, match="No samples"):
        natgrad.estimate_curvature(model, [], kind=kind)


def test_ekfac_refuses_a_one_shot_iterator():
    model, x, y = _case()
    with pytest.raises(ValueError, match="one-shot iterator"):
        natgrad.estimate_curvature(model, iter([(x, y)]), kind="ekfac")


def test_ekfac_data_that_changes_between_passes():
    model, x, y = _case()

    class Shrinking:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter([(x, y)] if self.calls == 1 else [(x[:2], y[:2])])

    with pytest.raises(ValueError, match="saw 6 samples in its first pass.*2 in its second"):
        natgrad.estimate_curvature(model, Shrinking(), kind="ekfac")


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank"])
def test_non_finite_inputs_raise_floating_point_error(kind):
    model, x, y = _case()
    x[2, 1] = float("nan")
    with pytest.raises(FloatingPointError):
        _est(model, (x, y), kind=kind)


@pytest.mark.parametrize("kind", ["kfac", "lowrank"])
def test_distributed_true_without_a_process_group(kind):
    model, x, y = _case()
    with pytest.raises(RuntimeError, match="distributed=True.*not initialized"):
        natgrad.estimate_curvature(model, (x, y), kind=kind, distributed=True)


# -- methods and combination -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank"])
def test_bad_vectors_damping_and_scales(kind):
    model, x, y = _case()
    c = _est(model, (x, y), kind=kind)
    with pytest.raises(ValueError, match="does not cover: \\['nope'\\]"):
        c.mv({"nope": torch.zeros(2)})
    with pytest.raises(ValueError, match="damping"):
        c.solve({"0.bias": torch.zeros(4, dtype=torch.float64)}, -1.0)
    with pytest.raises(ValueError, match="damping"):
        c.logdet(float("nan"))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="c >= 0"):
            c * bad
    with pytest.raises(ValueError, match="decay"):
        c.ema(c, 1.5)


def test_lowrank_singular_solve_without_damping():
    model, x, y = _case(2)
    c = natgrad.estimate_curvature(model, (x, y), kind="lowrank")
    v = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match="singular; pass damping > 0"):
        c.solve(v, 0.0)
    with pytest.raises(ValueError, match="singular"):
        c.inverse_diagonal(0.0)


def test_combining_different_kinds_or_models():
    model, x, y = _case()
    k = _est(model, (x, y), kind="kfac")
    e = _est(model, (x, y), kind="ekfac")
    with pytest.raises(TypeError, match="combine curvatures of one kind"):
        k + e  # noqa: B018
    other = mlp((3, 5, 3)).double()
    k2 = _est(other, (x, y), kind="kfac")
    with pytest.raises(ValueError, match="different layouts"):
        k + k2  # noqa: B018
    low = _est(model, (x, y), kind="lowrank")
    low2 = _est(other, (x, y), kind="lowrank")
    with pytest.raises(ValueError, match="different parameters"):
        low + low2  # noqa: B018
    with pytest.raises(TypeError):
        low + k  # noqa: B018


# -- state and files ------------------------------------------------------------------------
def test_foreign_state_dicts_are_refused():
    model, x, y = _case()
    k = _est(model, (x, y), kind="kfac")
    low = _est(model, (x, y), kind="lowrank")
    with pytest.raises(ValueError, match="Not a KroneckerFisher state_dict"):
        KroneckerFisher.from_state_dict(low.state_dict())
    with pytest.raises(ValueError, match="Not a LowRankFisher state_dict"):
        LowRankFisher.from_state_dict(k.state_dict())
    k2 = _est(mlp((3, 5, 3)).double(), (x, y), kind="kfac")
    with pytest.raises(ValueError, match="different layouts"):
        k.load_state_dict(k2.state_dict())


def test_corrupt_and_foreign_files(tmp_path):
    model, x, y = _case()
    k = _est(model, (x, y), kind="kfac")
    path = tmp_path / "k.safetensors"
    k.save(path)
    low = _est(model, (x, y), kind="lowrank")
    low.save(tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="holds a natgrad.LowRankFisher, not a natgrad.KroneckerFisher"):
        KroneckerFisher.load(tmp_path / "l.safetensors")
    with pytest.raises(FileNotFoundError):
        KroneckerFisher.load(tmp_path / "missing.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is corrupt: tensor .* fails its SHA-256 checksum"):
        KroneckerFisher.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LowRankFisher.load(tmp_path / "junk.safetensors")


def test_small_factors_skip_the_memory_query(monkeypatch):
    # the default limit's floor is half the machine's memory, so factors of a few MB
    # cannot be refused by it: a refresh must not read /proc/meminfo for them
    import builtins

    model, x, y = _case()
    real = builtins.open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise AssertionError("read /proc/meminfo for small factors")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    assert _est(model, (x, y), kind="kfac").structure()["0.weight"] == "kfac"


# -- Curvature.load ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac", "lowrank"])
def test_curvature_load_checks_the_model(kind, tmp_path):
    model, x, y = _case()
    path = tmp_path / f"{kind}.safetensors"
    _est(model, (x, y), kind=kind).save(path)
    other = mlp((4, 6, 3)).double()  # same names, other hidden width
    with pytest.raises(ValueError, match=r"shapes (that )?differ"):
        natgrad.Curvature.load(path, other)
    with pytest.raises(ValueError, match=r"(?s)(model lacks|differ).*'0\.weight'"):
        natgrad.Curvature.load(path, nn.Sequential(nn.Identity(), nn.Linear(4, 3)))


def test_curvature_load_names_the_class_a_file_holds(tmp_path):
    model, x, y = _case()
    _est(model, (x, y), kind="kfac").save(tmp_path / "k.safetensors")
    # was "holds a natgrad.KroneckerFisher, not a ; load it with ..."
    with pytest.raises(
        ValueError,
        match=r"holds a natgrad\.KroneckerFisher, not a natgrad\.LowRankFisher: load it with "
        r"natgrad\.KroneckerFisher\.load, or with natgrad\.Curvature\.load",
    ):
        LowRankFisher.load(tmp_path / "k.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "o.safetensors"), {"format": "natgrad.Other"})
    with pytest.raises(ValueError, match=r"holds a natgrad\.Other, not a curvature file.*DiagonalF"):
        natgrad.Curvature.load(tmp_path / "o.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(ValueError, match=r"no natgrad format tag, not a curvature file"):
        KroneckerFisher.load(tmp_path / "p.safetensors")
    with pytest.raises(FileNotFoundError, match=r"No curvature file"):
        natgrad.Curvature.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("loader", ["Curvature", "DiagonalFisher", "KroneckerFisher"])
def test_load_with_a_device_in_the_model_slot_is_a_named_type_error(tmp_path, loader):
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    kind = "diag" if loader == "DiagonalFisher" else "kfac"
    path = tmp_path / "c.safetensors"
    natgrad.estimate_curvature(model, (x, y), kind=kind).save(path)
    with pytest.raises(TypeError, match=r"(?s)load's model.*device=\.\.\."):
        getattr(natgrad, loader).load(path, "cpu")


def test_load_checks_a_meta_device_model_by_names_and_shapes(tmp_path):
    # a model built on the meta device (no data) still names and shapes its parameters
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    path = tmp_path / "f.safetensors"
    natgrad.estimate_fisher(model, (x, y)).save(path)
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 2)
    assert natgrad.DiagonalFisher.load(path, meta).n_samples == 6
    with torch.device("meta"):
        other = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="weight"):
        natgrad.DiagonalFisher.load(path, other)


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "diag", "lowrank"])
@pytest.mark.parametrize("op", ["ema_union", "ema", "add"])
def test_combination_across_a_pruning_rename_names_the_rename(kind, op):
    """One curvature estimated before torch.nn.utils.prune (``0.weight``), one after
    (``0.weight_orig``): combining them named a layout mismatch ("covers ['0.weight',
    '0.bias'] in one and only ['0.bias']"), not the rename; the diagonal and low-rank
    ``ema_union`` silently kept both names as two parameters."""
    import torch.nn.utils.prune as tprune

    model, x, y = _case()
    before = _est(model, (x, y), kind=kind, labels="exact")
    tprune.l1_unstructured(model[0], "weight", amount=0.25)
    after = _est(model, (x, y), kind=kind, labels="exact")
    calls = {"ema_union": lambda a, b: a.ema_union(b, 0.5), "ema": lambda a, b: a.ema(b, 0.5),
             "add": lambda a, b: a + b}
    for a, b, first, second in [(before, after, "'0.weight'", "'0.weight_orig'"),
                                (after, before, "'0.weight_orig'", "'0.weight'")]:
        with pytest.raises(
            ValueError,
            match=f"one names {first} where the other names {second}, the same parameter "
            r"\(torch.nn.utils.prune.*make_permanent",
        ):
            calls[op](a, b)


# -- loading into a model of mixed dtypes ---------------------------------------------------
class _MixedDtypes(nn.Module):
    """A float64 Linear + LayerNorm, then a float32 Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.norm = nn.Linear(3, 5).double(), nn.LayerNorm(5).double()
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x.double()))).float())


def _tensors(state, prefix=""):
    """``{key path: tensor}`` of a (nested) state dict."""
    out = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for k, v in items:
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, (dict, list)):
            out.update(_tensors(v, f"{prefix}{k}/"))
    return out


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank", "diag"])
def test_load_into_a_mixed_dtype_model_follows_its_dtypes(tmp_path, kind):
    """A float32 file loaded for a model of float64 and float32 layers: each tensor takes
    the dtype the estimate has (a K-FAC layer its weight's, low-rank rows the promoted
    one), holding the exact cast of the stored values; K-FAC and low-rank kept the
    file's float32 for the float64 layers."""
    model = _MixedDtypes()
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    est = _est(model, (x, y), kind=kind)
    stored = est.to(torch.float32)
    stored.save(tmp_path / "c.safetensors")
    loaded = type(est).load(tmp_path / "c.safetensors", model)
    want, got, raw = (_tensors(c.state_dict()) for c in (est, loaded, stored))
    assert set(got) == set(want)
    assert {k: t.dtype for k, t in got.items()} == {k: t.dtype for k, t in want.items()}
    assert torch.float64 in {t.dtype for t in got.values()}
    for k, t in got.items():
        assert torch.equal(t, raw[k].to(t.dtype)), k


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank", "diag"])
def test_save_load_round_trip_of_a_mixed_dtype_model_is_exact(tmp_path, kind):
    model = _MixedDtypes()
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    est = _est(model, (x, y), kind=kind)
    est.save(tmp_path / "c.safetensors")
    want = _tensors(est.state_dict())
    for loaded in (type(est).load(tmp_path / "c.safetensors", model),
                   natgrad.Curvature.load(tmp_path / "c.safetensors", model),
                   type(est).from_state_dict(est.state_dict())):
        got = _tensors(loaded.state_dict())
        assert set(got) == set(want)
        for k, t in got.items():
            assert t.dtype == want[k].dtype and torch.equal(t, want[k]), k


def test_a_kind_holding_all_parameters_in_one_tensor_refuses_mixed_dtypes():
    """The protocol's default: one tensor cannot follow several parameter dtypes."""
    from tests.reference import DenseCurvature

    model = _MixedDtypes()
    params = dict(model.named_parameters())
    shapes = {k: tuple(p.shape) for k, p in params.items()}
    P = sum(p.numel() for p in params.values())
    dense = DenseCurvature(torch.eye(P, dtype=torch.float64), shapes, 1)
    with pytest.raises(ValueError, match=r"DenseCurvature holds .* several dtypes .*params="):
        dense.to_model_dtypes(params)
