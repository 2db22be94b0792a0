"""Fault cases of the uses on any curvature: each bad input raises a named, fixable error."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import natgrad
from tests.reference import DenseCurvature


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()


def _dense(model, seed=1, kind="dense", scale=1.0):
    shapes = {k: p.shape for k, p in model.named_parameters()}
    p = sum(s.numel() for s in shapes.values())
    a = torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return DenseCurvature(scale * a @ a.T / p, shapes, 10, kind)


def _diag(model, value=1.0):
    return natgrad.DiagonalFisher(
        {k: torch.full_like(p, value) for k, p in model.named_parameters()}, 10
    )


# -- OBS ----------------------------------------------------------------------------------


def test_obs_refuses_a_plain_dict():
    model = _model()
    with pytest.raises(TypeError, match="must be a natgrad.Curvature"):
        natgrad.obs_prune(model, {k: torch.ones_like(p) for k, p in model.named_parameters()}, 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=0.5, rounds=2), "needs data="),
        (dict(sparsity=0.5, method="newton"), "Unknown method"),
        (dict(sparsity=0.5, damping=-1.0), "Invalid damping"),
        (dict(sparsity=0.5, scope="row"), "Unknown scope"),
        (dict(sparsity=0.5, min_keep_per_layer=1.5), "min_keep_per_layer"),
        (dict(sparsity=0.5, prune=["nope.weight"]), "does not cover"),
        (dict(sparsity=0.9, min_keep_per_layer=0.5), "protected by min_keep_per_layer"),
        (dict(sparsity=0.5, rounds=0), "Invalid rounds"),
    ],
)
def test_obs_bad_arguments(kwargs, match):
    model = _model()
    sparsity = kwargs.pop("sparsity")
    with pytest.raises(ValueError, match=match):
        natgrad.obs_prune(model, _dense(model), sparsity, **kwargs)


def test_obs_refuses_an_already_pruned_model():
    model = _model()
    curv = _dense(model)
    natgrad.apply_masks(model, {"0.weight": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="(already pruned|lacks)"):
        natgrad.obs_prune(model, curv, 0.5)


def test_obs_curvature_of_another_model():
    model = _model()
    other = torch.nn.Sequential(torch.nn.Linear(3, 5)).double()
    with pytest.raises(ValueError, match="covers parameters the model lacks"):
        natgrad.obs_prune(other, _dense(model), 0.5)


def test_obs_zero_curvature_needs_an_explicit_damping():
    model = _model()
    with pytest.raises(ValueError, match="pass damping="):
        natgrad.obs_prune(model, _diag(model, 0.0), 0.5)


def test_obs_leaves_the_model_untouched_on_a_bad_argument():
    model = _model()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    with pytest.raises(ValueError):
        natgrad.obs_prune(model, _dense(model), 0.99, min_keep_per_layer=0.5)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k])


# -- EWC ----------------------------------------------------------------------------------


def test_ewc_lam_scale_needs_a_curvature():
    model = _model()
    with pytest.raises(ValueError, match="lam_scale needs the number of samples"):
        natgrad.EWC(model, {k: torch.ones_like(p) for k, p in model.named_parameters()},
                    lam_scale=1.0)


def test_ewc_lam_scale_must_be_positive():
    with pytest.raises(ValueError, match="lam_scale"):
        natgrad.EWC(_model(), lam_scale=0.0)


def test_ewc_online_over_other_parameters_needs_ema_union():
    # a kind without ema_union (the protocol's default) cannot fold over other names
    model = _model()
    ewc = natgrad.EWC(model, _dense(model), mode="online")
    with pytest.raises(ValueError, match="does not implement ema_union"):
        ewc.consolidate(DenseCurvature(
            _dense(model).matrix[:16, :16], {"0.weight": (4, 3), "0.bias": (4,)}, 5))


def _kron(model, kind, params=None):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return natgrad.estimate_curvature(model, x, kind=kind, labels="exact", params=params)


def test_ewc_online_refuses_mixed_kinds():
    model = _model()
    ewc = natgrad.EWC(model, _kron(model, "kfac"), mode="online")
    with pytest.raises(ValueError, match="folds curvatures of one kind"):
        ewc.consolidate(_kron(model, "ekfac"))


def test_ewc_online_kronecker_layer_laid_out_differently():
    # the new task covers a layer's weight without its bias: one G ⊗ A block cannot fold
    # with a [W, b] block
    model = _model()
    ewc = natgrad.EWC(model, _kron(model, "kfac"), mode="online")
    with pytest.raises(ValueError, match="Kronecker block of layer '0'"):
        ewc.consolidate(_kron(model, "kfac", params=["0.weight", "2.weight", "2.bias"]))


def test_ewc_refuses_mixing_dicts_and_curvatures():
    model = _model()
    ewc = natgrad.EWC(model, {k: torch.ones_like(p) for k, p in model.named_parameters()})
    with pytest.raises(ValueError, match="plain dicts"):
        ewc.consolidate(_dense(model))
    ewc2 = natgrad.EWC(model, _dense(model))
    with pytest.raises(ValueError, match="holds structured curvatures"):
        ewc2.consolidate({k: torch.ones_like(p) for k, p in model.named_parameters()})


def test_ewc_curvature_of_another_model():
    model = _model()
    other = torch.nn.Sequential(torch.nn.Linear(3, 5)).double()
    with pytest.raises(ValueError, match="has shape \\(4, 3\\) but the parameter has \\(5, 3\\)"):
        natgrad.EWC(other, _dense(model))


def test_suggest_lambda_faults():
    model = _model()
    with pytest.raises(ValueError, match="positive trace"):
        natgrad.EWC.suggest_lambda(_diag(model, 0.0))
    with pytest.raises(TypeError, match="needs a natgrad.Curvature"):
        natgrad.EWC.suggest_lambda({"w": torch.ones(2)})


# -- merging ------------------------------------------------------------------------------


def test_merge_curvatures_over_different_parameters():
    a, b = _model(0), _model(1)
    part = DenseCurvature(torch.eye(16, dtype=torch.float64), {"0.weight": (4, 3), "0.bias": (4,)})
    with pytest.raises(ValueError, match="estimate every model's curvature on the same"):
        natgrad.fisher_weighted_merge([a, b], [_dense(a), part])


def test_obs_and_merge_warn_when_conjugate_gradients_stop_early():
    # an unconverged CG solve used to be returned silently (only ObsReport.cg_residual
    # showed it; the merge showed nothing)
    model = _model()
    with pytest.warns(UserWarning, match="obs_prune's weight update: conjugate gradients "
                      "stopped after 1 products.*raise cg_iters="):
        natgrad.obs_prune(model, _dense(model), 0.5, method="cg", cg_iters=1)
    a, b = _model(0), _model(1)
    with pytest.warns(UserWarning, match="fisher_weighted_merge of the one system coupling every parameter: "
                      "conjugate gradients stopped after 2 products"):
        natgrad.fisher_weighted_merge([a, b], [_dense(a), _dense(b, 2)], method="cg", cg_iters=2)
    x = torch.randn(8, 3, dtype=torch.float64)
    ka, kb = (natgrad.estimate_curvature(m, x, kind="kfac", labels="exact") for m in (a, b))
    # layer '0' sees the same inputs in both models (equal A): its preconditioner is exact
    with pytest.warns(UserWarning, match="fisher_weighted_merge of layer '2': conjugate"):
        natgrad.fisher_weighted_merge([a, b], [ka, kb], method="cg", cg_iters=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        natgrad.fisher_weighted_merge([a, b], [_dense(a), _dense(b, 2)], method="cg")
        fresh = _model()
        natgrad.obs_prune(fresh, _dense(fresh), 0.5, method="cg", cg_tol=1e-8)


def test_merge_bad_method():
    a, b = _model(0), _model(1)
    with pytest.raises(ValueError, match="Unknown method"):
        natgrad.fisher_weighted_merge([a, b], [_dense(a), _dense(b)], method="lu")


def test_merge_bad_preconditioner():
    a, b = _model(0), _model(1)
    with pytest.raises(ValueError, match="Unknown preconditioner"):
        natgrad.fisher_weighted_merge([a, b], [_dense(a), _dense(b)], preconditioner="ilu")


def _meta_model():
    with torch.device("meta"):
        return _model()


_MERGES = {
    "fisher_weighted_merge": lambda models: natgrad.fisher_weighted_merge(
        models, [_diag(_model())] * 2
    ),
    "regmean_merge": lambda models: natgrad.regmean_merge(
        models, [torch.randn(4, 3, dtype=torch.float64)] * 2
    ),
}


@pytest.mark.parametrize("merge", sorted(_MERGES))
@pytest.mark.parametrize(
    "models, error, match",
    [
        (lambda: [], ValueError, r"models is empty: pass at least one model"),
        (lambda: [_model(), "ckpt.pt"], TypeError,
         r"models\[1\] needs a torch.nn.Module as model, got str: load it first"),
        (lambda: [_model(), None], TypeError, r"models\[1\] .*got NoneType: pass the model"),
        (lambda: (m for m in [_model(), _model()]), TypeError,
         r"models must be a list of nn.Module, got generator: pass a list"),
        (lambda: [_model(), _meta_model()], ValueError,
         r"models\[1\]: the model's tensor '0.weight' is on the meta device"),
    ],
    ids=["empty", "path", "none", "generator", "meta"],
)
def test_merges_refuse_a_bad_model_list(merge, models, error, match):
    with pytest.raises(error, match=match):
        _MERGES[merge](models())


def test_regmean_refuses_a_bare_model():
    # a bare nn.Sequential is iterable: list(model) would merge its layers as models
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"got a single Sequential: pass models=\[model\]"):
        natgrad.regmean_merge(_model(), [x, x, x])


def test_regmean_faults():
    a, b = _model(0), _model(1)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="one batch"):
        natgrad.regmean_merge([a, b], [x])
    with pytest.raises(ValueError, match="alpha"):
        natgrad.regmean_merge([a, b], [x, x], alpha=2.0)
    with pytest.raises(ValueError, match="differ"):
        natgrad.regmean_merge([a, torch.nn.Sequential(torch.nn.Linear(3, 5)).double()], [x, x])
    lin = [torch.nn.Linear(3, 2, bias=False).double() for _ in range(2)]
    with pytest.raises(ValueError, match="cannot give them unit trace"):
        natgrad.regmean_merge(lin, [torch.zeros(4, 3, dtype=torch.float64), x], normalize=True)


@pytest.mark.parametrize("layer", ["batchnorm", "dropout"])
def test_regmean_refuses_train_mode_models_and_leaves_their_buffers(layer):
    # the Grams are of the models' own forwards: a train-mode BatchNorm mixed the batch
    # and updated the inputs' running statistics, a dropout made the merge random
    # (0.31 apart between two identical calls on a tiny BERT; found by review)
    def make(seed):
        torch.manual_seed(seed)
        mid = torch.nn.BatchNorm1d(4) if layer == "batchnorm" else torch.nn.Dropout(0.5)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), mid, torch.nn.Linear(4, 2)).double()

    models = [make(0), make(1)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"train mode.*eval\(\)"):
        natgrad.regmean_merge(models, [x, x])
    for m, b in zip(models, before, strict=True):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k]), k
    natgrad.regmean_merge([m.eval() for m in models], [x, x])  # in eval mode: accepted


# -- Laplace ------------------------------------------------------------------------------


def test_laplace_subset_faults():
    model = _model().eval()
    x = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="Unknown subset"):
        natgrad.fisher_uncertainty(model, x, _dense(model), subset="first_layer")
    with pytest.raises(ValueError, match="either params= or subset="):
        natgrad.fisher_uncertainty(model, x, _dense(model), subset="all", params=["2.weight"])


def test_laplace_marglik_on_a_subset_of_a_curvature():
    model = _model().eval()
    with pytest.raises(ValueError, match="logdet over all it covers"):
        natgrad.optimize_prior_precision(
            model, _dense(model, kind="kfac"), torch.zeros(1, 3, dtype=torch.float64),
            method="marglik", subset="last_layer",
        )


def _estimated(model, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return natgrad.estimate_curvature(model, (x, torch.randint(0, 2, (8,), generator=g)), kind=kind)


def test_laplace_marglik_on_a_subset_that_cuts_a_kronecker_block():
    model = _model().eval()
    curv = _estimated(model, "kfac", 2)
    with pytest.raises(ValueError, match="cut through the Kronecker block of layer '2'"):
        natgrad.optimize_prior_precision(model, curv, method="marglik", params=["2.weight"])
    with pytest.raises(ValueError, match="select both or neither"):
        curv.restrict(["2.bias"])
    with pytest.raises(ValueError, match="does not cover them"):
        curv.restrict(["2.weight", "2.bias", "3.weight"])


def test_a_coupled_curvature_cannot_be_restricted():
    model = _model().eval()
    curv = _estimated(model, "lowrank", 3)
    with pytest.raises(ValueError, match="'lowrank' curvature cannot be restricted.*params="):
        curv.restrict(["2.weight", "2.bias"])
    with pytest.raises(ValueError, match="does not cover them"):
        _diag(model).restrict(["9.weight"])


def test_laplace_refuses_a_non_curvature_object():
    model = _model().eval()
    with pytest.raises((TypeError, ValueError)):
        natgrad.fisher_uncertainty(model, torch.zeros(1, 3, dtype=torch.float64), [1, 2])


def test_damage_curvature_of_another_model():
    model = _model()
    other = torch.nn.Sequential(torch.nn.Linear(3, 5)).double()
    batch = (torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lacks"):
        natgrad.fisher_weighted_damage(other, batch, batch, fisher_a=_dense(model))


def test_obs_gradual_needs_a_likelihood_its_name_does_not_fully_say():
    # rounds > 1 re-estimated with likelihood='categorical' whatever the curvature's was
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    curv = natgrad.estimate_curvature(model, (x, y), likelihood=natgrad.Gaussian(0.5),
                                      kind="kfac")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="estimated with the likelihood 'gaussian'.*pass "
                       "likelihood="):
        natgrad.obs_prune(model, curv, 0.5, rounds=2, data=(x, y))
    with pytest.raises(ValueError, match="likelihood='bernoulli' differs from the curvature's"):
        natgrad.obs_prune(model, curv, 0.5, rounds=2, data=(x, y), likelihood="bernoulli")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    natgrad.obs_prune(model, curv, 0.5, rounds=2, data=(x, y), likelihood=natgrad.Gaussian(0.5))


def test_a_diagonal_only_use_names_the_diagonal_of_a_structured_curvature():
    # the fix said "estimate one with natgrad.estimate_fisher", as if none had been given
    model = _model()
    x = torch.randn(8, 3, dtype=torch.float64)
    c = natgrad.estimate_curvature(model, x, kind="kfac", labels="exact")
    with pytest.raises(TypeError, match="got KroneckerFisher; this function takes a diagonal "
                       "Fisher: pass its diagonal, natgrad.DiagonalFisher\\(c.diagonal\\(\\), "
                       "c.n_samples, labels=c.labels, likelihood=c.likelihood\\)"):
        natgrad.fisher_importance(c, model)
    d = natgrad.DiagonalFisher(c.diagonal(), c.n_samples, labels=c.labels, likelihood=c.likelihood)
    assert (d.labels, d.likelihood) == ("exact", "categorical")
    imp = natgrad.fisher_importance(d, model)
    assert sorted(imp) == sorted(k for k, _ in model.named_parameters())


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac", "lowrank"])
def test_online_ewc_refuses_a_parameter_renamed_by_pruning_between_tasks(kind):
    """Task 1 estimated before torch.nn.utils.prune (``0.weight``), task 2 after
    (``0.weight_orig``): the fold counted the weight twice (λ from lam_scale 66% too
    large, found by review); a named error."""
    import torch.nn.utils.prune as tprune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    c1 = natgrad.estimate_curvature(m, (x, y), kind=kind, labels="exact")
    ewc = natgrad.EWC(m, c1, lam=1.0, mode="online", gamma=1.0, lam_scale=1e-3)
    tprune.l1_unstructured(m[0], "weight", amount=0.0)
    c2 = natgrad.estimate_curvature(m, (x, y), kind=kind, labels="exact")
    with pytest.raises(ValueError, match="same parameter .*make_permanent"):
        ewc.consolidate(c2)
