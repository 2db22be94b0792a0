"""Fault suite: bad data and bad models raise errors that name the problem and the fix.

Classes covered (issue 11, "silent bad inputs" and "cryptic -> clear"):

* labels out of range / of the wrong dtype, on every path a target reaches a likelihood;
* targets outside the likelihood's support (Bernoulli outside [0, 1], NaN / Inf);
* non-finite inputs (named per-sample gradient error);
* random (train-mode dropout) or batch-mixing (train-mode BatchNorm) models wherever a
  Fisher or curvature is estimated;
* the model's own forward failure, re-raised with the user's batch shapes;
* wrong types at entry (model, Fisher, Python lists, MetricContext, meta models, N=0).

Each case asserts the exception type and a phrase of its message, or the exact result
against a reference computed with int64 labels / a dropout-free model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.metrics import MetricContext
from natgrad.optim.scale import natural_gradient_norms

N, D, C = 6, 4, 3


def _mlp(*extra: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), *extra, nn.Linear(8, C))


def _data(bad_label: int | None = 5, at: int = 3):
    torch.manual_seed(1)
    x = torch.randn(N, D)
    y = torch.tensor([0, 1, 2, 1, 1, 0])
    if bad_label is not None:
        y[at] = bad_label
    return x, y


class _Branchy(nn.Module):
    """Branches on a tensor value: vmap refuses it, so natgrad uses its exact loop."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow
            return self.lin(x) * 2
        return self.lin(x)


