"""Renamed names keep working for one release, with a DeprecationWarning."""

import pytest
import torch

import natgrad
from natgrad.metrics import MetricContext, registry


def test_fisher_overlap_is_a_warning_alias_of_mask_overlap():
    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([True, False, True, False])}
    with pytest.warns(DeprecationWarning, match="use mask_overlap"):
        old = natgrad.fisher_overlap(a, b)
    assert old.total == natgrad.mask_overlap(a, b).total


def test_asymmetry_old_keywords_warn_and_map_to_the_new_ones():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    a = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    b = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    new = natgrad.fisher_damage_asymmetry(model, task_a_batch=a, task_b_batch=b)
    with pytest.warns(DeprecationWarning, match="task_a_batch"):
        old = natgrad.fisher_damage_asymmetry(model, math_batch=a, general_batch=b)
    assert old.log_ratio == new.log_ratio
    with pytest.raises(TypeError, match="both 'math_batch'"):
        natgrad.fisher_damage_asymmetry(model, task_a_batch=a, math_batch=a, task_b_batch=b)


@pytest.mark.parametrize("old,new", [("scale_by_fisher", "natural_gradient_norms"),
                                     ("fisher_overlap", "mask_overlap")])
def test_old_metric_names_warn_and_are_not_listed(old, new):
    assert old not in registry.names() and new in registry.names()
    assert old in registry
    with pytest.warns(DeprecationWarning, match=repr(new)):
        assert registry.describe(old)["name"] == new


def test_alias_runs_the_new_metric():
    m = {"w": torch.tensor([True, False])}
    ctx = MetricContext(masks=[m, m])
    with pytest.warns(DeprecationWarning):
        r = registry.compute_with_context("fisher_overlap", ctx)
    assert r.total.jaccard == 1.0
