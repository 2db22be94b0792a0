import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from natgrad import EWC, estimate_fisher
from tests.conftest import mlp


def _rand_fisher(model, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(p.shape, generator=g, dtype=dtype) for k, p in model.named_parameters()}


def _perturb(model, scale=0.3, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _snapshot(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _hand_penalty(model, terms, lam):
    """(lam/2) sum_t sum_i F_t,i (theta_i - anchor_t,i)^2 by an explicit loop over entries."""
    named = dict(model.named_parameters())
    total = 0.0
    for fisher, anchor in terms:
        for k, f in fisher.items():
            th, a = named[k].detach().reshape(-1), anchor[k].reshape(-1)
            for i in range(f.numel()):
                total += float(f.reshape(-1)[i]) * float(th[i] - a[i]) ** 2
    return 0.5 * lam * total


def test_penalty_equals_hand_sum_and_gradient(mlp_case):
    model, _, _ = mlp_case
    F = _rand_fisher(model)
    anchor = _snapshot(model)
    ewc = EWC(model, F, lam=3.0)
    assert ewc.penalty(model).item() == 0.0
    _perturb(model)
    pen = ewc.penalty(model)
    assert pen.dtype == torch.float64
    assert pen.item() == pytest.approx(_hand_penalty(model, [(F, anchor)], 3.0), rel=1e-12)
    names = list(dict(model.named_parameters()))
    grads = torch.autograd.grad(pen, list(model.parameters()))
    for k, g, p in zip(names, grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, 3.0 * F[k] * (p.detach() - anchor[k]))
    assert ewc(model).item() == pytest.approx(pen.item())  # callable form


def test_separate_mode_sums_tasks(mlp_case):
    model, _, _ = mlp_case
    F1, a1 = _rand_fisher(model, 1), _snapshot(model)
    ewc = EWC(model, F1, lam=0.5)
    _perturb(model, seed=5)
    F2, a2 = _rand_fisher(model, 2), _snapshot(model)
    ewc.consolidate(F2)
    _perturb(model, seed=6)
    assert ewc.num_tasks == 2
    expected = _hand_penalty(model, [(F1, a1), (F2, a2)], 0.5)
    assert float(ewc.penalty()) == pytest.approx(expected, rel=1e-12)


def test_online_consolidation_follows_formula(mlp_case):
    model, _, _ = mlp_case
    gamma = 0.7
    F1 = _rand_fisher(model, 1)
    ewc = EWC(model, F1, lam=2.0, mode="online", gamma=gamma)
    _perturb(model, seed=5)
    F2, a2 = _rand_fisher(model, 2), _snapshot(model)
    ewc.consolidate(F2)
    _perturb(model, seed=6)
    merged = {k: gamma * F1[k] + F2[k] for k in F1}
    expected = _hand_penalty(model, [(merged, a2)], 2.0)  # newest anchor only
    assert float(ewc.penalty()) == pytest.approx(expected, rel=1e-12)
    state = ewc.state_dict()
    assert len(state["terms"]) == 1 and state["num_tasks"] == 2
    for k in F1:
        torch.testing.assert_close(state["terms"][0]["fisher"][k], merged[k])
        torch.testing.assert_close(state["terms"][0]["anchor"][k], a2[k])


def test_online_names_only_in_old_fisher_decay(mlp_case):
    model, _, _ = mlp_case
    F1 = _rand_fisher(model, 1)
    ewc = EWC(model, F1, mode="online", gamma=0.5)
    _perturb(model, seed=3)
    now = _snapshot(model)
    ewc.consolidate({"0.weight": torch.ones_like(F1["0.weight"])})
    term = ewc.state_dict()["terms"][0]
    torch.testing.assert_close(term["fisher"]["2.bias"], 0.5 * F1["2.bias"])
    torch.testing.assert_close(term["fisher"]["0.weight"], 0.5 * F1["0.weight"] + 1)
    torch.testing.assert_close(term["anchor"]["2.bias"], now["2.bias"])  # newest anchor


class Grown(nn.Module):
    """A body with a second head added after the first task."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head1 = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        out = self.head1(h)
        if hasattr(self, "head2"):
            out = torch.cat([out, self.head2(h)], 1)
        return out


def test_new_parameters_and_uncovered_ones_are_ignored():
    torch.manual_seed(0)
    model = Grown().double()
    fisher = {"body.weight": torch.rand(4, 3, dtype=torch.float64)}  # head1 not in the Fisher
    anchor = _snapshot(model)
    ewc = EWC(model, fisher, lam=1.0)
    model.head2 = nn.Linear(4, 3).double()
    _perturb(model)
    pen = ewc.penalty(model)
    assert ewc.names == ["body.weight"]
    assert float(pen) == pytest.approx(_hand_penalty(model, [(fisher, anchor)], 1.0))
    loss = model(torch.randn(2, 3, dtype=torch.float64)).sum() + pen
    loss.backward()
    assert model.head2.weight.grad is not None  # training the new head still works
    g = torch.autograd.grad(ewc.penalty(model), [model.head2.weight], allow_unused=True)[0]
    assert g is None


def test_anchor_is_a_copy_and_inputs_unchanged(mlp_case):
    model, _, _ = mlp_case
    F = _rand_fisher(model)
    F_before = {k: v.clone() for k, v in F.items()}
    before = _snapshot(model)
    ewc = EWC(model, F)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k], rtol=0, atol=0)
        assert ewc.state_dict()["terms"][0]["anchor"][k].data_ptr() != p.data_ptr()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert float(ewc.penalty()) == pytest.approx(0.5 * float(F["0.weight"].sum()))
    for k in F:
        torch.testing.assert_close(F[k], F_before[k], rtol=0, atol=0)


def test_explicit_anchor(mlp_case):
    model, _, _ = mlp_case
    F = _rand_fisher(model)
    anchor = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    ewc = EWC(model, F, lam=1.0, anchor=anchor)
    assert float(ewc.penalty()) == pytest.approx(_hand_penalty(model, [(F, anchor)], 1.0))


def test_state_dict_round_trip(mlp_case):
    model, _, _ = mlp_case
    ewc = EWC(model, _rand_fisher(model, 1), lam=0.3, mode="online", gamma=0.9)
    _perturb(model, seed=3)
    ewc.consolidate(_rand_fisher(model, 2))
    _perturb(model, seed=4)
    state = ewc.state_dict()
    other = EWC(model)
    other.load_state_dict(state)
    assert (other.lam, other.mode, other.gamma, other.num_tasks) == (0.3, "online", 0.9, 2)
    assert other.penalty().item() == ewc.penalty().item()
    s2 = other.state_dict()
    for t1, t2 in zip(state["terms"], s2["terms"], strict=True):
        for part in ("fisher", "anchor"):
            for k in t1[part]:
                torch.testing.assert_close(t1[part][k], t2[part][k], rtol=0, atol=0)
    # the state_dict is a copy: editing it leaves the EWC alone
    state["terms"][0]["fisher"]["0.weight"].zero_()
    assert other.penalty().item() == ewc.penalty().item()


def test_with_estimated_fisher_and_bfloat16():
    torch.manual_seed(0)
    model = mlp((5, 6, 3))
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    F = estimate_fisher(model, (x, y))
    ewc = EWC(model.to(torch.bfloat16), F, lam=1.0)
    with torch.no_grad():
        model[0].weight.add_(0.5)
    pen = ewc.penalty()
    assert pen.dtype == torch.float32
    expected = 0.5 * float(F["0.weight"].sum()) * 0.25
    assert float(pen) == pytest.approx(expected, rel=1e-2)
    pen.backward()
    assert model[0].weight.grad.dtype == torch.bfloat16


def test_pruned_model_works_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    F = _rand_fisher(model)
    ewc = EWC(model, F)
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # weight -> weight_orig
    with torch.no_grad():
        model[0].weight_orig.add_(0.2)
    expected = 0.5 * float(F["0.weight"].sum()) * 0.04
    assert float(ewc.penalty()) == pytest.approx(expected)
    # a Fisher estimated on the pruned model (weight_orig) also works
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    Fp = estimate_fisher(model, (x, y))
    assert "0.weight_orig" in Fp
    ewc2 = EWC(model, Fp)
    with torch.no_grad():
        model[0].weight_orig.add_(0.1)
    assert float(ewc2.penalty()) == pytest.approx(0.5 * float(Fp["0.weight_orig"].sum()) * 0.01)


def test_online_fold_across_a_pruning_rename_is_one_entry():
    """Task 1 consolidated as ``0.weight``, task 2 after torch.nn.utils.prune as
    ``0.weight_orig``: online mode kept two entries (γ F_1 at the old anchor beside F_2
    at the new one); it folds them, ``(γ F_1 + F_2)`` at the newest anchor (closed form
    by an explicit loop)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    F1, F2, gamma, lam = _rand_fisher(model, 1), _rand_fisher(model, 3), 0.7, 2.0
    ewc = EWC(model, lam=lam, mode="online", gamma=gamma)
    ewc.consolidate(F1)
    _perturb(model, seed=4)
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # weight -> weight_orig
    F2 = {("0.weight_orig" if k == "0.weight" else k): v for k, v in F2.items()}
    ewc.consolidate(F2)
    anchor2 = _snapshot(model)
    _perturb(model, seed=5)
    named = dict(model.named_parameters())
    expected = 0.0
    for k, f2 in F2.items():  # every entry of the fold: γ F_1 + F_2 at the newest anchor
        f1 = F1["0.weight" if k == "0.weight_orig" else k]
        expected += 0.5 * lam * float(((gamma * f1 + f2) * (named[k] - anchor2[k]) ** 2).sum())
    assert float(ewc.penalty()) == pytest.approx(expected, rel=1e-12)


def test_errors(mlp_case):
    model, _, _ = mlp_case
    F = _rand_fisher(model)
    with pytest.raises(ValueError, match="Unknown mode 'offline'; expected one of 'separate'"):
        EWC(model, F, mode="offline")
    with pytest.raises(ValueError, match="Invalid lam: -1"):
        EWC(model, F, lam=-1)
    with pytest.raises(ValueError, match=r"Invalid gamma: 1.5; it must lie in \[0, 1\]"):
        EWC(model, F, gamma=1.5)
    with pytest.raises(ValueError, match=r"parameters the model lacks: \['head.weight'\]"):
        EWC(model, {"head.weight": torch.ones(2)})
    with pytest.raises(ValueError, match=r"shapes differ \(the Fisher vs the model\): 0.weight: \(2,\) vs \(7, 5\)"):
        EWC(model, {"0.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="negative values"):
        EWC(model, {"0.bias": -torch.ones(7)})
    with pytest.raises(FloatingPointError, match="Non-finite"):
        EWC(model, {"0.bias": torch.full((7,), float("nan"))})
    with pytest.raises(ValueError, match="anchor was given without a Fisher"):
        EWC(model, anchor={})
    with pytest.raises(ValueError, match="Not an EWC state_dict"):
        EWC(model).load_state_dict({"lam": 1.0})
    with pytest.raises(ValueError, match="only in the EWC state_dict's term 0 Fisher: x"):
        EWC(model).load_state_dict(
            {"terms": [{"fisher": {"x": torch.ones(1)}, "anchor": {"x": torch.ones(1)}}]}
        )
    ewc = EWC(model, F)
    with pytest.raises(ValueError, match="only in EWC's consolidated parameters: 0.bias"):
        ewc.penalty(nn.Linear(2, 2))


def test_empty_penalty_is_zero(mlp_case):
    model, _, _ = mlp_case
    pen = EWC(model).penalty()
    assert pen.item() == 0.0 and pen.dtype == torch.float64