class _Tokens(nn.Module):
    def __init__(self, vocab=7):
        super().__init__()
        self.emb = nn.Embedding(vocab, 5)
        self.head = nn.Linear(5, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _ones_fisher(model: nn.Module) -> natgrad.DiagonalFisher:
    return natgrad.DiagonalFisher({k: torch.ones_like(p) for k, p in model.named_parameters()}, 10)


def _pre_step(kind: str):
    def run(model, batch, likelihood="categorical", **kw):
        pre = natgrad.FisherPreconditioner(model, likelihood, kind=kind, **kw)
        for p in model.parameters():  # a step needs gradients; the refresh checks the batch
            p.grad = torch.zeros_like(p)
        return pre.step(batch)

    return run


# Every path through which a batch's target reaches a likelihood.
LABEL_PATHS = {
    "per_sample_grads": lambda m, b: natgrad.per_sample_grads(m, b),
    "per_sample_grads_vmap": lambda m, b: natgrad.per_sample_grads(m, b, engine="vmap"),
    "estimate_vmap": lambda m, b: natgrad.estimate_fisher(m, b, engine="vmap"),
    "estimate_fast": lambda m, b: natgrad.estimate_fisher(m, b, engine="fast"),
    "estimate_mc": lambda m, b: natgrad.estimate_fisher(m, b, labels="mc", engine="vmap"),
    "estimate_exact_fast": lambda m, b: natgrad.estimate_fisher(m, b, labels="exact"),
    "precond_diag": lambda m, b: _pre_step("diag")(m, b),
    "precond_kfac": lambda m, b: _pre_step("kfac")(m, b),
    "precond_woodbury": lambda m, b: _pre_step("woodbury")(m, b),
    "directions_gram": lambda m, b: natgrad.top_fisher_directions(m, b, k=2),
    "directions_lanczos": lambda m, b: natgrad.top_fisher_directions(m, b, k=2, method="lanczos"),
    "damage": lambda m, b: natgrad.fisher_weighted_damage(m, b, _data(None)),
    "damage_task_b": lambda m, b: natgrad.fisher_weighted_damage(m, _data(None), b),
    "asymmetry": lambda m, b: natgrad.fisher_damage_asymmetry(m, b, _data(None)),
    "natgrad_norms": lambda m, b: natural_gradient_norms(
        m, b, natgrad.estimate_fisher(m, _data(None))
    ),
    "tracker": lambda m, b: natgrad.FisherTracker(m).update("task", b),
    "prior_grid": lambda m, b: natgrad.optimize_prior_precision(
        m, natgrad.estimate_fisher(m, _data(None)), b, method="grid"
    ),
}


# -- labels --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(LABEL_PATHS))
def test_label_out_of_range_every_path(path):
    x, y = _data(5, at=3)
    with pytest.raises(ValueError, match=r"(?s)out of range.*sample 3.*\b5\b.*\[0, 2\]"):
        LABEL_PATHS[path](_mlp(), (x, y))


@pytest.mark.parametrize("bad", [C, 2**31 + 1, 2**53 + 1, -(2**40) - 1])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_label_range_boundaries(bad, dtype):
    """The range test reads the labels' min and max in float32: a label at ``C`` and huge
    ones (that round in float32) are still out of range; ``C - 1`` is in range."""
    if dtype == torch.int32 and not -(2**31) <= bad < 2**31:
        pytest.skip("not an int32 value")
    x, y = _data(None)
    y[-1] = C - 1
    natgrad.estimate_fisher(_mlp(), (x, y.to(dtype)))  # C - 1 at the edge: accepted
    y[2] = bad
    with pytest.raises(ValueError, match=rf"(?s)out of range.*sample 2.*{bad}"):
        natgrad.estimate_fisher(_mlp(), (x, y.to(dtype)))


def test_label_out_of_range_loop_fallback():
    x, y = _data(7, at=4)
    with pytest.raises(ValueError, match=r"(?s)out of range.*sample 4.*\b7\b"):
        natgrad.per_sample_grads(_Branchy(), (x, y))


@pytest.mark.parametrize("engine", ["vmap", "fast"])
def test_label_minus_100_without_ignore_index(engine):
    x, y = _data(-100, at=2)
    with pytest.raises(ValueError, match=r"(?s)sample 2.*-100.*ignore"):
        natgrad.estimate_fisher(_mlp(), (x, y), engine=engine)


@pytest.mark.parametrize("engine", ["vmap", "fast"])
def test_negative_label(engine):
    x, y = _data(-1, at=0)
    with pytest.raises(ValueError, match=r"(?s)out of range.*sample 0.*-1"):
        natgrad.estimate_fisher(_mlp(), (x, y), engine=engine)


@pytest.mark.parametrize("engine", ["vmap", "fast"])
def test_token_label_at_vocabulary_size(engine):
    ids = torch.randint(0, 7, (3, 5))
    labels = ids.clone()
    labels[1, 4] = 7  # vocabulary is 0..6
    with pytest.raises(
        ValueError, match=r"(?s)out of range.*sample 1.*position 4.*\b7\b.*\[0, 6\]"
    ):
        natgrad.estimate_fisher(
            _Tokens(), {"ids": ids, "labels": labels}, "token_categorical", engine=engine
        )


def test_token_negative_label_other_than_ignore_index():
    ids = torch.randint(0, 7, (3, 5))
    labels = ids.clone()
    labels[2, 0] = -1
    with pytest.raises(ValueError, match=r"(?s)sample 2.*position 0.*-1.*ignore_index=-100"):
        natgrad.per_sample_grads(_Tokens(), {"ids": ids, "labels": labels}, "token_categorical")


def test_token_ignore_index_is_left_out_exactly():
    """-100 tokens pass and count as absent: same Fisher as an attention-free reference loop."""
    torch.manual_seed(0)
    model = _Tokens().double()
    ids = torch.randint(0, 7, (3, 5))
    labels = ids.clone()
    labels[0, 1] = labels[2, 3] = -100
    F = natgrad.estimate_fisher(model, {"ids": ids, "labels": labels}, "token_categorical")
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for n in range(3):
        model.zero_grad()
        logp = model(ids[n : n + 1]).log_softmax(-1)[0]
        keep = labels[n] != -100
        loss = -logp[keep.nonzero()[:, 0], labels[n][keep]].sum()
        loss.backward()
        for k, p in model.named_parameters():
            ref[k] += p.grad**2 / 3
    for k in ref:
        torch.testing.assert_close(F[k].double(), ref[k], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "dtype,engine",
    [(torch.int32, "vmap"), (torch.int32, "fast"), (torch.uint8, "vmap"), (torch.int16, "fast")],
)
def test_small_integer_labels_are_cast_exactly(dtype, engine):
    x, y = _data(None)
    model = _mlp()
    ref = natgrad.estimate_fisher(model, (x, y), engine=engine)
    got = natgrad.estimate_fisher(model, (x, y.to(dtype)), engine=engine)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_int32_labels_per_sample_grads_exact():
    x, y = _data(None)
    model = _mlp()
    ref = natgrad.per_sample_grads(model, (x, y))
    got = natgrad.per_sample_grads(model, (x, y.int()))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["vmap", "fast"])
