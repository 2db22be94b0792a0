"""Faults of FisherPreconditioner / NaturalGradient with source='backward': each raises a
named error (what was expected, what came, the fix) and changes nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(n=6):
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


# -- options refused at construction ----------------------------------------------------------


def test_backward_refuses_a_kind_without_from_capture():
    # every built-in kind builds from the records; a registered kind that does not
    # implement from_capture is refused by name, with the kinds that can
    from natgrad.curvature import protocol
    from natgrad.curvature.diagonal import DiagonalFisher

    @protocol.register_curvature("diag_nocap_test")
    class NoCapture(DiagonalFisher):
        kind = "diag_nocap_test"

    try:
        with pytest.raises(ValueError, match=r"kind='diag_nocap_test' cannot use "
                           r"source='backward'.*'diag', 'kfac', 'ekfac', 'lowrank'.*source='batch'"):
            natgrad.FisherPreconditioner(_mlp(), kind="diag_nocap_test", source="backward")
    finally:
        del protocol.CURVATURE_KINDS["diag_nocap_test"]


@pytest.mark.parametrize("labels", ["mc", "exact"])
def test_backward_refuses_other_label_sources(labels):
    with pytest.raises(ValueError, match=rf"empirical Fisher, but labels='{labels}'"):
        natgrad.FisherPreconditioner(_mlp(), kind="kfac", labels=labels, source="backward")


def test_backward_refuses_parameters_outside_covered_layers():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"cannot give these selected parameters.*1\.weight.*params="):
        natgrad.FisherPreconditioner(model, kind="kfac", source="backward")
    # selecting only covered layers works
    natgrad.FisherPreconditioner(model, kind="kfac", source="backward",
                                 params=["0.weight", "0.bias", "2.weight", "2.bias"])


@pytest.mark.parametrize("opt,value", [("source", "hooks"), ("loss_reduction", "avg")])
def test_unknown_source_options(opt, value):
    with pytest.raises(ValueError, match=rf"Unknown {opt} '{value}'; expected one of"):
        natgrad.FisherPreconditioner(_mlp(), kind="kfac", **{opt: value})


# -- faults at step time ------------------------------------------------------------------------


def test_backward_step_without_a_recorded_backward():
    model = _mlp()
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source="backward")
    x, y = _batch()
    model(x)  # forward without backward: no gradient recorded
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    # a .grad from before and no backward since: skipped by name (like a missing .grad)
    with pytest.warns(UserWarning, match="no backward ran since the last step.*loss.backward"):
        assert not pre.step().preconditioned
    assert pre.state_dict()["step"] == 0 and pre.curvature is None


def test_batch_source_step_without_batch():
    model = _mlp()
    pre = natgrad.FisherPreconditioner(model, kind="kfac")
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="needs the batch.*source='backward'"):
        pre.step()
    opt = natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1), pre)
    with pytest.raises(ValueError, match=r"NaturalGradient.step needs the batch.*source='backward'"):
        opt.step()


def test_backward_layer_called_without_batch_dimension():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.lin(x.sum(0, keepdim=True)).expand(x.shape[0], 3)

    model = Weird()
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source="backward")
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="batch as first dimension.*source='batch'"):
        pre.step()


def test_backward_nan_statistics_are_named():
    model = _mlp()
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source="backward")
    x, y = _batch()
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    pre._capture._records["0"][0][1][0, 0] = float("nan")  # a corrupted record
    with pytest.raises(FloatingPointError, match=r"K-FAC factors of layer '0'.*diverged"):
        pre.step()


def test_state_dict_of_backward_preconditioner_round_trips_exactly():
    model = _mlp()
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source="backward", update_every=2)
    x, y = _batch()
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    other = natgrad.FisherPreconditioner(_mlp(), kind="kfac", source="backward", update_every=2)
    other.load_state_dict(pre.state_dict())
    a, b = pre.state_dict(), other.state_dict()
    assert a["step"] == b["step"] == 3 and other._capture.armed is False
    for k in a["curvature"]["layers"]:
        for t in ("A", "G"):
            assert torch.equal(a["curvature"]["layers"][k][t], b["curvature"]["layers"][k][t])


def test_multihead_attention_out_proj_is_not_a_kfac_layer():
    # MultiheadAttention uses out_proj.weight directly: no hook sees the layer's input, so
    # K-FAC would have zero factors there (a silent g / λ step); it is diagonal instead
    from natgrad.curvature.kfac import kfac_coverage

    m = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    layers, reasons = kfac_coverage(m, dict(m.named_parameters()))
    assert list(layers) == ["linear1", "linear2"]
    assert "without calling the module" in reasons["self_attn.out_proj.weight"]
    with pytest.raises(ValueError, match=r"self_attn\.out_proj\.weight \(MultiheadAttention"):
        natgrad.FisherPreconditioner(m, kind="kfac", source="backward")


def test_lightning_callback_refuses_a_foreign_checkpoint_state():
    # a checkpoint whose NaturalGradientCallback entry is not this callback's state, or is
    # a preconditioner state of another kind, is refused by name; nothing is loaded
    nl = pytest.importorskip("natgrad.integrations.lightning")
    model = _mlp()
    cb = nl.NaturalGradientCallback(natgrad.FisherPreconditioner(model, kind="kfac"))
    with pytest.raises(ValueError, match=r"Not a NaturalGradientCallback state.*'preconditioner'"):
        cb.load_state_dict({"step": 3})
    other = natgrad.FisherPreconditioner(model, kind="diag").state_dict()
    with pytest.raises(ValueError, match=r"kind='diag'.*kind='kfac'"):
        cb.load_state_dict({"preconditioner": other})
    assert cb.preconditioner.state_dict()["step"] == 0


def _step_without_warnings(pre, model, x, y):
    """A backward pass and a preconditioner step that must not warn."""
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.step((x, y), lr=0.1)


@pytest.mark.parametrize("source", ["batch", "backward"])
def test_a_parameter_unfrozen_after_construction_warns_once_at_a_refresh(source):
    # the default selection is the parameters trainable at construction: a layer unfrozen
    # later gets a .grad that passes unchanged (checked against the raw gradient), so the
    # refresh warns once, naming it and the fix; an explicit params= selection does not
    model = _mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source=source, update_every=1)
    x, y = _batch()
    _step_without_warnings(pre, model, x, y)  # nothing unfrozen yet: no warning
    for p in model[0].parameters():
        p.requires_grad_(True)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = model[0].weight.grad.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pre.step((x, y), lr=0.1)
        assert torch.equal(model[0].weight.grad, raw)
        if _ == 0:
            (w,) = [c for c in caught if "not preconditioned" in str(c.message)]
            assert "'0.weight', '0.bias'" in str(w.message)
            assert "build the preconditioner after unfreezing" in str(w.message)
        else:  # once
            assert not [c for c in caught if "not preconditioned" in str(c.message)]
    chosen = _mlp()
    pre = natgrad.FisherPreconditioner(chosen, kind="kfac", source=source, update_every=1,
                                       params=[chosen[2]])
    _step_without_warnings(pre, chosen, x, y)


def test_a_frozen_parameter_with_a_stale_grad_does_not_warn():
    # train fully, freeze the backbone, then precondition the head: the backbone keeps a
    # stale .grad from before (the head's optimizer clears only the head), but it is still
    # frozen, so nothing is "unfrozen after construction"
    model = _mlp()
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()  # every parameter gets a .grad
    for p in model[0].parameters():
        p.requires_grad_(False)
    pre = natgrad.FisherPreconditioner(model, kind="kfac", update_every=1)
    model[2].zero_grad()
    _step_without_warnings(pre, model, x, y)


@pytest.mark.parametrize("grad", [True, False])
def test_data_parallel_replicas_are_refused_by_the_backward_source(grad):
    # nn.DataParallel runs replicas of the layers (flagged _is_replica) in threads; their
    # records were skipped, and the refresh said nothing was recorded. A pass without
    # grad (evaluation) records nothing, so it is not refused.
    import copy

    model = _mlp()
    natgrad.FisherPreconditioner(model, kind="kfac", source="backward", update_every=1)
    replica = copy.deepcopy(model)
    for m in replica.modules():
        m._is_replica = True
    x, _ = _batch()
    if not grad:
        with torch.no_grad():
            replica(x)
        return
    with pytest.raises(RuntimeError, match=r"nn\.DataParallel.*DistributedDataParallel"):
        replica(x)


def test_a_layer_added_after_construction_warns_once():
    # a head added to the model after the preconditioner was built trains unpreconditioned
    model = _mlp()
    pre = natgrad.FisherPreconditioner(model, kind="kfac", update_every=1)
    model.add_module("extra", nn.Linear(3, 3).to(next(model.parameters()).dtype))
    x, y = _batch()
    F.cross_entropy(model.extra(model(x)), y).backward()
    with pytest.warns(UserWarning, match=r"'extra.weight', 'extra.bias'.*not preconditioned"):
        pre.step((x, y), lr=0.1)


class _ReusedWeight(nn.Module):
    """``l``'s weight is read again outside ``l`` (``F.linear``) when ``reuse``; a weight
    read only without gradient (a logged norm, a detached copy) is no such use."""

    def __init__(self, reuse):
        super().__init__()
        self.l, self.o, self.reuse = nn.Linear(4, 4), nn.Linear(4, 3), reuse

    def forward(self, x):
        h = torch.tanh(self.l(x))
        if self.reuse:
            h = h + F.linear(x, self.l.weight)
        with torch.no_grad():
            self.last_norm = self.l.weight.norm()
        return self.o(h + 0 * self.l.weight.detach().sum())


@pytest.mark.parametrize("kind", ["kfac", "diag"])
def test_backward_source_refuses_a_layer_read_outside_its_call(kind):
    """source='backward' reads a layer's gradient off its own calls only: the functional
    use's terms would be silently missing, so the first refresh (which re-runs the first
    recorded call's inputs as natgrad's own pass) raises, naming it, and removes its
    hooks; the model then trains on, and a preconditioner without that layer works. The
    check leaves the random state and the training mode as they were."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    model = _ReusedWeight(reuse=True)
    pre = natgrad.FisherPreconditioner(model, kind=kind, source="backward", update_every=1)
    F.cross_entropy(model(x), y).backward()
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"cannot record the layers \['l'\].*F.linear\(x, "
                       r"layer.weight\).*params=.*source='batch'"):
        pre.step(lr=0.1)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model(x)  # the refused capture is gone
    pre = natgrad.FisherPreconditioner(model, kind=kind, source="backward", update_every=1,
                                       params=["o.weight", "o.bias"])
    F.cross_entropy(model(x), y).backward()
    pre.step(lr=0.1)
    ok = _ReusedWeight(reuse=False)
    pre = natgrad.FisherPreconditioner(ok, kind=kind, source="backward", update_every=1)
    for _ in range(2):
        ok.zero_grad()
        F.cross_entropy(ok(x), y).backward()
        pre.step(lr=0.1)


