"""``prune_structured`` keeps the original module of an attention block that loses no head
(``nn.MultiheadAttention``, Hugging Face ``Conv1D``) instead of natgrad's converted form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.pruning.attention import HeadAttention, from_multihead, shrink_heads, to_multihead
from natgrad.pruning.pruned import deepcopy_model
from natgrad.pruning.structured import convert_attention
from tests.conftest import TinyEncoder
from tests.pruning.test_structured import _batch, _caller, masked_output


def _encoder():
    torch.manual_seed(3)
    model = TinyEncoder().double().eval()  # nn.MultiheadAttention, as users have it
    ids, y = torch.randint(0, 13, (5, 6)), torch.randint(0, 3, (5,))
    return model, {"input_ids": ids}, y


def _masked_reference(model, x, y, removed):
    """The masked-original reference of the end-to-end tests, on a converted copy."""
    ref = deepcopy_model(model)
    convert_attention(ref)
    return masked_output(ref, _batch(x, y), removed, x)


def _same_module(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(x, x, x)[0], b(x, x, x)[0])


@pytest.mark.parametrize("flops", [0.6, 0.8])
def test_attention_that_keeps_every_head_keeps_its_module(flops):
    model, x, y = _encoder()
    small, rep = natgrad.prune_structured(model, _batch(x, y), flops=flops, tune=False,
                                          measure=False)
    h = torch.randn(5, 6, 8, dtype=torch.float64)
    kept_all = [i for i in range(2) if rep.kept[f"enc.layers.{i}.self_attn"] == (2, 2)]
    assert kept_all  # the budget leaves some layer's heads alone
    assert any(k < n for k, n in rep.kept.values())  # and prunes something
    for i in range(2):
        att = small.enc.layers[i].self_attn
        if i in kept_all:
            _same_module(att, model.enc.layers[i].self_attn, h)  # type, weights, output
        else:
            assert isinstance(att, HeadAttention) and att.num_heads < 2
    if flops == 0.6:
        assert len(kept_all) == 1  # one layer's heads pruned, the other's not
    # the pruned model is still the masked original
    want = _masked_reference(model, x, y, rep.removed)
    torch.testing.assert_close(_caller(x)(small), want, rtol=1e-10, atol=1e-12)


def test_downstream_refit_attention_is_a_multihead_attention_with_the_refit_weights():
    model, x, y = _encoder()
    small, rep = natgrad.prune_structured(model, _batch(x, y), flops=0.6, tune=True,
                                          tune_scope="downstream", measure=False)
    (i,) = [i for i in range(2) if rep.kept[f"enc.layers.{i}.self_attn"] == (2, 2)]
    assert isinstance(small.enc.layers[i].self_attn, nn.MultiheadAttention)
    # the same function as the converted, re-fitted module it came from
    back = from_multihead(small.enc.layers[i].self_attn)
    h = torch.randn(5, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(h, h, h)[0], small.enc.layers[i].self_attn(h, h, h)[0],
                                   rtol=1e-12, atol=1e-13)


def test_to_multihead_inverts_from_multihead_exactly():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
        mha.in_proj_weight.requires_grad_(False)
        back = to_multihead(from_multihead(mha), mha)
        assert back is not None and back is not mha
        _same_module(back, mha, torch.randn(3, 4, 8, dtype=torch.float64))
        assert not back.in_proj_weight.requires_grad and back.out_proj.weight.requires_grad
        assert to_multihead(shrink_heads(from_multihead(mha), torch.tensor([1])), mha) is None



def _tiny_gpt2():
    """A float64 GPT-2 classifier from a tiny config (no download) and a batch of it."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(6)
    cfg = GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=4, n_positions=16,
                     num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                     use_cache=False)
    model = GPT2ForSequenceClassification(cfg).double().eval()
    return model, {"input_ids": torch.randint(1, 30, (6, 7))}, torch.randint(0, 3, (6,))

def test_gpt2_conv1d_modules_keep_their_type():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model, x, y = _tiny_gpt2()
    small, rep = natgrad.prune_structured(model, _batch(x, y), flops=0.6, tune=False,
                                          measure=False)
    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert names and all(isinstance(small.get_submodule(n), Conv1D) for n in names)
    assert not any(isinstance(m, nn.Linear) for n, m in small.named_modules() if n != "score")
    torch.testing.assert_close(_caller(x)(small), _masked_reference(model, x, y, rep.removed),
                               rtol=1e-10, atol=1e-12)
    torch.export.export(small, (), x)  # still exportable