def test_float_labels_for_categorical(engine):
    x, y = _data(None)
    with pytest.raises(ValueError, match=r"integer class indices.*\.long\(\)"):
        natgrad.estimate_fisher(_mlp(), (x, y.float()), engine=engine)


@pytest.mark.parametrize("engine", ["vmap", "fast"])
def test_column_labels_for_categorical_name_the_flatten(engine):
    x, y = _data(None)
    with pytest.raises(ValueError, match=r"shape \(6, 1\); flatten them with y.view\(-1\)"):
        natgrad.estimate_fisher(_mlp(), (x, y[:, None]), engine=engine)
    multi_hot = torch.nn.functional.one_hot(y, C)
    with pytest.raises(ValueError, match=r"shape \(6, 3\); for one-hot .*y.argmax\(-1\) or "
                       "likelihood='bernoulli'"):
        natgrad.estimate_fisher(_mlp(), (x, multi_hot), engine=engine)


def test_sequence_logits_for_categorical_name_both_token_likelihoods():
    class Seq(nn.Module):
        def forward(self, x):
            return x.unsqueeze(1).expand(-1, 2, -1)  # (N, T, C) logits

    x = torch.randn(N, C, requires_grad=False)
    model = nn.Sequential(nn.Linear(C, C), Seq())
    with pytest.raises(ValueError, match=r"likelihood='token_categorical' \(labels aligned.*"
                       r"TokenCategorical\(shift=True\) \(causal language models"):
        natgrad.estimate_fisher(model, (x, torch.zeros(N, 2, dtype=torch.long)))


_ONE_TOKEN = r"shift=True scores the label at position t \+ 1 .* T = 1 .*leave no token to score"
_ONE_TOKEN_FIX = r"at least 2 tokens, or likelihood=natgrad.TokenCategorical\(shift=False\)"