class _TrainOnlyReuse(nn.Module):
    """``a``'s weight is read outside ``a`` only in training mode; a BatchNorm whose
    statistics a training-mode forward updates."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.o = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(torch.tanh(self.a(x)))
        if self.training:
            h = h + F.linear(x, self.a.weight)
        return self.o(h)


def test_backward_source_check_runs_in_the_models_mode_and_restores_its_buffers():
    """The outside-use check re-ran the model in eval mode and missed a weight read in a
    training-only branch (its recorded diagonal 175% off; found by review). It now runs in
    the model's own mode and puts the buffers (BatchNorm statistics) back: they equal
    those of the user's forwards alone."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    model = _TrainOnlyReuse()
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source="backward", update_every=1,
                                       params=["a.weight", "a.bias", "o.weight", "o.bias"])
    F.cross_entropy(model(x), y).backward()
    stats = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match=r"cannot record the layers \['a'\]"):
        pre.step(lr=0.1)
    for b, s in zip(model.buffers(), stats, strict=True):
        assert torch.equal(b, s)
    assert model.training


# -- loss_reduction="token_mean" ----------------------------------------------------------


class _TokenModel(nn.Module):
    """A tiny token model taking Hugging Face-style keywords (labels unused here)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(7, 4).double(), nn.Linear(4, 7).double()

    def forward(self, input_ids, labels=None, num_items_in_batch=None):
        return self.out(torch.tanh(self.emb(input_ids)))


@pytest.mark.parametrize("how", ["no_keywords", "parts"])
def test_token_mean_without_a_count_is_refused_by_name(how):
    # the count of kept tokens comes from the model call's labels= / num_items_in_batch=;
    # a forward with neither (or the model's parts called) is refused at the refresh
    model = _TokenModel()
    ids, labels = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    pre = natgrad.FisherPreconditioner(model, kind="diag", source="backward",
                                       loss_reduction="token_mean", kl_clip=None)
    if how == "no_keywords":
        F.cross_entropy(model(ids).reshape(-1, 7), labels.reshape(-1)).backward()
    else:
        F.cross_entropy(model.out(torch.tanh(model.emb(ids))).reshape(-1, 7),
                        labels.reshape(-1)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"token_mean.*num_items_in_batch= or labels= keyword"
                                         r".*Pass labels=.*loss_reduction='sum'"):
        pre.step()
    for k, p in model.named_parameters():  # nothing changed
        assert torch.equal(p.grad, grads[k])


def test_token_mean_with_no_kept_token_is_refused():
    model = _TokenModel()
    ids = torch.randint(0, 7, (2, 4))
    labels = torch.full((2, 4), -100)
    pre = natgrad.FisherPreconditioner(model, kind="diag", source="backward",
                                       loss_reduction="token_mean", kl_clip=None)
    out = model(ids, labels=labels)
    (out.sum() * 0.0 + out[0, 0, 0]).backward()
    with pytest.raises(ValueError, match="averages over no token"):
        pre.step()


def test_token_mean_refuses_a_count_per_device():
    # num_items_in_batch of shape (D,) (the Trainer's DataParallel case) failed at the
    # refresh with torch's "only one element tensors" message; named at the call now
    model = _TokenModel()
    ids = torch.randint(0, 7, (2, 4))
    natgrad.FisherPreconditioner(model, kind="diag", source="backward",
                                 loss_reduction="token_mean", kl_clip=None)
    with pytest.raises(ValueError, match=r"num_items_in_batch.*tensor of shape \(2,\).*DataParallel"):
        model(ids, labels=ids, num_items_in_batch=torch.tensor([4, 4]))
    model(ids, labels=ids, num_items_in_batch=torch.tensor(8))  # one count: accepted


def test_token_mean_counts_differing_across_forwards_warn_once():
    # two micro-batches with 7 and 1 kept tokens, no num_items_in_batch: read as one mean
    # over all 8 kept tokens (exact for this loss), with a warning naming num_items_in_batch
    model = _TokenModel()
    ids = torch.randint(0, 7, (2, 4))
    la, lb = torch.randint(0, 7, (2, 4)), torch.randint(0, 7, (2, 4))
    la[0, 0] = -100
    lb[:, 1:] = -100
    lb[1, 0] = -100
    pre = natgrad.FisherPreconditioner(model, kind="diag", source="backward",
                                       loss_reduction="token_mean", kl_clip=None)
    for lab in (la, lb):
        F.cross_entropy(model(ids, labels=lab).reshape(-1, 7), lab.reshape(-1),
                        reduction="sum").div(8).backward()
    with pytest.warns(UserWarning, match=r"\[1\.0, 7\.0\] kept tokens.*num_items_in_batch"):
        pre.step()
    union = natgrad.estimate_fisher(model, (torch.cat([ids, ids]), torch.cat([la, lb])),
                                    likelihood="token_categorical")
    for k, v in pre.curvature.diagonal().items():
        torch.testing.assert_close(v, union[k], rtol=1e-12, atol=1e-15)


def test_token_counts_read_from_a_dict_argument():
    # a wrapper whose forward(batch) calls model(**batch) (Lightning style): the labels are
    # an entry of the dict argument; "token_mean" reads them there (exact against the
    # token_categorical Fisher), and "mean" warns (it did not: (N/K)² silently, review)
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _TokenModel()

        def forward(self, batch):
            return self.inner(**batch)

    wrap = Wrap()
    ids, labels = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    labels[0, :2] = -100
    batch = {"input_ids": ids, "labels": labels}

    def step(reduction):
        wrap.zero_grad()
        pre = natgrad.FisherPreconditioner(wrap, kind="diag", source="backward",
                                           loss_reduction=reduction, kl_clip=None)
        out = wrap(batch)
        F.cross_entropy(out.reshape(-1, 7), labels.reshape(-1)).backward()
        pre.step()
        return pre

    ref = natgrad.estimate_fisher(wrap.inner, (ids, labels), likelihood="token_categorical")
    got = step("token_mean").curvature.diagonal()
    for k, v in ref.items():
        torch.testing.assert_close(got[f"inner.{k}"], v, rtol=1e-12, atol=1e-15)
    with pytest.warns(UserWarning, match="token labels.*token_mean"):
        step("mean")


def test_lowrank_refuses_parameters_frozen_after_it_was_built():
    """A lowrank curvature couples every parameter: with some frozen after the build, the
    zero-padded solve was a Schur-complement block, 274% from the trainable parameters'
    natural gradient (review); refused now, unless the curvature holds no statistics for
    them (a source="backward" refresh after the freezing). Reference: the dense
    (F_SS + λI)⁻¹ g_S of a per-sample loop."""
    from tests.reference import loop_grads

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))

    def backward():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    opts = {"kind": "lowrank", "damping": 0.01, "kl_clip": None}
    for source in ("batch", "backward"):
        model[0].requires_grad_(True)
        pre = natgrad.FisherPreconditioner(model, source=source, **opts)
        backward()
        pre.step((x, y) if source == "batch" else None)  # a refresh over both layers
        model[0].requires_grad_(False)
        backward()
        with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] were frozen.*Build a new"):
            pre.step((x, y) if source == "batch" else None)
        pre.close()
    g = torch.cat([model[2].weight.grad.reshape(-1), model[2].bias.grad])
    G = loop_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y,
                   names=["2.weight", "2.bias"])
    R = torch.cat([G["2.weight"].reshape(8, -1), G["2.bias"]], 1)
    ref = torch.linalg.solve(R.T @ R / 8 + 0.01 * torch.eye(18, dtype=torch.float64), g)
    # built after freezing (batch), or frozen before its first refresh (backward: no
    # statistics for layer 0, so decoupled): both give the reference
    for source, build_frozen in (("batch", True), ("backward", False)):
        model[0].requires_grad_(not build_frozen)
        pre = natgrad.FisherPreconditioner(model, source=source, **opts)
        model[0].requires_grad_(False)
        backward()
        pre.step((x, y) if source == "batch" else None)
        got = torch.cat([model[2].weight.grad.reshape(-1), model[2].bias.grad])
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        pre.close()


def test_changed_control_flow_names_a_fix_the_preconditioner_takes():
    """A layer unused at a later refresh: the capture path's error said engine='vmap',
    which FisherPreconditioner does not take (review); it now names source='backward',
    which handles the model (checked: its step runs)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.branch, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
            self.use = True

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.out(torch.tanh(self.branch(h)) if self.use else h)

    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for source in ("batch", "backward"):
        m = Net()
        pre = natgrad.FisherPreconditioner(m, kind="diag", update_every=1, kl_clip=None,
                                           source=source)
        for use in (True, False):
            m.use = use
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            if source == "batch" and not use:
                with pytest.raises(RuntimeError, match="takes no engine option.*source='backward'"):
                    pre.step((x, y))
            else:
                assert pre.step((x, y) if source == "batch" else None).preconditioned
        pre.close()


