"""Bad inputs of the Laplace capture path (``engine=``): each raises naming the problem
and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import natgrad
from tests.reference import dense_copy


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def _curv(model, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return natgrad.estimate_curvature(model, _data(), kind=kind, labels="exact")


@pytest.mark.parametrize("fn", ["fisher_uncertainty", "optimize_prior_precision"])
def test_unknown_engine(fn):
    model = _mlp()
    x, y = _data()
    c = _curv(model, "diag")
    call = {
        "fisher_uncertainty": lambda: natgrad.fisher_uncertainty(model, x, c, engine="gpu"),
        "optimize_prior_precision": lambda: natgrad.optimize_prior_precision(
            model, c, (x, y), engine="gpu"
        ),
    }[fn]
    with pytest.raises(ValueError, match="engine"):
        call()


def test_fast_engine_without_a_capturable_parameter():
    model = _mlp()
    x, _ = _data()
    shapes = {k: p.shape for k, p in model.named_parameters()}
    c = dense_copy(_curv(model, "diag"), shapes)  # a dense curvature couples every layer
    with pytest.raises(ValueError, match="engine='fast' found no parameter"):
        natgrad.fisher_uncertainty(model, x, c, engine="fast")
    prelu = nn.Sequential(nn.PReLU(4)).double().eval()  # no Linear / Conv parameter
    fisher = natgrad.DiagonalFisher({"0.weight": torch.ones(4, dtype=torch.float64)}, 10)
    with pytest.raises(ValueError, match="engine='auto' or engine='vmap'"):
        natgrad.fisher_uncertainty(prelu, x, fisher, engine="fast")


class _HeadFirst(nn.Module):
    """Registers its output layer before the body and a final-registered LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 3)
        self.body = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.body(x))))


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_last_layer_that_does_not_run_last_is_named(kind):
    # subset="last_layer" silently took the LayerNorm (registered last), not the head
    torch.manual_seed(0)
    model = _HeadFirst().double().eval()
    x, y = _data()
    curv = _curv(model, kind)
    match = "runs 'head' after it; pass params=\\['head.weight', 'head.bias'\\]"
    with pytest.raises(ValueError, match=match):
        natgrad.fisher_uncertainty(model, x[:3], curv, prior_precision=1.0, subset="last_layer")
    with pytest.raises(ValueError, match=match):
        natgrad.optimize_prior_precision(model, curv, (x, y), grid=[0.1, 1.0], subset="last_layer")
    natgrad.fisher_uncertainty(model, x[:3], curv, prior_precision=1.0,
                               params=["head.weight", "head.bias"])  # the named fix runs