@pytest.mark.parametrize("kind", ["diag", "kfac"])
@pytest.mark.parametrize("labels", ["empirical", "mc", "exact"])
def test_one_token_sequences_with_shift_name_the_shift(labels, kind):
    """T = 1 with shift=True: a raw autograd shape error (empirical, mc), "range() arg 3
    must not be zero" (exact)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 4)).double()
    x, y = torch.randint(0, 5, (6, 1)), torch.randint(0, 4, (6, 1))
    with pytest.raises(ValueError, match=_ONE_TOKEN + ".*" + _ONE_TOKEN_FIX):
        natgrad.estimate_curvature(model, (x, y), kind=kind, labels=labels,
                                   likelihood=natgrad.TokenCategorical(shift=True))
    natgrad.estimate_curvature(model, (x, y), kind=kind, labels=labels,  # the fix works
                               likelihood=natgrad.TokenCategorical(shift=False))


def test_bool_labels_for_categorical():
    x, _ = _data(None)
    with pytest.raises(ValueError, match=r"torch.bool.*\.long\(\)"):
        natgrad.per_sample_grads(_mlp(), (x, torch.ones(N, dtype=torch.bool)))


# -- targets outside the support; NaN / Inf ------------------------------------------------


@pytest.mark.parametrize("engine", ["vmap", "fast"])
@pytest.mark.parametrize("value", [2.0, -0.5])
def test_bernoulli_target_outside_unit_interval(engine, value):
    x, _ = _data(None)
    y = torch.zeros(N, C)
    y[4, 1] = value
    with pytest.raises(ValueError, match=r"(?s)Bernoulli targets must lie in \[0, 1\].*sample 4"):
        natgrad.estimate_fisher(_mlp(), (x, y), "bernoulli", engine=engine)


@pytest.mark.parametrize(
    "likelihood,engine",
    [("gaussian", "vmap"), ("gaussian", "fast"), ("bernoulli", "vmap"), ("bernoulli", "fast")],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_target(likelihood, engine, bad):
    x, _ = _data(None)
    y = torch.full((N, C), 0.5)
    y[2, 0] = bad
    with pytest.raises(ValueError, match=r"(?s)Non-finite target.*sample 2"):
        natgrad.estimate_fisher(_mlp(), (x, y), likelihood, engine=engine)


def test_non_finite_target_custom_likelihood():
    lik = natgrad.CustomLikelihood(lambda f, y: ((f - y) ** 2).sum(-1), name="sq")
    x, _ = _data(None)
    y = torch.zeros(N, C)
    y[5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"(?s)Non-finite target.*sample 5"):
        natgrad.per_sample_grads(_mlp(), (x, y), lik)


def test_gaussian_target_shape_mismatch_names_fix():
    x, _ = _data(None)
    with pytest.raises(ValueError, match=r"gaussian targets must have the output's shape"):
        natgrad.estimate_fisher(_mlp(), (x, torch.zeros(N)), "gaussian")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_per_sample_grads(bad):
    x, y = _data(None)
    x[2, 1] = bad
    with pytest.raises(FloatingPointError, match=r"(?s)per-sample gradients.*'0.weight'.*sample 2"):
        natgrad.per_sample_grads(_mlp(), (x, y))


def test_non_finite_input_loop_fallback():
    x, y = _data(None)
    x[1, 0] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"(?s)per-sample gradients.*'lin.weight'.*sample 1"
    ):
        natgrad.per_sample_grads(_Branchy(), (x, y))


# -- random or batch-mixing models ---------------------------------------------------------

CURVATURE_PATHS = {
    "estimate_vmap": lambda m, b: natgrad.estimate_fisher(m, b, engine="vmap"),
    "estimate_fast": lambda m, b: natgrad.estimate_fisher(m, b, engine="fast"),
    "estimate_curvature": lambda m, b: natgrad.estimate_curvature(m, b, kind="diag"),
    "precond_diag": lambda m, b: _pre_step("diag")(m, b),
    "precond_kfac": lambda m, b: _pre_step("kfac")(m, b),
    "precond_woodbury": lambda m, b: _pre_step("woodbury")(m, b),
    "directions_gram": lambda m, b: natgrad.top_fisher_directions(m, b, k=2),
    "directions_lanczos": lambda m, b: natgrad.top_fisher_directions(
        m, b, k=2, method="lanczos"
    ),
    "damage_given_fisher": lambda m, b: natgrad.fisher_weighted_damage(
        m, b, b, fisher_a={k: torch.ones_like(p) for k, p in m.named_parameters()}
    ),
    "tracker": lambda m, b: natgrad.FisherTracker(m).update("task", b),
}


# the preconditioner's own refresh pass runs in eval mode (tests/optim), so not refused
REFUSING_PATHS = sorted(k for k in CURVATURE_PATHS if not k.startswith("precond_"))


@pytest.mark.parametrize("path", REFUSING_PATHS)
def test_train_mode_dropout_refused(path):
    model = _mlp(nn.Dropout(0.5)).train()
    with pytest.raises(ValueError, match=r"(?s)Dropout.*train mode.*model.eval\(\)"):
        CURVATURE_PATHS[path](model, _data(None))


@pytest.mark.parametrize(
    "module", [nn.AlphaDropout(0.2), nn.FeatureAlphaDropout(0.2), nn.Dropout1d(0.3)]
)
def test_every_dropout_kind_refused(module):
    model = nn.Sequential(nn.Linear(D, 8), module, nn.Linear(8, C)).train()
    with pytest.raises(ValueError, match=rf"{type(module).__name__}.*train mode"):
        natgrad.estimate_fisher(model, _data(None))


def test_attention_dropout_attribute_refused():
    """Attention that draws dropout inside its forward (a float ``dropout`` attribute)."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(D, 2, dropout=0.1, batch_first=True)
            self.head = nn.Linear(D, C)

        def forward(self, x):
            h = x.view(x.shape[0], 1, D)
            return self.head(self.mha(h, h, h, need_weights=False)[0][:, 0])

    with pytest.raises(ValueError, match=r"(?s)MultiheadAttention.*dropout=0.1.*train mode"):
        natgrad.estimate_fisher(Attn().train(), _data(None))