def test_a_changed_accumulation_count_warns():
    """Accumulation over 2 micro-batches, each loss divided by 2, then a last window of
    one (Lightning's incomplete last window): that step's curvature is 1/4 of the right
    one, silently (found by review); now a warning names the cause and the fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    xs = [torch.randn(4, 4, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randint(0, 3, (4,)) for _ in range(3)]
    pre = natgrad.FisherPreconditioner(model, kind="diag", source="backward", update_every=1,
                                       kl_clip=None)
    model.zero_grad()
    for x, y in zip(xs[:2], ys[:2], strict=True):
        (F.cross_entropy(model(x), y) / 2).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.step()
    model.zero_grad()
    (F.cross_entropy(model(xs[2]), ys[2]) / 2).backward()
    with pytest.warns(UserWarning, match=r"recorded 1 forward\(s\) for this step but 2.*\(1/2\)²"):
        pre.step()


def test_a_skipped_batch_with_kept_zero_grads_is_skipped():
    """A batch the loop skipped while .grad is kept as zeros (zero_grad(set_to_none=False),
    Lightning's training_step returning None) raised 'found no recorded forward and
    backward' at a refresh (review); it is skipped with a warning, as a missing .grad
    is, and the next step is the same as without the skipped batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    twin = nn.Sequential(nn.Linear(4, 3)).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source="backward", update_every=1,
                                       kl_clip=None)
    ref = natgrad.FisherPreconditioner(twin, kind="kfac", source="backward", update_every=1,
                                       kl_clip=None)
    for m, p in ((model, pre), (twin, ref)):  # one normal step each
        F.cross_entropy(m(x), y).backward()
        p.step()
    model.zero_grad(set_to_none=False)  # the skipped batch: zeros, no backward
    with pytest.warns(UserWarning, match="no backward ran since the last step"):
        assert not pre.step().preconditioned
    for m, p in ((model, pre), (twin, ref)):
        m.zero_grad(set_to_none=False)
        F.cross_entropy(m(x + 1), y).backward()
        p.step()
    torch.testing.assert_close(model[0].weight.grad, twin[0].weight.grad, rtol=0, atol=0)


