"""Fisher-weighted merging, checked entry by entry against the formula in plain Python."""

import copy

import pytest
import torch
from torch import nn

import natgrad
from natgrad import DiagonalFisher, fisher_weighted_merge
from tests.conftest import mlp
from tests.reference import assert_close_dict


class WithBuffers(nn.Module):
    """Linear + a float buffer and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.randn(2))
        self.register_buffer("running", torch.randn(2))
        self.register_buffer("steps", torch.randint(0, 100, (1,)))

    def forward(self, x):
        return self.lin(x) * self.scale + self.running


def _models(n=3, seed=0):
    torch.manual_seed(seed)
    return [WithBuffers().double() for _ in range(n)]


def _fishers(models, names=("lin.weight", "lin.bias"), zero_frac=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in models:
        p = dict(m.named_parameters())
        f = {}
        for k in names:
            v = torch.rand(p[k].shape, generator=g, dtype=torch.float64)
            v[torch.rand(p[k].shape, generator=g) < zero_frac] = 0.0
            f[k] = v
        out.append(f)
    return out


def _formula(models, fishers, weights, floor, normalize=False):
    """θ* entry by entry in Python floats."""
    w = [x / sum(weights) for x in weights]
    if normalize:
        fishers = [
            {k: v / sum(float(t.sum()) for t in f.values()) for k, v in f.items()} for f in fishers
        ]
    out = {}
    for name, p0 in models[0].named_parameters():
        thetas = [dict(m.named_parameters())[name].detach().reshape(-1).tolist() for m in models]
        vals = []
        for i in range(p0.numel()):
            mean = sum(w[m] * thetas[m][i] for m in range(len(models)))
            if name not in fishers[0]:
                vals.append(mean)
                continue
            fs = [max(float(f[name].reshape(-1)[i]), floor) for f in fishers]
            den = sum(w[m] * fs[m] for m in range(len(models)))
            num = sum(w[m] * fs[m] * thetas[m][i] for m in range(len(models)))
            vals.append(num / den if den > 0 else mean)
        out[name] = torch.tensor(vals, dtype=torch.float64).reshape(p0.shape)
    return out


@pytest.mark.parametrize("floor", [0.0, 1e-8, 0.1])
def test_merge_matches_formula(floor):
    models = _models()
    fishers = _fishers(models)
    weights = [1.0, 2.0, 3.0]
    merged = fisher_weighted_merge(models, fishers, weights=weights, floor=floor)
    assert_close_dict(
        dict(merged.named_parameters()),
        _formula(models, fishers, weights, floor),
        rtol=1e-12,
        atol=1e-14,
    )
    # buffers: floating ones weighted-averaged, integer ones from the first model
    w = [x / 6 for x in weights]
    expected = sum(wm * m.running for wm, m in zip(w, models, strict=True))
    torch.testing.assert_close(merged.running, expected, rtol=1e-12, atol=0)
    assert torch.equal(merged.steps, models[0].steps)


def test_merge_all_zero_entries_fall_back_to_weighted_mean():
    models = _models(2)
    fishers = _fishers(models, zero_frac=0.0)
    fishers[0]["lin.bias"][1] = 0.0
    fishers[1]["lin.bias"][1] = 0.0
    merged = fisher_weighted_merge(models, fishers, weights=[1.0, 3.0], floor=0.0)
    mean = 0.25 * models[0].lin.bias[1] + 0.75 * models[1].lin.bias[1]
    assert merged.lin.bias[1].item() == pytest.approx(mean.item(), rel=1e-12)
    assert torch.isfinite(merged.lin.weight).all()


def test_merge_normalize_uses_unit_trace():
    models = _models(2)
    fishers = _fishers(models, zero_frac=0.0)
    fishers[1] = {k: 1000.0 * v for k, v in fishers[1].items()}  # a different loss scale
    merged = fisher_weighted_merge(models, fishers, normalize=True, floor=0.0)
    assert_close_dict(
        dict(merged.named_parameters()),
        _formula(models, fishers, [1.0, 1.0], 0.0, normalize=True),
        rtol=1e-12,
        atol=1e-14,
    )
    plain = fisher_weighted_merge(models, fishers, floor=0.0)
    assert not torch.allclose(plain.lin.weight, merged.lin.weight)


def test_merge_leaves_inputs_untouched_and_returns_new_model():
    models = _models(2)
    fishers = [DiagonalFisher(f, 10) for f in _fishers(models)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    fbefore = [{k: v.clone() for k, v in f.items()} for f in fishers]
    merged = fisher_weighted_merge(models, fishers)
    assert merged is not models[0] and merged is not models[1]
    assert merged.lin.weight.data_ptr() != models[0].lin.weight.data_ptr()
    for m, b in zip(models, before, strict=True):
        assert_close_dict(m.state_dict(), b, rtol=0, atol=0)
    for f, b in zip(fishers, fbefore, strict=True):
        assert_close_dict(dict(f), b, rtol=0, atol=0)


def test_merge_identical_models_returns_same_weights():
    model = _models(1)[0]
    twin = copy.deepcopy(model)
    fishers = _fishers([model, twin], zero_frac=0.5)
    merged = fisher_weighted_merge([model, twin], fishers, weights=[0.3, 0.7], floor=0.0)
    assert_close_dict(
        dict(merged.named_parameters()), dict(model.named_parameters()), rtol=1e-15, atol=0
    )


def test_merge_with_zero_fisher_returns_other_model():
    models = _models(2)
    params = dict(models[1].named_parameters())
    f_zero = {k: torch.zeros_like(params[k]) for k in params}
    f_pos = {k: torch.rand_like(params[k]) + 0.1 for k in params}
    merged = fisher_weighted_merge(models, [f_zero, f_pos], floor=0.0)
    assert_close_dict(dict(merged.named_parameters()), params, rtol=1e-15, atol=0)


def test_two_model_form_matches_list_form():
    a, b = _models(2)
    fa, fb = _fishers([a, b])
    ref = fisher_weighted_merge([a, b], [fa, fb])
    seed_form = fisher_weighted_merge(a, b, (fa, fb))
    keyword = fisher_weighted_merge(a, b, fisher_weights=[fa, fb], weights=[1, 1])
    for m in (seed_form, keyword):
        assert_close_dict(dict(m.named_parameters()), dict(ref.named_parameters()), rtol=0, atol=0)


def test_merge_float32_models_keep_dtype():
    torch.manual_seed(0)
    a, b = mlp(), mlp()
    fa = {k: torch.rand_like(p) for k, p in a.named_parameters()}
    fb = {k: torch.rand_like(p) for k, p in b.named_parameters()}
    merged = fisher_weighted_merge([a, b], [fa, fb])
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_merge_errors():
    a, b = _models(2)
    fa, fb = _fishers([a, b])
    other = mlp().double()
    with pytest.raises(
        ValueError, match="between models\\[0\\] and models\\[1\\]: only in models\\[0\\]: lin.bias"
    ):
        fisher_weighted_merge([a, other], [fa, fb])
    wide = WithBuffers().double()
    wide.lin = nn.Linear(4, 2).double()
    with pytest.raises(ValueError, match="lin.weight: \\(2, 3\\) vs \\(2, 4\\)"):
        fisher_weighted_merge([a, wide], [fa, fb])
    with pytest.raises(ValueError, match="Got 2 models but 1 Fishers"):
        fisher_weighted_merge([a, b], [fa])
    with pytest.raises(
        ValueError, match="fishers\\[1\\] has parameters the models lack: \\['x'\\]"
    ):
        fisher_weighted_merge([a, b], [fa, {"x": torch.ones(1)}])
    with pytest.raises(ValueError, match="only in fishers\\[1\\]: scale"):
        fisher_weighted_merge([a, b], [fa, {**fb, "scale": torch.ones(2, dtype=torch.float64)}])
    with pytest.raises(ValueError, match="Got 3 weights for 2 models"):
        fisher_weighted_merge([a, b], [fa, fb], weights=[1, 1, 1])
    with pytest.raises(ValueError, match="Invalid weights\\[1\\]: -1"):
        fisher_weighted_merge([a, b], [fa, fb], weights=[1, -1])
    with pytest.raises(ValueError, match="at least one must be positive"):
        fisher_weighted_merge([a, b], [fa, fb], weights=[0, 0])
    with pytest.raises(ValueError, match="Invalid floor: -1"):
        fisher_weighted_merge([a, b], [fa, fb], floor=-1)
    with pytest.raises(ValueError, match="fishers\\[0\\]\\['lin.bias'\\] has negative entries"):
        fisher_weighted_merge([a, b], [{**fa, "lin.bias": -fa["lin.bias"] - 1}, fb])
    zero = {k: torch.zeros_like(v) for k, v in fa.items()}
    with pytest.raises(ValueError, match="fishers\\[0\\] is zero everywhere"):
        fisher_weighted_merge([a, b], [zero, fb], normalize=True)
    with pytest.raises(TypeError, match="the second argument must be a module, got list"):
        fisher_weighted_merge(a, [fa, fb])
    with pytest.raises(ValueError, match="Two-model form needs the Fishers"):
        fisher_weighted_merge(a, b)
    with pytest.raises(ValueError, match="fisher_weights is only for the two-model form"):
        fisher_weighted_merge([a, b], [fa, fb], [fa, fb])


def test_merge_pruned_models_keeps_first_mask():
    from torch.nn.utils import prune

    a, b = _models(2)
    ma = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    mb = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    prune.custom_from_mask(a.lin, "weight", ma)
    prune.custom_from_mask(b.lin, "weight", mb)
    fishers = _fishers([a, b], names=("lin.weight_orig", "lin.bias"), zero_frac=0.0)
    merged = fisher_weighted_merge([a, b], fishers)
    assert torch.equal(merged.lin.weight_mask, a.lin.weight_mask)
    expected = _formula([a, b], fishers, [1, 1], 1e-8)
    torch.testing.assert_close(merged.lin.weight_orig.detach(), expected["lin.weight_orig"])
    # the effective weight is up to date before any forward pass
    torch.testing.assert_close(merged.lin.weight, expected["lin.weight_orig"] * ma)


def test_merge_bf16_accumulates_in_float32():
    torch.manual_seed(0)
    a, b = mlp().bfloat16(), mlp().bfloat16()
    fa = {k: torch.rand(p.shape) for k, p in a.named_parameters()}
    fb = {k: torch.rand(p.shape) for k, p in b.named_parameters()}
    merged = fisher_weighted_merge([a, b], [fa, fb])
    for k, p in merged.named_parameters():
        assert p.dtype == torch.bfloat16
        ta, tb = dict(a.named_parameters())[k].double(), dict(b.named_parameters())[k].double()
        fa64, fb64 = fa[k].double().clamp_min(1e-8), fb[k].double().clamp_min(1e-8)
        ref = (fa64 * ta + fb64 * tb) / (fa64 + fb64)
        torch.testing.assert_close(p.double(), ref, rtol=1e-2, atol=1e-2)


def test_merge_of_fine_tunes_with_different_heads_on_params():
    # params= merges the shared body (closed form per entry) and keeps models[0]'s head;
    # a K-FAC merge on params solves the normal equations of the body's blocks
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    b = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    ya, yb = torch.randint(0, 3, (20,)), torch.randint(0, 5, (20,))
    Fa, Fb = natgrad.estimate_fisher(a, (x, ya)), natgrad.estimate_fisher(b, (x, yb))
    body = [k for k, _ in a.named_parameters() if not k.startswith("2.")]
    merged = fisher_weighted_merge([a, b], [Fa, Fb], params=body, floor=0.0)
    pa, pb, pm = (dict(m.named_parameters()) for m in (a, b, merged))
    for k in body:
        want = (Fa[k] * pa[k] + Fb[k] * pb[k]) / (Fa[k] + Fb[k])
        torch.testing.assert_close(pm[k], want, rtol=1e-12, atol=1e-14)
    for k in ("2.weight", "2.bias"):
        assert torch.equal(pm[k], pa[k]) and pm[k] is not pa[k]
    Ka = natgrad.estimate_curvature(a, (x, ya), kind="kfac")
    Kb = natgrad.estimate_curvature(b, (x, yb), kind="kfac")
    eps = 1e-6
    mk = dict(fisher_weighted_merge([a, b], [Ka, Kb], params=body, floor=eps).named_parameters())
    assert torch.equal(mk["2.weight"], pa["2.weight"])
    Ra, Rb = Ka.restrict(body), Kb.restrict(body)
    mean = {k: (pa[k] + pb[k]).detach() / 2 for k in body}
    fa, fb = Ra.mv({k: mk[k].detach() for k in body}), Rb.mv({k: mk[k].detach() for k in body})
    ga, gb = Ra.mv({k: pa[k].detach() for k in body}), Rb.mv({k: pb[k].detach() for k in body})
    for k in body:
        lhs = (fa[k] + fb[k]) / 2 + eps * mk[k].detach()
        rhs = (ga[k] + gb[k]) / 2 + eps * mean[k]
        torch.testing.assert_close(lhs, rhs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_params_keeps_the_buffers_of_modules_left_out(kind):
    # Heads of the same shape with BatchNorm statistics: params= merges the body, so the
    # head's BatchNorm keeps models[0]'s running statistics (as its weights do); the
    # body's BatchNorm statistics are the weighted mean.
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3),
                             nn.BatchNorm1d(3)).double()  # fmt: skip

    a, b = net(), net()
    for m in (a, b):  # distinct running statistics
        m.train()
        m(torch.randn(16, 4, dtype=torch.float64) * (2 if m is b else 1) + (m is b))
        m.eval()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    fa, fb = (natgrad.estimate_curvature(m, (x, y), kind=kind) for m in (a, b))
    body = ["0.weight", "0.bias", "1.weight", "1.bias"]
    merged = fisher_weighted_merge([a, b], [fa, fb], params=body, floor=1e-6)
    for k in ("4.running_mean", "4.running_var"):
        assert torch.equal(merged.get_buffer(k), a.get_buffer(k))
    for k in ("1.running_mean", "1.running_var"):
        want = (a.get_buffer(k) + b.get_buffer(k)) / 2
        torch.testing.assert_close(merged.get_buffer(k), want, rtol=1e-12, atol=1e-14)


def test_params_follows_the_nearest_module_with_parameters_for_buffers():
    # a parameter-free BatchNorm(affine=False) inside the body is merged with the body (its
    # own parameter slots are None), one directly under a flat model stays models[0]'s
    # unless everything is merged, and a head's own buffer beside the head's layer keeps
    # models[0]'s value, as the head's weights do
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)
            self.register_buffer("temperature", torch.rand(1) + 0.5)

        def forward(self, h):
            return self.lin(h) / self.temperature

    def net(flat):
        body = [nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False)]
        layers = [*body] if flat else [nn.Sequential(*body)]
        return nn.Sequential(*layers, nn.Tanh(), Head()).double()

    for flat in (False, True):
        torch.manual_seed(0)
        a, b = net(flat), net(flat)
        for m, shift in ((a, 0.0), (b, 1.0)):
            m.train()
            m(torch.randn(16, 4, dtype=torch.float64) + shift)
            m.eval()
        x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
        fa, fb = (natgrad.estimate_fisher(m, (x, y)) for m in (a, b))
        body = ["0.weight", "0.bias"] if flat else ["0.0.weight", "0.0.bias"]
        merged = fisher_weighted_merge([a, b], [fa, fb], params=body)
        stat = "1.running_mean" if flat else "0.1.running_mean"
        head = "3.temperature" if flat else "2.temperature"
        assert torch.equal(merged.get_buffer(head), a.get_buffer(head))
        if flat:  # a parameter-free module of the model itself: merged with everything only
            assert torch.equal(merged.get_buffer(stat), a.get_buffer(stat))
        else:  # inside the body: follows the body
            want = (a.get_buffer(stat) + b.get_buffer(stat)) / 2
            torch.testing.assert_close(merged.get_buffer(stat), want, rtol=1e-12, atol=0)