class _AttentionLast(nn.Module):
    """Ends in nn.MultiheadAttention, whose out_proj is read, never called as a module."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.emb(x.reshape(-1, 4, 3))
        return self.attn(h, h, h, need_weights=False)[0].mean(1)


@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_last_layer_of_a_model_ending_in_attention_is_its_out_proj(engine):
    # the last-layer check saw 'attn' run after out_proj (never called as a module) and
    # refused, naming the input projection as the fix
    torch.manual_seed(0)
    model = _AttentionLast().double().eval()
    x, y = torch.randn(12, 12, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    curv = natgrad.estimate_curvature(model, (x, y), kind="diag", likelihood="gaussian")
    got = natgrad.fisher_uncertainty(model, x[:3], curv, prior_precision=1.0, subset="last_layer",
                                     likelihood="gaussian", engine=engine)
    want = natgrad.fisher_uncertainty(model, x[:3], curv, prior_precision=1.0,
                                      params=["attn.out_proj.weight", "attn.out_proj.bias"],
                                      likelihood="gaussian", engine=engine)
    torch.testing.assert_close(got.logit_variance, want.logit_variance, rtol=0, atol=0)


def test_a_gaussian_curvature_without_its_sigma_warns():
    # the curvature records only the name 'gaussian': the predictive silently used σ = 1
    torch.manual_seed(0)
    model = _mlp()[:1]  # Linear(4, 5): a 5-output regression
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randn(20, 5, dtype=torch.float64)
    curv = natgrad.estimate_curvature(model, (x, y), likelihood=natgrad.Gaussian(0.5),
                                      kind="kfac")
    with pytest.warns(UserWarning, match="without its sigma, so the predictive uses sigma = 1"):
        r = natgrad.fisher_uncertainty(model, x[:2], curv, prior_precision=1.0)
    torch.testing.assert_close(r.predictive_variance, r.logit_variance + 1.0)
    with pytest.warns(UserWarning, match="without its sigma"):
        natgrad.optimize_prior_precision(model, curv, (x, y), grid=[0.5, 1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = natgrad.fisher_uncertainty(model, x[:2], curv, prior_precision=1.0,
                                       likelihood=natgrad.Gaussian(0.5))
        natgrad.optimize_prior_precision(model, curv, method="marglik")  # σ is not used
    torch.testing.assert_close(r.predictive_variance, r.logit_variance + 0.25)


# -- token_categorical ------------------------------------------------------------------


def _token_fisher(model):
    return natgrad.DiagonalFisher(
        {k: torch.ones_like(p) for k, p in model.named_parameters()}, 10,
        likelihood="token_categorical",
    )


def test_token_categorical_needs_rank_three_logits():
    model = _mlp()  # (N, C) logits: one label per sample, not per token
    x, _ = _data()
    with pytest.raises(ValueError, match=r"needs logits of shape \(N, T, C\)"):
        natgrad.fisher_uncertainty(model, x, _token_fisher(model))
    with pytest.raises(ValueError, match=r"needs logits of shape \(N, T, C\)"):
        natgrad.optimize_prior_precision(model, _token_fisher(model), (x, torch.zeros(12, 1)))


def _token_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 4)).double().eval()


def test_token_grid_labels_must_be_tokens():
    model = _token_model()
    x = torch.randint(0, 5, (6, 3))
    with pytest.raises(ValueError, match=r"labels must be integer tokens of shape \(N, T\)"):
        natgrad.optimize_prior_precision(model, _token_fisher(model), (x, torch.zeros(6).long()))


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("length", [2, 4])
def test_token_grid_labels_of_the_wrong_length_name_both_shapes(shift, length):
    """Integer labels one token short or long: the message named a dtype fix
    ("convert with y.long()") for a length problem."""
    model = _token_model()
    x, y = torch.randint(0, 5, (6, 3)), torch.randint(0, 4, (6, length))
    lik = natgrad.TokenCategorical(shift=shift)
    with pytest.raises(ValueError) as err:
        natgrad.optimize_prior_precision(model, _token_fisher(model), (x, y), likelihood=lik)
    msg = str(err.value)
    assert f"of shape (N, T) = (6, 3), one per position of the logits (6, 3, 4), got shape (6, {length})" in msg
    assert "pad with ignore_index=-100, or cut them" in msg and "y.long()" not in msg
    assert ("with shift=True the labels are the unshifted sequence" in msg) == shift


def test_token_grid_on_one_token_sequences_with_shift_names_the_shift():
    """T = 1 with shift=True said "every label is the likelihood's ignore_index"."""
    model = _token_model()
    x, y = torch.randint(0, 5, (6, 1)), torch.randint(0, 4, (6, 1))
    with pytest.raises(ValueError, match=r"shift=True scores the label at position t \+ 1 .*"
                       r"T = 1 .*no token to score.*TokenCategorical\(shift=False\)"):
        natgrad.optimize_prior_precision(model, _token_fisher(model), (x, y),
                                         likelihood=natgrad.TokenCategorical(shift=True))


class _TiedHead(nn.Module):
    """A GPT-2 style head: its weight is the embedding matrix (its bias its own)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(5, 3), nn.Linear(3, 5)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("call", ["grid", "marglik", "uncertainty"])