def test_eval_mode_dropout_equals_dropout_free_model():
    drop = _mlp(nn.Dropout(0.5)).eval()
    plain = _mlp()
    x, y = _data(None)
    F1 = natgrad.estimate_fisher(drop, (x, y))
    F0 = natgrad.estimate_fisher(plain, (x, y))
    assert [F1[k] for k in F1] and all(torch.equal(F1[a], F0[b]) for a, b in zip(F1, F0, strict=True))


def test_train_mode_zero_dropout_is_deterministic_and_allowed():
    model = _mlp(nn.Dropout(0.0)).train()
    x, y = _data(None)
    F = natgrad.estimate_fisher(model, (x, y))
    ref = natgrad.estimate_fisher(_mlp(), (x, y))
    assert all(torch.equal(F[a], ref[b]) for a, b in zip(F, ref, strict=True))


@pytest.mark.parametrize("path", REFUSING_PATHS)
def test_train_mode_batchnorm_refused(path):
    model = _mlp(nn.BatchNorm1d(8)).train()
    with pytest.raises(ValueError, match=r"(?s)BatchNorm1d\) is in train mode.*model.eval\(\)"):
        CURVATURE_PATHS[path](model, _data(None))


# -- the model's own forward failure --------------------------------------------------------

FORWARD_PATHS = {
    "per_sample_grads": lambda m, b: natgrad.per_sample_grads(m, b),
    "per_sample_grads_vmap": lambda m, b: natgrad.per_sample_grads(m, b, engine="vmap"),
    "estimate_vmap": lambda m, b: natgrad.estimate_fisher(m, b, engine="vmap"),
    "estimate_fast": lambda m, b: natgrad.estimate_fisher(m, b, engine="fast"),
    "estimate_mc": lambda m, b: natgrad.estimate_fisher(m, b, labels="mc", engine="vmap"),
    "precond_kfac": lambda m, b: _pre_step("kfac")(m, b),
    "precond_woodbury": lambda m, b: _pre_step("woodbury")(m, b),
    "damage": lambda m, b: natgrad.fisher_weighted_damage(
        m, b, b, fisher_a={k: torch.ones_like(p) for k, p in m.named_parameters()}
    ),
    "uncertainty": lambda m, b: natgrad.fisher_uncertainty(m, b[0], _ones_fisher(m)),
}


@pytest.mark.parametrize("path", sorted(FORWARD_PATHS))
def test_forward_shape_mismatch_names_the_batch(path):
    x = torch.randn(N, D + 1)  # the model takes D features
    _, y = _data(None)
    with pytest.raises(RuntimeError) as info:
        FORWARD_PATHS[path](_mlp(), (x, y))
    msg = str(info.value)
    where = {"damage": "task_a_batch", "uncertainty": "the batch"}.get(path, "batch 0")
    assert f"model's forward failed on {where}, inputs (6, 5) float32, parameters float32" in msg
    assert "1x5" not in msg  # no one-sample probe shape the user never passed
    assert "6x5" in msg  # the original error, on the user's batch
    assert isinstance(info.value.__cause__, RuntimeError)


def test_forward_dtype_mismatch_names_both_dtypes():
    x, y = _data(None)
    with pytest.raises(RuntimeError, match=r"inputs \(6, 4\) float64, parameters float32: "):
        natgrad.estimate_fisher(_mlp(), (x.double(), y))


@pytest.mark.parametrize("engine", ["vmap", "fast"])
def test_forward_failure_names_the_batch_index(engine):
    x, y = _data(None)
    batches = [(x, y), (x, y), (torch.randn(4, D + 2), y[:4])]
    with pytest.raises(RuntimeError, match=r"forward failed on batch 2, inputs \(4, 6\) float32"):
        natgrad.estimate_fisher(_mlp(), batches, engine=engine)


