"""Conv / BatchNorm rules of the capture path, and per_sample_grads on it, against
brute-force per-sample loops (float64), the vmap engine and BackPACK (test-only oracle)."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

from natgrad import estimate_fisher, per_sample_grads
from natgrad.engine.batch import parse_batch
from natgrad.engine.capture_grads import grads_split
from natgrad.engine.per_sample import Plan
from tests.conftest import RoutedMoE
from tests.reference import assert_close_dict, ce_sum, exact_categorical_fisher_loop, loop_grads

LABELS = ["empirical", "mc", "exact"]


def _randomize_bn(model):
    """Running statistics and affine parameters away from their defaults."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


class ConvZoo(nn.Module):
    """Conv2d with groups / stride / padding, a depthwise dilated Conv2d, eval BatchNorm2d,
    Conv1d with stride and dilation, BatchNorm1d, a residual add, a Linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, dilation=2, padding=2, groups=6, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.c3 = nn.Conv1d(6, 4, 3, stride=2, dilation=2, padding=1)
        self.bn3 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        h = torch.tanh(self.bn1(self.c1(x)))
        h = h + torch.tanh(self.bn2(self.c2(h)))  # residual
        h = torch.tanh(self.bn3(self.c3(h.flatten(2))))
        return self.fc(h.mean(-1))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


def tiny_resnet(classes=4):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        Block(4, 6, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes),
    )  # fmt: skip


@pytest.fixture
def zoo_case():
    model = _randomize_bn(ConvZoo()).double()
    x = torch.randn(4, 4, 7, 7, dtype=torch.float64)
    return model, x, torch.randint(0, 5, (4,))


@pytest.fixture
def resnet_case():
    model = _randomize_bn(tiny_resnet()).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    return model, x, torch.randint(0, 4, (4,))


def _all_fast(model, x):
    plan = Plan(model, "categorical", "empirical", 1, None, None, None)
    split = grads_split(plan, parse_batch(x), "auto")
    return split is not None and not split.rest


@pytest.mark.parametrize("case", ["zoo_case", "resnet_case"])
def test_every_parameter_on_the_capture_path(case, request):
    model, x, _ = request.getfixturevalue(case)
    assert _all_fast(model, x)


@pytest.mark.parametrize("case", ["zoo_case", "resnet_case"])
def test_per_sample_grads_match_loop(case, request):
    model, x, y = request.getfixturevalue(case)
    got = per_sample_grads(model, (x, y), engine="fast")
    assert_close_dict(got, loop_grads(model, ce_sum, x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("labels", ["mc", "exact"])
def test_per_sample_grads_label_sources_match_vmap(zoo_case, labels):
    model, x, y = zoo_case
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    fast = per_sample_grads(model, (x, y), labels=labels, mc_samples=3, generator=gen())
    slow = per_sample_grads(
        model, (x, y), labels=labels, mc_samples=3, generator=gen(), engine="vmap"
    )
    # exact: C - 1 = 4 factor columns of the 5-class softmax (mc: the 3 draws)
    assert fast["c1.weight"].shape == (4, 3 if labels == "mc" else 4, 6, 2, 3, 3)
    assert_close_dict(fast, slow, rtol=1e-10, atol=1e-12)


def test_exact_per_sample_grads_give_the_exact_fisher(resnet_case):
    model, x, _ = resnet_case
    g = per_sample_grads(model, x, labels="exact", engine="fast")
    got = {k: (v**2).sum(1).mean(0) for k, v in g.items()}
    assert_close_dict(got, exact_categorical_fisher_loop(model, x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("case", ["zoo_case", "resnet_case"])
def test_fisher_conv_batchnorm_rules_agree_with_vmap(case, labels, request):
    model, x, y = request.getfixturevalue(case)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    fast = estimate_fisher(model, (x, y), labels=labels, mc_samples=2, engine="fast", generator=gen())
    slow = estimate_fisher(model, (x, y), labels=labels, mc_samples=2, engine="vmap", generator=gen())
    assert_close_dict(dict(fast), dict(slow), rtol=1e-10, atol=1e-14)


def test_fisher_empirical_matches_loop_float32(resnet_case):
    model, x, y = resnet_case
    model, x = model.float(), x.float()
    ref = {k: (g**2).mean(0) for k, g in loop_grads(model, ce_sum, x, y).items()}
    got = estimate_fisher(model, (x, y), engine="fast")
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_close_dict(dict(got), ref, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(
    ("kernel", "groups", "length"),
    [(1, 1, 11), (2, 3, 11), (5, 1, 11), (2, 1, 300), (5, 1, 300), (5, 3, 300)],
)
def test_conv_kernels_narrow_and_wide(kernel, groups, length):
    """Wide kernels (C/g·k >= 8) over many positions (>= 128) take the grouped conv,
    the others unfolded patches."""
    torch.manual_seed(kernel + groups)
    model = nn.Sequential(
        nn.Conv1d(3, 6, kernel, stride=2, padding=kernel // 2, groups=groups),
        nn.Tanh(),
        nn.Conv1d(6, 3, kernel, dilation=2, padding=kernel - 1, groups=groups),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()
    x = torch.randn(4, 3, length, dtype=torch.float64)
    model(x)  # materialize the lazy layer
    y = torch.randint(0, 3, (4,))
    ref = loop_grads(model, ce_sum, x, y)
    assert_close_dict(per_sample_grads(model, (x, y), engine="fast"), ref, rtol=1e-10, atol=1e-12)
    fisher = estimate_fisher(model, (x, y), engine="fast")
    assert_close_dict(dict(fisher), {k: (g**2).mean(0) for k, g in ref.items()}, rtol=1e-10, atol=1e-14)
    kw = {"labels": "mc", "mc_samples": 2}
    fast = per_sample_grads(model, (x, y), generator=torch.Generator().manual_seed(0), **kw)
    slow = per_sample_grads(
        model, (x, y), generator=torch.Generator().manual_seed(0), engine="vmap", **kw
    )
    assert_close_dict(fast, slow, rtol=1e-10, atol=1e-12)


def test_layer_norm_and_embedding_grads_match_loop():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, padding_idx=0)
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, ids):
            return self.fc(self.ln(self.emb(ids)).mean(1))

    model = Seq().double()
    ids = torch.tensor([[1, 2, 2, 0], [3, 0, 4, 4], [6, 6, 6, 5]])
    y = torch.tensor([0, 2, 1])
    got = per_sample_grads(model, (ids, y), engine="fast")
    assert_close_dict(got, loop_grads(model, ce_sum, ids, y), rtol=1e-10, atol=1e-12)


def test_pruned_conv_grads(zoo_case):
    model, x, y = zoo_case
    prune.random_unstructured(model.c1, "weight", amount=0.5)
    got = per_sample_grads(model, (x, y), engine="fast")
    assert "c1.weight_orig" in got
    assert_close_dict(got, loop_grads(model, ce_sum, x, y), rtol=1e-10, atol=1e-12)


def test_other_parameters_fall_back_to_vmap():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.scale = nn.Parameter(torch.randn(3, 1, 1))
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc((self.conv(x) * self.scale).mean((2, 3)))

    model = Scaled().double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    plan = Plan(model, "categorical", "empirical", 1, None, None, None)
    split = grads_split(plan, parse_batch(x), "auto")
    assert split is not None and split.rest == ["scale"]
    got = per_sample_grads(model, (x, y))
    assert_close_dict(got, loop_grads(model, ce_sum, x, y), rtol=1e-10, atol=1e-12)


def test_capture_path_runs_no_per_sample_forward(resnet_case, monkeypatch):
    """Routing: with every parameter covered, torch.func's per-sample run is never used."""
    model, x, y = resnet_case

    def fail(*args, **kwargs):
        raise AssertionError("Plan.run was called")

    monkeypatch.setattr(Plan, "run", fail)
    per_sample_grads(model, (x, y))
    estimate_fisher(model, (x, y))