def test_last_layer_tied_to_the_embedding_names_the_tie(call):
    """subset='last_layer' on a tied head said "params names tied weights by their
    second name", though the caller passed no params=."""
    model = _TiedHead().double().eval()
    x = torch.randint(0, 5, (6, 3))
    fisher = _token_fisher(model)
    runs = {
        "grid": lambda: natgrad.optimize_prior_precision(
            model, fisher, (x, x), subset="last_layer", grid=[0.1, 1.0]),
        "marglik": lambda: natgrad.optimize_prior_precision(
            model, fisher, x, subset="last_layer", method="marglik", grid=[0.1, 1.0]),
        "uncertainty": lambda: natgrad.fisher_uncertainty(
            model, x, fisher, subset="last_layer"),
    }
    with pytest.raises(ValueError) as err:
        runs[call]()
    msg = str(err.value)
    assert "subset='last_layer' takes the last registered module" in msg
    assert "'head.weight' is tied to 'emb.weight'" in msg and "params names" not in msg
    assert "Pass params=['emb.weight', 'head.bias'] for the shared tensor" in msg
    natgrad.optimize_prior_precision(  # the suggested fix runs
        model, fisher, (x, x), params=["emb.weight", "head.bias"], grid=[0.1, 1.0])


def test_token_batches_of_different_lengths_are_refused():
    model = _token_model()
    batches = [torch.randint(0, 5, (2, 3)), torch.randint(0, 5, (2, 4))]
    with pytest.raises(ValueError, match="pad every batch to one sequence length"):
        natgrad.fisher_uncertainty(model, iter(batches), _token_fisher(model))


def test_token_grid_with_every_label_ignored():
    model = _token_model()
    x = torch.randint(0, 5, (6, 3))
    y = torch.full((6, 3), -100)
    with pytest.raises(ValueError, match="no token to score"):
        natgrad.optimize_prior_precision(model, _token_fisher(model), (x, y))
    # an attention mask of zeros leaves every token out too, as in the Fisher
    model_kw = _TokensKw()
    batch = {"ids": x, "attention_mask": torch.zeros(6, 3, dtype=torch.long),
             "labels": torch.zeros(6, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="no token to score"):
        natgrad.optimize_prior_precision(model_kw, _token_fisher(model_kw), batch)


class _TokensKw(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(5, 3), nn.Linear(3, 4)

    def forward(self, ids, attention_mask):
        return self.out(self.emb(ids) * attention_mask.unsqueeze(-1))


# -- marglik on subset="last_layer" --------------------------------------------------------


class _HeadBeforeNorm(nn.Module):
    """Registers its head before a norm that runs before it: the last registered module
    with parameters (``norm``) is not the one that runs last (``head``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.body(x))))


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_marglik_last_layer_checks_the_module_that_runs_last(kind):
    # it used to score the norm's marginal likelihood silently (no data, no check)
    model = _HeadBeforeNorm().double().eval()
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = natgrad.estimate_curvature(model, (x, y), kind=kind, labels="exact")
    with pytest.raises(ValueError, match="needs a batch to check"):
        natgrad.optimize_prior_precision(model, curv, method="marglik", subset="last_layer")
    with pytest.raises(ValueError, match=r"runs 'head' after it; pass params=\['head.weight'"):
        natgrad.optimize_prior_precision(model, curv, x, method="marglik", subset="last_layer")
    with pytest.raises(ValueError, match="yielded no batches"):
        natgrad.optimize_prior_precision(model, curv, [], method="marglik", subset="last_layer")
    # the fix the message names: the head's parameters, the same as a correct subset
    natgrad.optimize_prior_precision(model, curv, method="marglik",
                                     params=["head.weight", "head.bias"])


def test_categorical_refuses_sequence_logits():
    # the predictive flattens each sample's outputs: a softmax over (T, C) mixed the
    # tokens' classes into one categorical, silently
    model = _token_model()
    fisher = natgrad.DiagonalFisher(
        {k: torch.ones_like(p) for k, p in model.named_parameters()}, 10)
    x = torch.randint(0, 5, (6, 3))
    with pytest.raises(ValueError, match="For \\(N, T, C\\) sequence outputs use likelihood="
                                         "'token_categorical'"):
        natgrad.fisher_uncertainty(model, x, fisher)
    with pytest.raises(ValueError, match="needs logits of shape \\(N, C\\)"):
        natgrad.optimize_prior_precision(model, fisher, (x, torch.zeros(6).long()))