def test_forward_failure_on_one_sample_only_says_so():
    """A model that needs several samples fails on natgrad's one-sample probe only."""

    class NeedsTwo(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, C)

        def forward(self, x):
            if x.shape[0] < 2:
                raise ValueError("needs at least two samples")
            return self.lin(x)

    with pytest.raises(
        ValueError, match=r"1 sample\(s\) cut from batch 0 \(the whole batch runs\).*two samples"
    ):
        natgrad.estimate_fisher(NeedsTwo(), _data(None), engine="vmap")


def test_forward_failure_dict_batch_names_each_input():
    ids = torch.randint(0, 7, (3, 5))
    model = _Tokens()
    with pytest.raises(TypeError, match=r"inputs \{ids: \(3, 5\) int64, mask: \(3, 5\) int64\}"):
        natgrad.estimate_fisher(
            model,
            {"ids": ids, "mask": torch.ones(3, 5, dtype=torch.long), "labels": ids},
            "token_categorical",
        )


class _DictForward(nn.Module):
    """A forward that takes the batch dict itself, positionally."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D, C)

    def forward(self, batch):
        return self.lin(batch["x"]) * batch["scale"]


class _Keywords(nn.Module):
    """The documented fix: collect the keyword arguments into the dict."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(inputs)


@pytest.mark.parametrize("engine", ["vmap", "fast"])
@pytest.mark.parametrize("form", ["(dict, y)", "dict"])
def test_forward_taking_the_dict_positionally_names_both_conventions(engine, form):
    """model(**dict) on forward(self, batch) read "got an unexpected keyword argument 'x'"."""
    x, y = _data(None)
    inputs = {"x": x, "scale": torch.full((N, 1), 2.0)}
    batch = (inputs, y) if form == "(dict, y)" else {**inputs, "labels": y}
    model = _DictForward()
    with pytest.raises(TypeError) as err:
        natgrad.estimate_fisher(model, batch, engine=engine)
    msg = str(err.value)
    assert "no parameter of _DictForward.forward is named after a key" in msg
    assert "one required positional parameter, 'batch'" in msg
    assert "If the batch's keys are misnamed" in msg  # the other cause, also named
    assert "as keyword arguments, model(**inputs)" in msg and "('x', 'scale')" in msg
    assert "forward(self, **inputs) returns self.model(inputs)" in msg
    F = natgrad.estimate_fisher(_Keywords(model), batch, engine=engine)  # the fix runs
    ref = torch.zeros_like(model.lin.weight)  # brute force: one backward per sample
    for n in range(N):
        loss = nn.functional.cross_entropy(2.0 * model.lin(x[n : n + 1]), y[n : n + 1])
        (g,) = torch.autograd.grad(loss, model.lin.weight)
        ref += g**2 / N
    torch.testing.assert_close(F["model.lin.weight"], ref)


# -- wrong types at entry -------------------------------------------------------------------

ENTRY_POINTS = {
    "per_sample_grads": lambda m: natgrad.per_sample_grads(m, _data(None)),
    "estimate_fisher": lambda m: natgrad.estimate_fisher(m, _data(None)),
    "preconditioner": lambda m: natgrad.FisherPreconditioner(m),
    "tracker": lambda m: natgrad.FisherTracker(m),
    "ewc": lambda m: natgrad.EWC(m),
    "damage": lambda m: natgrad.fisher_weighted_damage(m, _data(None), _data(None)),
    "directions": lambda m: natgrad.top_fisher_directions(m, _data(None), k=1),
    "uncertainty": lambda m: natgrad.fisher_uncertainty(m, _data(None)[0], {}),
    "importance": lambda m: natgrad.fisher_importance({}, m),
}


@pytest.mark.parametrize("path", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("bad", [None, "model.pt"])
def test_model_not_a_module(path, bad):
    with pytest.raises(TypeError, match=r"torch.nn.Module.*got (NoneType|str)"):
        ENTRY_POINTS[path](bad)


def test_meta_device_model():
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ValueError, match=r"meta device"):
        natgrad.estimate_fisher(model, _data(None))