def test_batchnorm_without_running_stats_is_refused():
    """Eval mode without running statistics normalizes with the batch's: one sample's output
    depends on the others, so no per-sample gradient exists (a per-sample forward would be
    another function): refused, on every engine."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False))
    model = nn.Sequential(model, nn.Flatten(), nn.Linear(12, 2)).eval()
    batch = (torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 1]))
    for engine in ("auto", "vmap"):
        with pytest.raises(ValueError, match="keeps no running statistics"):
            per_sample_grads(model, batch, engine=engine)


def test_model_reading_another_samples_row_is_not_captured():
    """``temp[0]`` of a per-sample input: each sample's own forward differs from its row of
    the batched forward, so the capture path (one batched forward) is not used."""

    class FirstRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, temp):
            return self.fc(x) * temp[0]

    model = FirstRow().double()
    x, temp = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64) + 0.5
    y = torch.tensor([0, 1, 1, 0])
    batch = {"x": x, "temp": temp, "labels": y}
    plan = Plan(model, "categorical", "empirical", 1, None, None, None)
    assert grads_split(plan, parse_batch(batch), "auto") is None
    ref = {k: (g**2).mean(0) for k, g in per_sample_grads(model, batch, engine="vmap").items()}
    assert_close_dict(dict(estimate_fisher(model, batch)), ref, rtol=1e-10, atol=1e-14)


def test_random_model_with_vmap_parameters_uses_vmap_only():
    """Train-mode dropout: capture only when it covers every parameter (one mask draw)."""

    class Drop(nn.Module):
        def __init__(self, free):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.drop = nn.Dropout(0.5)
            self.scale = nn.Parameter(torch.ones(4)) if free else None

        def forward(self, x):
            h = self.drop(self.fc(x))
            return h * self.scale if self.scale is not None else h

    x = torch.randn(4, 3)
    for free, expect in ((True, None), (False, [])):
        plan = Plan(Drop(free), "categorical", "empirical", 1, None, None, None)
        split = grads_split(plan, parse_batch(x), "auto")
        assert (split if split is None else split.rest) == expect


def test_inputs_and_model_unchanged(zoo_case):
    model, x, y = zoo_case
    before = copy.deepcopy(model.state_dict())
    x0 = x.clone()
    per_sample_grads(model, (x, y))
    assert torch.equal(x, x0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_bfloat16_model_grads_in_parameter_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(3, 2, 4, 4), torch.randint(0, 3, (3,))
    ref = per_sample_grads(model, (x, y), engine="vmap")
    got = per_sample_grads(model.to(torch.bfloat16), (x.to(torch.bfloat16), y))
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    for k in ref:
        torch.testing.assert_close(got[k].float(), ref[k], rtol=0.1, atol=0.05)


def test_matches_backpack_batch_grad(resnet_case):
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import BatchGrad

    model, x, y = resnet_case
    model, x = model.float(), x.float()
    ext = copy.deepcopy(model)
    for m in ext.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # BackPACK's hooks cannot see an in-place ReLU
    ext = backpack.extend(ext)
    lossf = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack.backpack(BatchGrad()):
        lossf(ext(x), y).backward()
    ref = {k: p.grad_batch for k, p in ext.named_parameters()}
    assert_close_dict(per_sample_grads(model, (x, y)), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("labels", ["empirical", "exact"])
def test_conv_products_in_several_chunks(monkeypatch, labels):
    """The unfolded-patch products of a chunk of samples reuse one scratch buffer: with
    chunks of 2 and 1 samples (the last one partial), every chunk's squares still add up
    to the loop's. c1 (groups=2, 16 positions, C/g·k = 18 rows) takes unfolded patches."""
    import natgrad.engine.capture_layers as layers

    model = _randomize_bn(ConvZoo()).double()
    torch.manual_seed(4)
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 5, (5,))
    unfolded = []
    real_unfold = layers.unfold

    def spy(m, a):
        unfolded.append(m)
        return real_unfold(m, a)

    monkeypatch.setattr(layers, "unfold", spy)
    monkeypatch.setattr(layers, "_CACHE_FLOATS", 300)  # c1: 108 floats per sample and column
    got = estimate_fisher(model, (x, y), labels=labels, engine="fast")
    assert model.c1 in unfolded
    if labels == "exact":
        ref = exact_categorical_fisher_loop(model, x)
    else:
        ref = {k: (g**2).mean(0) for k, g in loop_grads(model, ce_sum, x, y).items()}
    assert_close_dict(dict(got), ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tokens", [False, True])
def test_per_sample_grads_of_index_routed_experts(tokens):
    # out[idx] = expert(x[idx]): the experts run on the rows routed to them, which the
    # capture path cannot map to samples (it failed with a reshape error); they move to
    # vmap (here its exact loop: vmap cannot index by a mask), checked against a loop.
    torch.manual_seed(1)
    model = RoutedMoE().double()
    shape = (10, 3, 4) if tokens else (10, 4)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.warns(RuntimeWarning, match="exact per-sample loop"):
        got = per_sample_grads(model, (x, y))
    assert_close_dict(got, loop_grads(model, ce_sum, x, y), rtol=1e-10, atol=1e-12)