class _PaddedEncoder(nn.Module):
    """The default ``nn.TransformerEncoder`` (``enable_nested_tensor=True``) with a padding
    mask: in eval mode its fast path hands the layers nested tensors."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.emb = nn.Embedding(13, d)
        layer = nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


@pytest.mark.parametrize("how", ["exclude", "budget"])
def test_nested_tensor_encoder_whose_attention_keeps_every_head(how):
    torch.manual_seed(0)
    ids = torch.randint(0, 13, (12, 7))
    am = torch.ones(12, 7, dtype=torch.long)
    am[:4, 5:] = 0
    y = torch.randint(0, 3, (12,))
    torch.manual_seed(1)
    model = _PaddedEncoder().eval()
    kw = ({"flops": 0.7, "exclude": ("enc.layers.0.self_attn", "enc.layers.1.self_attn")}
          if how == "exclude" else {"flops": 0.97})
    small, rep = natgrad.prune_structured(
        model, {"input_ids": ids, "attention_mask": am, "labels": y}, tune=False,
        measure=False, **kw)
    assert all(isinstance(small.enc.layers[i].self_attn, nn.MultiheadAttention)
               for i in range(2))
    assert small.enc.use_nested_tensor  # given back, and the count left it so
    # FLOPs of one (padded, dense) sample by hand: T = 7 tokens, width 16
    t, d = 7, 16
    want = 2.0 * d * 3  # head, on the pooled vector
    for i in range(2):
        k = rep.kept.get(f"enc.layers.{i}.linear1", (32, 32))[0]
        want += 2 * (2.0 * d * k * t)  # linear1, linear2
        want += 2.0 * 4 * t * d * d + 4.0 * t * t * d  # q, k, v, out projections, QKᵀ and AV
    assert rep.flops_after == want
    assert any(k < n for k, n in rep.kept.values())


def _spy_restore(monkeypatch, x, names):
    """Record, just before restore_converted, the pruned model's output and each named
    converted module's weight and bias: what the search built and re-fitted."""
    import natgrad.pruning.structured as S

    seen: dict = {}
    real = S.restore_converted

    def spy(pruned, model, converted):
        with torch.no_grad():
            seen["out"] = _caller(x)(pruned).clone()
        for n in names:
            mod = pruned.get_submodule(n)
            seen[n] = {k: v.detach().clone() for k, v in mod.state_dict().items()}
        return real(pruned, model, converted)

    monkeypatch.setattr(S, "restore_converted", spy)
    return seen


@pytest.mark.parametrize("grad_forward", [False, True])
def test_torch_pruned_gpt2_conv1d_is_restored_with_the_refit_weights(monkeypatch, grad_forward):
    """A Conv1D pruned by torch.nn.utils.prune whose shape structured pruning keeps: the
    restored Conv1D computes with the re-fitted weights (the original's pre-hook would put
    weight_orig * mask back), and a computed weight that is a non-leaf (a forward in grad
    mode) does not stop the copy."""
    pytest.importorskip("transformers")
    from torch.nn.utils import prune
    from transformers.pytorch_utils import Conv1D

    model, x, y = _tiny_gpt2()
    names = ["transformer.h.1.attn.c_proj", "transformer.h.1.attn.c_attn"]
    for n in names:
        prune.random_unstructured(model.get_submodule(n), "weight", 0.5)
    with torch.set_grad_enabled(grad_forward):
        model(**x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = _spy_restore(monkeypatch, x, names)
    small, rep = natgrad.prune_structured(
        model, _batch(x, y), flops=0.85, tune=True, tune_scope="downstream", measure=False,
        min_keep=4)  # every head kept (4 per layer): the attention keeps its shape
    assert any(k < n for k, n in rep.kept.values())
    assert all(rep.kept[f"transformer.h.{i}.attn"] == (4, 4) for i in range(2))
    assert "transformer.h.1.attn.c_proj" in rep.tuned_layers
    for n in names:
        s = small.get_submodule(n)
        assert isinstance(s, Conv1D) and not hasattr(s, "weight_orig")
        assert torch.equal(s.weight, seen[n]["weight"].T) and torch.equal(s.bias, seen[n]["bias"])
    with torch.no_grad():
        out = _caller(x)(small)
        torch.testing.assert_close(out, seen["out"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(_caller(x)(small), out, rtol=0, atol=0)  # no pre-hook
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("what", ["out_proj", "in_proj_weight"])
def test_torch_pruned_multihead_attention_is_restored_as_the_search_built_it(monkeypatch, what):
    from torch.nn.utils import prune

    model, x, y = _encoder()
    for i in range(2):
        a = model.enc.layers[i].self_attn
        if what == "out_proj":
            prune.l1_unstructured(a.out_proj, "weight", 0.5)
        else:
            prune.l1_unstructured(a, "in_proj_weight", 0.5)
    _caller(x)(model)  # grad mode: the computed weights are non-leaves
    names = [f"enc.layers.{i}.self_attn" for i in range(2)]
    seen = _spy_restore(monkeypatch, x, names)
    small, rep = natgrad.prune_structured(model, _batch(x, y), flops=0.8, tune=True,
                                          tune_scope="downstream", measure=False,
                                          exclude=tuple(names))
    assert any(k < n for k, n in rep.kept.values())
    for n in names:
        s, conv = small.get_submodule(n), seen[n]
        assert isinstance(s, nn.MultiheadAttention) and not prune.is_pruned(s)
        w = torch.cat([conv[f"{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(s.in_proj_weight, w)
        assert torch.equal(s.out_proj.weight, conv["out_proj.weight"])
    with torch.no_grad():
        torch.testing.assert_close(_caller(x)(small), seen["out"], rtol=1e-12, atol=1e-14)
