"""Which mask leaves label positions out: encoder-decoder batches and 4-D key masks.

An encoder-decoder batch's ``attention_mask`` is the encoder's; the labels are the
decoder's, padded by ``decoder_attention_mask`` (or only by their -100 entries). A
Hugging Face encoder's ``(N, 1, 1, T)`` boolean key mask marks the same positions as the
``(N, T)`` mask. References: one float64 backward per sample (and per class for the exact
Fisher), with the padding left out by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.engine.per_sample import mean_loss_grad
from tests.reference import assert_close_dict, fisher_from_grads, loop_grads_by

N, V, H = 3, 5, 4


class Seq2Seq(nn.Module):
    """A toy encoder-decoder: the encoder's masked mean conditions every decoder position."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Embedding(V, H)
        self.dec = nn.Embedding(V, H)
        self.head = nn.Linear(H, V)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None):
        m = attention_mask.unsqueeze(-1).to(self.head.weight.dtype)
        ctx = (self.enc(input_ids) * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        return {"logits": self.head(torch.tanh(self.dec(decoder_input_ids) + ctx))}


def _batch(t_enc: int, t_dec: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, V, (N, t_enc), generator=g)
    amask = torch.ones(N, t_enc, dtype=torch.long)
    amask[0, 2:] = 0
    dec_in = torch.randint(1, V, (N, t_dec), generator=g)
    labels = torch.randint(0, V, (N, t_dec), generator=g)
    return src, amask, dec_in, labels


def _reference(model, src, amask, dec_in, labels, dmask=None, exact=False):
    """Brute force: the decoder positions kept by ``dmask`` (all when None), float64."""
    keep = torch.ones_like(labels, dtype=torch.bool) if dmask is None else dmask != 0
    keep = keep & (labels != -100)

    def logits(i):
        return model(src[i : i + 1], amask[i : i + 1], dec_in[i : i + 1])["logits"][0]

    if not exact:
        def loss(i):
            k = keep[i]
            return F.cross_entropy(logits(i)[k], labels[i][k], reduction="sum")

        return fisher_from_grads(loop_grads_by(model, loss, N))
    named = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in named.items()}
    for i in range(N):
        with torch.no_grad():
            p = logits(i).softmax(-1)
        for t in range(labels.shape[1]):
            if not keep[i, t]:
                continue
            for c in range(V):
                model.zero_grad(set_to_none=True)
                logits(i).log_softmax(-1)[t, c].backward()
                for k, q in named.items():
                    if q.grad is not None:
                        acc[k] += p[t, c] * q.grad**2
    return {k: v / N for k, v in acc.items()}


