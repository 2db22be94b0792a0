"""estimate_fisher: the diagonal Fisher against brute-force loops, closed forms and
BackPACK, for every label source; batches, chunks, dtypes and errors."""

import copy

import pytest
import torch
from torch import nn

from natgrad import Gaussian, estimate_fisher
from tests.conftest import mlp
from tests.reference import assert_close_dict, ce_sum, exact_categorical_fisher_loop, loop_grads


def test_empirical_is_mean_of_squared_loop_grads(mlp_case):
    model, x, y = mlp_case
    F = estimate_fisher(model, (x, y))
    ref = {k: (g**2).mean(0) for k, g in loop_grads(model, ce_sum, x, y).items()}
    assert F.n_samples == len(x) and F.labels == "empirical" and F.likelihood == "categorical"
    assert_close_dict(dict(F), ref)


def test_not_the_squared_batch_gradient(mlp_case):
    model, x, y = mlp_case
    F = estimate_fisher(model, (x, y))
    g = loop_grads(model, ce_sum, x, y)
    crude = {k: v.mean(0) ** 2 for k, v in g.items()}
    assert not torch.allclose(F["0.weight"], crude["0.weight"].to(F["0.weight"].dtype))


def test_exact_logistic_regression_closed_form():
    torch.manual_seed(0)
    x = torch.randn(50, 4, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    F = estimate_fisher(model, x, "bernoulli", labels="exact")
    p = torch.sigmoid(model(x)).detach()  # (N, 1)
    w = p * (1 - p)
    torch.testing.assert_close(  # a float64 model: float64 sums and result
        F["weight"], (w * x**2).mean(0, keepdim=True), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(F["bias"], w.mean(0), rtol=1e-12, atol=0)


def test_exact_softmax_regression_closed_form():
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    model = nn.Linear(3, 5).double()
    F = estimate_fisher(model, x, labels="exact", chunk_size=7)
    p = model(x).softmax(-1).detach()
    h = p * (1 - p)  # (N, C)
    torch.testing.assert_close(
        F["weight"], torch.einsum("nc,nj->cj", h, x**2).div(40), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(F["bias"], h.mean(0), rtol=1e-12, atol=0)


def test_exact_matches_class_loop_on_mlp(mlp_case):
    model, x, _ = mlp_case
    F = estimate_fisher(model, x, labels="exact")
    assert_close_dict(dict(F), exact_categorical_fisher_loop(model, x))


def test_exact_gaussian_is_sum_of_squared_jacobian(mlp_case):
    model, x, _ = mlp_case
    sigma = 0.5
    F = estimate_fisher(model, x, Gaussian(sigma), labels="exact")
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x)):
        for d in range(4):
            g = loop_grads(model, lambda o, _, d=d: o[0, d], x[i : i + 1], None)
            for k in ref:
                ref[k] += g[k][0] ** 2 / sigma**2
    assert_close_dict(dict(F), {k: v / len(x) for k, v in ref.items()})


@pytest.mark.parametrize("lik", ["categorical", "bernoulli", "gaussian"])
def test_mc_converges_to_exact(lik):
    torch.manual_seed(0)
    model = mlp((3, 6, 2)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    exact = estimate_fisher(model, x, lik, labels="exact")

    def err(k, seed):
        mc = estimate_fisher(
            model, x, lik, labels="mc", mc_samples=k, generator=torch.Generator().manual_seed(seed)
        )
        num = sum(((mc[n] - exact[n]) ** 2).sum() for n in exact)
        return float(num.sqrt() / sum((exact[n] ** 2).sum() for n in exact).sqrt())

    small = sum(err(2, s) for s in range(3)) / 3
    large = err(2000, 0)
    assert large < 0.05, large
    assert large < small / 5, (small, large)


def test_multiple_batches_equal_one_batch(mlp_case):
    model, x, y = mlp_case
    whole = estimate_fisher(model, (x, y))
    parts = estimate_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    dl = estimate_fisher(model, loader, progress=False)
    assert parts.n_samples == dl.n_samples == len(x)
    assert_close_dict(dict(parts), dict(whole), rtol=1e-6)
    assert_close_dict(dict(dl), dict(whole), rtol=1e-6)
    capped = estimate_fisher(model, loader, max_batches=2)
    assert capped.n_samples == 4


def test_chunked_equals_unchunked_fisher(cnn_case):
    model, x, y = cnn_case
    # engine="vmap": the capture path ignores chunk_size, so "auto" alone would not chunk.
    a = estimate_fisher(model, (x, y), chunk_size=1, engine="vmap")
    b = estimate_fisher(model, (x, y))
    assert_close_dict(dict(a), dict(b), rtol=1e-6)
    c = estimate_fisher(model, (x, y), chunk_size=4, engine="vmap")
    ref = {k: (g**2).mean(0) for k, g in loop_grads(model, ce_sum, x, y).items()}
    assert_close_dict(dict(c), ref)
    assert_close_dict(dict(a), ref)


def test_float32_accumulation_for_bfloat16_model(mlp_case):
    model, x, y = mlp_case
    F = estimate_fisher(model.to(torch.bfloat16), (x.bfloat16(), y))
    assert all(v.dtype == torch.float32 for v in F.values())
    ref = {
        k: (g.float() ** 2).mean(0)
        for k, g in loop_grads(model.float(), ce_sum, x.bfloat16().float(), y).items()
    }
    assert_close_dict(dict(F), ref, rtol=0.1, atol=1e-3)


def test_nan_gradients_raise(mlp_case):
    model, x, y = mlp_case
    x = x.clone()
    x[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf.*per-sample gradients of '0.weight'"):
        estimate_fisher(model, (x, y))


def test_empty_data_raises(mlp_case):
    model, _, _ = mlp_case
    with pytest.raises(ValueError, match="No samples"):
        estimate_fisher(model, [])


def test_backpack_diag_ggn_exact_is_the_exact_label_fisher():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    ours = estimate_fisher(model, (x, y), labels="exact")
    bp_model = backpack.extend(copy.deepcopy(model))
    loss = backpack.extend(nn.CrossEntropyLoss(reduction="mean"))(bp_model(x), y)
    with backpack.backpack(DiagGGNExact()):
        loss.backward()
    for name, p in bp_model.named_parameters():
        torch.testing.assert_close(ours[name], p.diag_ggn_exact, rtol=1e-10, atol=1e-14)


def test_backpack_sum_grad_squared_oracle():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import SumGradSquared

    torch.manual_seed(0)
    for model, x in [
        (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(16, 6)),
        (
            nn.Sequential(
                nn.Conv2d(1, 3, 3),
                nn.ReLU(),
                nn.Conv2d(3, 2, 3, stride=2),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(8, 3),
            ),
            torch.randn(12, 1, 8, 8),
        ),
    ]:
        y = torch.randint(0, 3, (len(x),))
        ours = estimate_fisher(model, (x, y))
        bp_model = backpack.extend(model)
        loss = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))(bp_model(x), y)
        with backpack.backpack(SumGradSquared()):
            loss.backward()
        for name, p in bp_model.named_parameters():
            torch.testing.assert_close(
                ours[name], p.sum_grad_squared / len(x), rtol=1e-5, atol=1e-8
            )
        bp_model.zero_grad()


# ---- container ---------------------------------------------------------------------


class _KwargsModel(nn.Module):
    """A model called with keyword inputs, as a Hugging Face model is."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def test_dict_inputs_with_separate_labels():
    """``(inputs_dict, y)`` batches, as a DataLoader over ``(dict, label)`` pairs collates
    them (before: read as two batches, or "no input tensor with a batch dimension")."""
    from natgrad import per_sample_grads
    from tests.reference import loop_grads_by

    torch.manual_seed(0)
    model = _KwargsModel().double()
    ids, y = torch.randint(0, 9, (5, 4)), torch.randint(0, 3, (5,))
    mask = torch.ones(5, 4)
    mask[1, 2:] = 0
    mask = mask.double()

    def loss(i):
        out = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        return ce_sum(out, y[i : i + 1])

    g = loop_grads_by(model, loss, 5)
    ref = {k: v.pow(2).mean(0) for k, v in g.items()}
    inputs = {"input_ids": ids, "attention_mask": mask}
    assert_close_dict(dict(estimate_fisher(model, (inputs, y))), ref)
    pairs = [({"input_ids": ids[i], "attention_mask": mask[i]}, y[i]) for i in range(5)]
    loader = torch.utils.data.DataLoader(pairs, batch_size=2)  # batches [dict, y], last of 1
    F = estimate_fisher(model, loader)
    assert F.n_samples == 5
    assert_close_dict(dict(F), ref)
    assert_close_dict(per_sample_grads(model, (inputs, y)), g)
