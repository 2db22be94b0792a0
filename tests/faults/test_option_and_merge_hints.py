"""An option that would be ignored says so, and an error's suggested fix works."""

import re
import warnings

import pytest
import torch

import natgrad


def _mlp(hidden: int = 8, out: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out))


@pytest.mark.parametrize("labels", ["empirical", "exact"])
def test_mc_samples_without_mc_labels_warns_it_is_ignored(labels: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    model = _mlp()
    with pytest.warns(UserWarning, match=rf"mc_samples=4 is used only with labels='mc', but labels='{labels}', so it is ignored"):
        F = natgrad.estimate_fisher(model, (x, y), labels=labels, mc_samples=4)
    ref = natgrad.estimate_fisher(model, (x, y), labels=labels)
    for k in F:
        torch.testing.assert_close(F[k], ref[k])  # ignored, as the warning says
    with pytest.warns(UserWarning, match=r"mc_samples=2 is used only with labels='mc'"):
        natgrad.per_sample_grads(model, (x, y), labels=labels, mc_samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        natgrad.estimate_fisher(model, (x, y), labels=labels, mc_samples=1)  # the default
        natgrad.estimate_fisher(model, (x, y), labels="mc", mc_samples=4)


def test_merge_of_models_sharing_no_parameter_does_not_suggest_params() -> None:
    torch.manual_seed(0)
    m, other = _mlp(), torch.nn.Linear(6, 3)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    fishers = [natgrad.estimate_fisher(m, (x, y)), natgrad.estimate_fisher(other, (x, y))]
    with pytest.raises(ValueError, match=r"share no parameter \(by name and shape\), so params= cannot select any") as info:
        natgrad.fisher_weighted_merge([m, other], fishers)
    assert "params=[k for k" not in str(info.value)


def test_merge_params_hint_selects_the_shared_parameters() -> None:
    torch.manual_seed(0)
    a, b = _mlp(out=3), _mlp(out=5)  # same body, different heads
    x = torch.randn(10, 6)
    fa = natgrad.estimate_fisher(a, x, labels="exact")
    fb = natgrad.estimate_fisher(b, x, labels="exact")
    with pytest.raises(ValueError, match=r"pass params=\[k for k, _ in models\[0\]") as info:
        natgrad.fisher_weighted_merge([a, b], [fa, fb])
    hint = re.search(r"params=(\[k for .*?\}\])", str(info.value))
    assert hint is not None
    params = eval(hint.group(1), {"models": [a, b]})
    assert params == ["0.weight", "0.bias"]
    merged = natgrad.fisher_weighted_merge([a, b], [fa, fb], params=params)
    torch.testing.assert_close(merged[2].weight, a[2].weight)  # models[0]'s head kept


def test_merge_refuses_models_of_different_dtypes() -> None:
    """A float32 and a float64 model were merged silently in models[0]'s precision."""
    torch.manual_seed(0)
    a = _mlp()
    b = _mlp().double()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    fa = natgrad.estimate_fisher(a, (x, y))
    fb = natgrad.estimate_fisher(b, (x.double(), y))
    before = [p.clone() for p in a.parameters()]
    with pytest.raises(ValueError, match=r"different dtypes \(0.weight: torch.float32 vs torch.float64, and 3 more\)"):
        natgrad.fisher_weighted_merge([a, b], [fa, fb])
    with pytest.raises(ValueError, match="convert the models to one dtype first"):
        natgrad.regmean_merge([a, b], [x, x.double()])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before, strict=True))
    merged = natgrad.fisher_weighted_merge([a.double(), b], [fa, fb])  # the fix works
    assert merged[0].weight.dtype == torch.float64