FISHER_USES = {
    "ewc": lambda m, F: natgrad.EWC(m, F),
    "scale_by_fisher": lambda m, F: natgrad.scale_by_fisher(m, F),
    "importance": lambda m, F: natgrad.fisher_importance(F, m),
    "uncertainty": lambda m, F: natgrad.fisher_uncertainty(m, _data(None)[0], F),
    "natgrad_norms": lambda m, F: natural_gradient_norms(m, _data(None), F),
    "compare": lambda m, F: natgrad.compare_task_fisher(F, F),
}


@pytest.mark.parametrize("path", sorted(FISHER_USES))
def test_fisher_given_as_list(path):
    model = _mlp()
    F = natgrad.estimate_fisher(model, _data(None))
    with pytest.raises(TypeError, match=r"(?s)DiagonalFisher.*got a list"):
        FISHER_USES[path](model, [F])


def test_fisher_dict_with_non_tensor_values():
    model = _mlp()
    bad = {k: p.detach().tolist() for k, p in model.named_parameters()}
    with pytest.raises(TypeError, match=r"(?s)'0.weight'.*list.*tensor"):
        natgrad.EWC(model, bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: natgrad.estimate_fisher(m, (x.tolist(), y.tolist())),
        lambda m, x, y: natgrad.per_sample_grads(m, (x.tolist(), y)),
        lambda m, x, y: natgrad.estimate_fisher(m, [(x.tolist(), y)], engine="fast"),
        lambda m, x, y: natgrad.fisher_uncertainty(m, x.tolist(), _ones_fisher(m)),
    ],
    ids=["estimate", "per_sample_grads", "estimate_list_of_batches", "uncertainty"],
)
def test_python_lists_instead_of_tensors(call):
    x, y = _data(None)
    with pytest.raises(TypeError, match=r"(?s)Python list.*torch.tensor"):
        call(_mlp(), x, y)


def test_dict_batch_of_lists_like_a_tokenizer_without_return_tensors():
    ids = torch.randint(0, 7, (3, 5))
    batch = {"ids": ids.tolist(), "labels": ids.tolist()}
    with pytest.raises(TypeError, match=r"(?s)'ids'.*Python list.*return_tensors='pt'"):
        natgrad.estimate_fisher(_Tokens(), batch, "token_categorical")


def test_metric_context_tuple_batch():
    x, y = _data(None)
    with pytest.raises(TypeError, match=r"wrap it in a list: batches=\[\(x, y\)\]"):
        MetricContext(models=[_mlp()], batches=(x, y))


def test_metric_context_single_model():
    with pytest.raises(TypeError, match=r"models=\[model\]"):
        MetricContext(models=_mlp())


def test_metric_context_fisher_not_by_task():
    model = _mlp()
    F = natgrad.estimate_fisher(model, _data(None))
    with pytest.raises(TypeError, match=r"fisher=\{'task_0': F\}"):
        MetricContext(models=[model], fisher=F)


EMPTY_PATHS = {
    "per_sample_grads": lambda m, b: natgrad.per_sample_grads(m, b),
    "per_sample_grads_vmap": lambda m, b: natgrad.per_sample_grads(m, b, engine="vmap"),
    "estimate_vmap": lambda m, b: natgrad.estimate_fisher(m, b, engine="vmap"),
    "estimate_fast": lambda m, b: natgrad.estimate_fisher(m, b, engine="fast"),
    "precond_kfac": lambda m, b: _pre_step("kfac")(m, b),
    "precond_woodbury": lambda m, b: _pre_step("woodbury")(m, b),
    "directions": lambda m, b: natgrad.top_fisher_directions(m, b, k=1),
    "uncertainty": lambda m, b: natgrad.fisher_uncertainty(m, b, _ones_fisher(m)),
}


@pytest.mark.parametrize("path", sorted(EMPTY_PATHS))
def test_empty_batch(path):
    x, y = _data(None)
    with pytest.raises(ValueError, match=r"Empty batch \(0 samples\)"):
        EMPTY_PATHS[path](_mlp(), (x[:0], y[:0]))


def test_no_batches_at_all():
    with pytest.raises(ValueError, match=r"No samples"):
        natgrad.estimate_fisher(_mlp(), [])


# -- estimator options (natgrad.EstimatorOptions): misspelt, refused or bad values ----------

