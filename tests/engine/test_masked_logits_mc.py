"""labels='mc' with -inf logits (action masking, banned tokens): the softmax is defined
wherever a row holds a finite logit, so the draws are taken (they were refused by a
finiteness check) and never land on a masked class; the MC Fisher converges to the exact
one, computed by a float64 loop over the classes of positive probability.

Also: Bernoulli draws come from float64 uniforms (float32 ones are multiples of 2⁻²⁴).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from tests.reference import assert_close_dict

N, D, C = 5, 3, 4
MASK = torch.tensor([False, False, True, False])


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(D, C)

    def forward(self, x):
        return self.l(x).masked_fill(MASK, float("-inf"))


def _exact(model, x):
    """(1/N) Σ_n Σ_{c: p_c > 0} p_c (∇θ log p_c)², float64 loop."""
    named = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in named.items()}
    for i in range(len(x)):
        with torch.no_grad():
            p = model(x[i : i + 1]).softmax(-1)[0]
        for c in range(C):
            if p[c] == 0:
                continue
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i : i + 1]), torch.tensor([c])).backward()
            for k, q in named.items():
                acc[k] += p[c] * q.grad**2
    return {k: v / len(x) for k, v in acc.items()}


@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_mc_with_masked_classes_converges_to_exact(engine):
    torch.manual_seed(0)
    model = Masked().double()
    x = torch.randn(N, D, dtype=torch.float64)
    ref = _exact(model, x)
    got = natgrad.estimate_fisher(model, x, labels="mc", mc_samples=800, engine=engine,
                                  generator=torch.Generator().manual_seed(0))
    exact = natgrad.estimate_fisher(model, x, labels="exact", engine=engine)
    assert_close_dict(dict(exact), ref, rtol=1e-10, atol=1e-14)
    # the MC error of 800 draws per sample is about 1/sqrt(800) ≈ 3.5% of each entry
    assert_close_dict(dict(got), ref, rtol=0.2, atol=1e-3)
    assert torch.equal(got["l.weight"][2], torch.zeros(D, dtype=torch.float64))


def test_masked_classes_are_never_drawn():
    logits = torch.randn(50, C, dtype=torch.float64).masked_fill(MASK, float("-inf"))
    draws = natgrad.Categorical().sample(logits, torch.Generator().manual_seed(0), 200)
    assert not bool((draws == 2).any())
    tok = natgrad.TokenCategorical().sample(logits.view(5, 10, C), torch.Generator().manual_seed(0), 50)
    assert not bool((tok == 2).any())


def test_token_mc_with_banned_tokens_converges_to_exact():
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 3)
            self.head = nn.Linear(3, C)

        def forward(self, input_ids):
            return self.head(torch.tanh(self.emb(input_ids))).masked_fill(MASK, float("-inf"))

    model = Tagger().double()
    ids = torch.randint(0, 6, (3, 4))
    exact = natgrad.estimate_fisher(model, ids, "token_categorical", labels="exact")
    got = natgrad.estimate_fisher(model, ids, "token_categorical", labels="mc", mc_samples=800)
    named = dict(model.named_parameters())
    ref = {k: torch.zeros_like(p) for k, p in named.items()}
    for i in range(3):  # Σ_t Σ_c p_tc (∇ log p_tc)², positions conditionally independent
        with torch.no_grad():
            p = model(ids[i : i + 1])[0].softmax(-1)
        for t in range(4):
            for c in range(C):
                if p[t, c] == 0:
                    continue
                model.zero_grad(set_to_none=True)
                (-model(ids[i : i + 1])[0, t].log_softmax(-1)[c]).backward()
                for k, q in named.items():
                    ref[k] += p[t, c] * q.grad**2
    ref = {k: v / 3 for k, v in ref.items()}
    assert_close_dict(dict(exact), ref, rtol=1e-10, atol=1e-14)
    assert_close_dict(dict(got), ref, rtol=0.2, atol=1e-3)


def test_bernoulli_draws_use_float64_uniforms():
    """P(y = 1) = p for p below float32's 2⁻²⁴ uniform grid: the draws are u < p for
    float64 uniforms u from the generator, in its order."""
    f = torch.tensor([[-30.0, 0.0, 2.0], [-16.0, -17.5, 30.0]], dtype=torch.float64)
    k = 7
    draws = natgrad.Bernoulli().sample(f, torch.Generator().manual_seed(3), k)
    u = torch.rand((k, *f.shape), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(draws, (u < f.sigmoid()).float())