# -- losses averaged over every output value (element_mean) -----------------------------------


def _multi_out():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("lik", ["bernoulli", "gaussian"])
def test_mean_with_a_default_elementwise_loss_warns_once(lik):
    # torch's default MSELoss / BCEWithLogitsLoss average over N·D values; "mean" reads
    # N: the curvature came out 1/D² too small without a word (found by review)
    model = _multi_out()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6, 3)).double()
    pre = natgrad.FisherPreconditioner(model, lik, kind="diag", source="backward",
                                       kl_clip=None)
    with pytest.warns(UserWarning, match=r"3 outputs.*nn.MSELoss\(\).*1/3².*"
                                         r"loss_reduction='element_mean'"):
        F.binary_cross_entropy_with_logits(model(x), y).backward()
    pre.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per capture
        F.binary_cross_entropy_with_logits(model(x), y).backward()
    pre.close()


def test_mean_with_categorical_outputs_does_not_warn():
    # a classifier's C logits are one categorical's: its mean loss is over samples
    model = _mlp()
    x, y = _batch()
    pre = natgrad.FisherPreconditioner(model, kind="diag", source="backward", kl_clip=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(model(x), y).backward()
        pre.step()


@pytest.mark.parametrize("how", ["tuple_output", "parts"])
def test_element_mean_without_an_output_tensor_is_refused_by_name(how):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _multi_out()

        def forward(self, x):
            return self.net(x), x

    model = Pair()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    pre = natgrad.FisherPreconditioner(model, "gaussian", kind="diag", source="backward",
                                       loss_reduction="element_mean", kl_clip=None)
    out = model(x)[0] if how == "tuple_output" else model.net(x)
    F.mse_loss(out, y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"element_mean.*per sample.*other than a tensor"
                                         r".*Call the model itself"):
        pre.step()
    for k, p in model.named_parameters():  # nothing changed
        assert torch.equal(p.grad, grads[k])


def test_element_mean_with_output_sizes_changing_within_a_step_is_refused():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _multi_out()

        def forward(self, x, k):
            return self.net(x)[:, :k]

    model = Head()
    x = torch.randn(6, 4, dtype=torch.float64)
    pre = natgrad.FisherPreconditioner(model, "gaussian", kind="diag", source="backward",
                                       loss_reduction="element_mean", kl_clip=None)
    for k in (3, 2):
        F.mse_loss(model(x, k), torch.zeros(6, k, dtype=torch.float64)).div(2).backward()
    with pytest.raises(ValueError, match=r"element_mean.*\[2, 3\] values per sample"):
        pre.step()


def test_token_mean_not_matching_the_likelihood_shift_is_refused():
    # TokenCategorical(shift=True) with "token_mean" counted unshifted labels: 1.89x off
    with pytest.raises(ValueError, match=r"shifts its labels.*counts the kept tokens"
                                         r".*pass loss_reduction='shifted_token_mean'"):
        natgrad.FisherPreconditioner(_TokenModel(), natgrad.TokenCategorical(shift=True),
                                     kind="diag", source="backward", loss_reduction="token_mean")


def test_element_mean_reads_the_logits_of_a_model_output_object():
    # Hugging Face multi-label / regression models return a ModelOutput; D was read only
    # from a tensor output: 'mean' gave 1/D² without a warning and 'element_mean' was
    # refused (found by review). Reference: source='batch' with the same likelihood.
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _multi_out()

        def forward(self, x):
            return {"logits": self.net(x)}

    model = Dict()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6, 3)).double()
    pre = natgrad.FisherPreconditioner(model, "bernoulli", kind="diag", source="backward",
                                       loss_reduction="element_mean", kl_clip=None)
    F.binary_cross_entropy_with_logits(model(x)["logits"], y).backward()
    pre.step()
    ref = natgrad.estimate_fisher(model, (x, y), "bernoulli", labels="empirical")
    for k, v in pre.curvature.diagonal().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-14)
    pre.close()
    pre = natgrad.FisherPreconditioner(model, "bernoulli", kind="diag", source="backward",
                                       kl_clip=None)
    with pytest.warns(UserWarning, match=r"3 outputs.*loss_reduction='element_mean'"):
        F.binary_cross_entropy_with_logits(model(x)["logits"], y).backward()