_ESTIMATORS = {
    "estimate_fisher": lambda m, b, **o: natgrad.estimate_fisher(m, b, **o),
    "per_sample_grads": lambda m, b, **o: natgrad.per_sample_grads(m, b, **o),
    "kfac": lambda m, b, **o: natgrad.estimate_curvature(m, b, kind="kfac", **o),
    "lowrank": lambda m, b, **o: natgrad.estimate_curvature(m, b, kind="lowrank", **o),
    "directions": lambda m, b, **o: natgrad.top_fisher_directions(m, b, k=1, **o),
    "damage": lambda m, b, **o: natgrad.fisher_weighted_damage(m, b, b, **o),
}


@pytest.mark.parametrize("fn", list(_ESTIMATORS))
def test_misspelt_option_is_named(fn):
    model, (x, y) = _mlp(), _data(None)
    with pytest.raises(TypeError, match="unknown option.*'mc_sample'.*mc_samples"):
        _ESTIMATORS[fn](model, (x, y), mc_sample=2)


@pytest.mark.parametrize(
    "fn, option, value",
    [
        ("estimate_fisher", "labels", "empiric"),
        ("kfac", "labels", "Exact"),
        ("damage", "engine", "quick"),
        ("per_sample_grads", "mc_samples", 0),
        ("lowrank", "chunk_size", 0),
        ("directions", "mc_samples", 1.5),
    ],
)
def test_bad_option_value_is_named(fn, option, value):
    model, (x, y) = _mlp(), _data(None)
    with pytest.raises(ValueError, match=option):
        _ESTIMATORS[fn](model, (x, y), **{option: value})


@pytest.mark.parametrize("fn", ["estimate_fisher", "kfac", "damage"])
def test_generator_of_wrong_type(fn):
    model, (x, y) = _mlp(), _data(None)
    with pytest.raises(TypeError, match="generator must be a torch.Generator.*manual_seed"):
        _ESTIMATORS[fn](model, (x, y), labels="mc", generator=0)


@pytest.mark.parametrize("fn", ["lowrank", "directions"])  # per_sample_grads takes engine
def test_option_a_function_cannot_honour(fn):
    model, (x, y) = _mlp(), _data(None)
    with pytest.raises(TypeError, match="does not take the option.*'engine'"):
        _ESTIMATORS[fn](model, (x, y), engine="vmap")


def test_meta_buffer_deep_in_the_model_is_named():
    """One buffer on the meta device, in a submodule: the error names that buffer."""
    model = nn.Sequential(nn.Linear(D, 8), nn.Sequential(nn.BatchNorm1d(8)), nn.Linear(8, C))
    model[1][0].running_var = torch.empty(8, device="meta")
    with pytest.raises(ValueError, match=r"'1\.0\.running_var' is on the meta device"):
        natgrad.estimate_fisher(model.eval(), _data(None))


@pytest.mark.parametrize("path", sorted(CURVATURE_PATHS))
def test_batchnorm_without_running_stats_refused_in_eval_mode_too(path):
    # track_running_stats=False normalizes with the batch's statistics in eval mode as
    # well: no per-sample gradients, and the preconditioner's eval-mode refresh refuses it
    model = _mlp(nn.BatchNorm1d(8, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"(?s)keeps no running statistics.*even in eval mode"):
        CURVATURE_PATHS[path](model, _data(None))


def test_params_naming_the_second_name_of_a_tied_weight_names_the_first():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # model.named_parameters() lists it once, as "0.weight"
    model = nn.Sequential(emb, head)
    ids, y = torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match=r"'1.weight' is '0.weight'.*select \['0.weight'\]"):
        natgrad.estimate_fisher(model, (ids, y), params=["1.weight"])
    with pytest.raises(ValueError, match=r"Unknown parameter names \['2.weight'\]"):
        natgrad.estimate_fisher(model, (ids, y), params=["2.weight"])


def test_dict_inputs_with_labels_given_twice():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, C)

        def forward(self, x):
            return self.lin(x)

    x, y = _data(None)
    with pytest.raises(ValueError, match=r"labels twice: y and the inputs' 'labels'; drop one"):
        natgrad.estimate_fisher(Kw(), ({"x": x, "labels": y}, y))