@pytest.mark.parametrize("t_dec", [4, 3])
@pytest.mark.parametrize("engine", ["auto", "vmap"])
@pytest.mark.parametrize("labels", ["empirical", "exact"])
def test_decoder_labels_ignore_the_encoder_mask(t_dec, engine, labels):
    torch.manual_seed(0)
    model = Seq2Seq().double()
    src, amask, dec_in, y = _batch(4, t_dec)
    batch = {"input_ids": src, "attention_mask": amask, "decoder_input_ids": dec_in, "labels": y}
    if labels == "exact":
        batch.pop("labels")
    got = natgrad.estimate_fisher(model, batch, "token_categorical", labels=labels, engine=engine)
    ref = _reference(model, src, amask, dec_in, y, exact=labels == "exact")
    assert_close_dict(dict(got), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("labels", ["empirical", "exact"])
def test_decoder_attention_mask_pads_the_labels(labels):
    torch.manual_seed(0)
    model = Seq2Seq().double()
    src, amask, dec_in, y = _batch(4, 3)
    dmask = torch.ones(N, 3, dtype=torch.long)
    dmask[1, 1:] = 0
    batch = {"input_ids": src, "attention_mask": amask, "decoder_input_ids": dec_in,
             "decoder_attention_mask": dmask, "labels": y}
    if labels == "exact":
        batch.pop("labels")
    got = natgrad.estimate_fisher(model, batch, "token_categorical", labels=labels)
    ref = _reference(model, src, amask, dec_in, y, dmask, exact=labels == "exact")
    assert_close_dict(dict(got), ref, rtol=1e-10, atol=1e-12)


def test_mean_loss_grad_reads_the_decoder_mask():
    """EWC / damage / natural-gradient norms take the loss gradient through mean_loss_grad."""
    torch.manual_seed(0)
    model = Seq2Seq().double()
    src, amask, dec_in, y = _batch(4, 3)
    dmask = torch.ones(N, 3, dtype=torch.long)
    dmask[0, 2:] = 0
    batch = {"input_ids": src, "attention_mask": amask, "decoder_input_ids": dec_in,
             "decoder_attention_mask": dmask, "labels": y}
    names = [k for k, _ in model.named_parameters()]
    got, n = mean_loss_grad(model, batch, "token_categorical", names)
    keep = dmask != 0
    out = model(src, amask, dec_in)["logits"]
    loss = F.cross_entropy(out[keep], y[keep], reduction="sum") / N
    ref = dict(zip(names, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    assert n == N
    assert_close_dict(got, ref, rtol=1e-12, atol=1e-14)


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.head = nn.Linear(H, V)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(torch.tanh(self.emb(input_ids)))}


@pytest.mark.parametrize("labels", ["empirical", "exact", "mc"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.long])
def test_4d_key_mask_is_the_2d_mask(labels, dtype):
    """README: a bidirectional encoder may take ``mask[:, None, None, :].bool()``; the
    positions it keeps are the 2-D mask's."""
    torch.manual_seed(0)
    model = Tagger().double()
    ids = torch.randint(0, V, (N, 4))
    y = torch.randint(0, V, (N, 4))
    mask = torch.ones(N, 4, dtype=torch.long)
    mask[0, 2:] = 0
    mask[2, 3:] = 0

    def run(m):
        b = {"input_ids": ids, "attention_mask": m, "labels": y}
        if labels != "empirical":
            b.pop("labels")
        gen = torch.Generator().manual_seed(3)
        return natgrad.estimate_fisher(model, b, "token_categorical", labels=labels, generator=gen)

    got = run(mask[:, None, None, :].to(dtype))
    if labels == "empirical":
        def loss(i):
            k = mask[i] != 0
            out = model(ids[i : i + 1])["logits"][0]
            return F.cross_entropy(out[k], y[i][k], reduction="sum")

        ref = fisher_from_grads(loop_grads_by(model, loss, N))
    else:  # the same draws as the 2-D mask's, itself checked against loops elsewhere
        ref = dict(run(mask))
    assert_close_dict(dict(got), ref, rtol=1e-10, atol=1e-12)


def test_preconditioner_batch_source_reads_the_decoder_mask():
    """FisherPreconditioner(source="batch") estimates on the batch it is given: its diagonal
    is the decoder-masked Fisher."""
    torch.manual_seed(0)
    model = Seq2Seq().double()
    src, amask, dec_in, y = _batch(4, 3)
    dmask = torch.ones(N, 3, dtype=torch.long)
    dmask[1, 1:] = 0
    batch = {"input_ids": src, "attention_mask": amask, "decoder_input_ids": dec_in,
             "decoder_attention_mask": dmask, "labels": y}
    model(src, amask, dec_in)["logits"].sum().backward()  # any .grad to precondition
    pre = natgrad.FisherPreconditioner(model, "token_categorical", kind="diag", damping=1e-3,
                                       kl_clip=None)
    pre.step(batch)
    got = {k: v for k, v in pre.curvature.items()}
    assert_close_dict(got, _reference(model, src, amask, dec_in, y, dmask), rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:optimize_prior_precision chose")
def test_prior_precision_grid_reads_the_decoder_mask():
    """The validation NLL of an encoder-decoder batch leaves out the positions its
    decoder_attention_mask marks 0, as the same labels set to -100 do."""
    torch.manual_seed(0)
    model = Seq2Seq().double()
    src, amask, dec_in, y = _batch(4, 3)
    dmask = torch.ones(N, 3, dtype=torch.long)
    dmask[0, 1:] = 0
    base = {"input_ids": src, "attention_mask": amask, "decoder_input_ids": dec_in}
    fisher = natgrad.estimate_fisher(model, {**base, "labels": y}, "token_categorical")
    grid = [0.1, 1.0, 10.0]
    a = natgrad.optimize_prior_precision(
        model, fisher, {**base, "decoder_attention_mask": dmask, "labels": y}, grid=grid)
    b = natgrad.optimize_prior_precision(
        model, fisher, {**base, "labels": y.masked_fill(dmask == 0, -100)}, grid=grid)
    assert a.scores == pytest.approx(b.scores, rel=1e-12)


def test_inputs_mask_is_not_kept_for_an_encoder_decoder_batch():
    # pruning's re-fit dropped rows of every layer by Batch.mask, the encoder's padding:
    # a decoder layer of equal length lost the rows of the encoder's pads (review)
    from natgrad.engine.batch import parse_batch

    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 0, 0]])
    enc = parse_batch({"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert torch.equal(enc.mask, mask)
    s2s = parse_batch({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids,
                       "labels": ids})
    assert s2s.mask is None