def test_element_mean_warns_on_unequal_micro_batches_as_mean_does():
    model = _multi_out()
    pre = natgrad.FisherPreconditioner(model, "gaussian", kind="diag", source="backward",
                                       loss_reduction="element_mean", kl_clip=None)
    for n in (4, 2):
        x = torch.randn(n, 4, dtype=torch.float64)
        F.mse_loss(model(x), torch.zeros(n, 3, dtype=torch.float64)).div(2).backward()
    with pytest.warns(UserWarning, match=r"unequal sizes \[4, 2\]"):
        pre.step()


@pytest.mark.parametrize("lik", ["categorical", "token_categorical"])
def test_element_mean_with_a_categorical_likelihood_is_refused(lik):
    # cross-entropy averages over samples, not over the C logits: read as element_mean the
    # curvature came out C² too large without a word (found by review)
    with pytest.raises(ValueError, match=r"element_mean.*logits of one distribution.*"
                                         r"loss_reduction='mean'"):
        natgrad.FisherPreconditioner(_mlp(), lik, kind="diag", source="backward",
                                     loss_reduction="element_mean")


def test_shifted_token_mean_with_an_unshifted_likelihood_names_the_likelihood_first():
    with pytest.raises(ValueError, match=r"shifted_token_mean.*pass likelihood="
                                         r"natgrad.TokenCategorical\(shift=True\)"):
        natgrad.FisherPreconditioner(_TokenModel(), "token_categorical", kind="diag",
                                     source="backward", loss_reduction="shifted_token_mean")
