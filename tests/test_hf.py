"""Hugging Face models end to end: dict batches, ``.logits`` outputs, attention masks.

Tiny BERT and GPT-2 models are built from configs with random weights (no downloads).
Every Fisher is compared with a brute-force loop: one ordinary backward pass per sample
(and per label for ``exact``), the loss written out by hand.
Skipped when ``transformers`` is not installed (``pip install 'natgrad[hf]'``).

transformers >= 5 builds attention masks with data-dependent Python branches
(``padding_mask.all()``), which ``torch.func.vmap`` cannot trace: the engine then falls
back to an exact per-sample loop (tested below). The capture path of ``estimate_fisher``
(``engine="auto"``) runs the ordinary batched forward and covers every parameter of BERT
and GPT-2, so it needs no recipe; for the vmap engine and ``per_sample_grads`` two
recipes avoid the branch and keep the batched path; most tests (and the README) use them:

* bidirectional encoders (BERT): pass the mask already expanded to 4-D,
  ``attention_mask[:, None, None, :].bool()`` (with the default ``sdpa`` attention);
  transformers uses a 4-D mask as it is. The reference loops use the ordinary 2-D mask.
* causal LMs (GPT-2): ``attn_implementation="eager"`` with the ordinary 2-D mask.
"""

import warnings

import pytest
import torch

from natgrad import TokenCategorical, estimate_fisher, per_sample_grads
from tests.reference import assert_close_dict

transformers = pytest.importorskip("transformers")


def _bert(num_labels=3):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=23,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        attn_implementation="sdpa",
    )
    return transformers.BertForSequenceClassification(cfg).double().eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=11,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_inner=12,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _ids(n, t, vocab, lengths):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _mask4d(mask):
    return mask[:, None, None, :].bool()


def _loop_squares(model, n, loss_of_sample):
    """(1/N) Σ_n (∇θ l_n)², one backward per sample; ``loss_of_sample(i)`` builds l_i."""
    named = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in named.items()}
    keys = list(named)
    for i in range(n):
        for weight, loss in loss_of_sample(i):  # the losses of one sample share a graph
            grads = torch.autograd.grad(
                loss, [named[k] for k in keys], retain_graph=True, allow_unused=True
            )
            for k, g in zip(keys, grads, strict=True):
                if g is not None:
                    acc[k] += weight * g**2
    return {k: v / n for k, v in acc.items()}


def test_bert_dict_batch():
    model = _bert()
    ids, mask = _ids(4, 7, 23, [7, 4, 2, 6])
    y = torch.tensor([0, 2, 1, 2])
    batch = {"input_ids": ids, "attention_mask": _mask4d(mask), "labels": y}
    torch.testing.assert_close(  # the 4-D mask is the 2-D mask, expanded
        model(input_ids=ids, attention_mask=mask).logits, model(**batch).logits
    )

    def logits(i):
        return model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]

    ref_emp = _loop_squares(model, 4, lambda i: [(1.0, -logits(i).log_softmax(-1)[y[i]])])
    assert_close_dict(dict(estimate_fisher(model, batch)), ref_emp)


@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_bert_plain_2d_mask(engine):
    # transformers branches on the 2-D mask's values, which vmap cannot trace: the vmap
    # engine warns and computes the per-sample gradients one sample at a time, still
    # exactly. The capture path (auto) covers every parameter of BERT, with no vmap.
    model = _bert()
    ids, mask = _ids(3, 6, 23, [6, 4, 2])
    y = torch.tensor([2, 0, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}

    def logits(i):
        return model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]

    ref = _loop_squares(model, 3, lambda i: [(1.0, -logits(i).log_softmax(-1)[y[i]])])
    if engine == "vmap":
        with pytest.warns(RuntimeWarning, match="Falling back to an exact per-sample loop"):
            F = estimate_fisher(model, batch, engine=engine)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            F = estimate_fisher(model, batch, engine=engine)
    assert_close_dict(dict(F), ref)


def test_bert_exact_labels():
    model = _bert()
    ids, mask = _ids(4, 7, 23, [7, 4, 2, 6])
    batch = {"input_ids": ids, "attention_mask": _mask4d(mask)}

    def logits(i):
        return model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]

    def all_classes(i):
        logp = logits(i).log_softmax(-1)
        return [(logp[c].exp().detach(), -logp[c]) for c in range(3)]

    ref_exact = _loop_squares(model, 4, all_classes)
    assert_close_dict(dict(estimate_fisher(model, batch, labels="exact")), ref_exact)


def test_bert_padding_is_left_out():
    # A sample's gradient does not depend on the tokens behind its padding.
    model = _bert()
    ids, mask = _ids(2, 6, 23, [3, 6])
    other = ids.clone()
    other[0, 3:] = 17  # change only padded positions of sample 0
    y = torch.tensor([1, 0])
    g1 = per_sample_grads(model, {"input_ids": ids, "attention_mask": _mask4d(mask), "labels": y})
    g2 = per_sample_grads(model, {"input_ids": other, "attention_mask": _mask4d(mask), "labels": y})
    assert_close_dict({k: v[0] for k, v in g1.items()}, {k: v[0] for k, v in g2.items()})


def _kept_positions(mask, i):
    # shift=True: logits at t predict token t+1, kept when token t+1 is not padding
    return [t for t in range(mask.shape[1] - 1) if mask[i, t + 1] == 1]


def test_gpt2_token_fisher_shift_with_attention_mask():
    model = _gpt2()
    ids, mask = _ids(3, 6, 11, [6, 3, 5])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    lik = TokenCategorical(shift=True)

    def token_nll(i):
        logp = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]
        logp = logp.log_softmax(-1)
        return [(1.0, -sum(logp[t, ids[i, t + 1]] for t in _kept_positions(mask, i)))]

    ref = _loop_squares(model, 3, token_nll)
    F = estimate_fisher(model, batch, lik)
    assert F.likelihood == "token_categorical"
    assert_close_dict(dict(F), ref)
    # labels=-100 at the padding (the Hugging Face convention) gives the same Fisher
    labels = ids.masked_fill(mask == 0, -100)
    F2 = estimate_fisher(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, lik)
    assert_close_dict(dict(F2), ref)


def test_gpt2_exact_token_fisher():
    model = _gpt2()
    ids, mask = _ids(2, 4, 11, [4, 3])
    lik = TokenCategorical(shift=True)

    def per_token_class(i):
        logp = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]
        logp = logp.log_softmax(-1)
        return [
            (logp[t, c].exp().detach(), -logp[t, c])
            for t in _kept_positions(mask, i)
            for c in range(11)
        ]

    ref = _loop_squares(model, 2, per_token_class)
    F = estimate_fisher(model, {"input_ids": ids, "attention_mask": mask}, lik, labels="exact")
    assert_close_dict(dict(F), ref)


def test_registry_on_a_hf_model():
    from natgrad.metrics import MetricContext, registry

    model = _bert()
    ids, mask = _ids(6, 5, 23, [5, 3, 4, 5, 2, 5])
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    a = {"input_ids": ids[:3], "attention_mask": _mask4d(mask[:3]), "labels": y[:3]}
    b = {"input_ids": ids[3:], "attention_mask": _mask4d(mask[3:]), "labels": y[3:]}
    ctx = MetricContext(
        models=[model],
        batches=[a, b],
        tasks=["a", "b"],
        options={"top_fisher_directions": {"k": 2}},  # 3 samples: rank <= 3
    )
    out = registry.compute_all(ctx)
    assert out.failed == {}
    assert {"fisher_information", "fisher_weighted_damage", "compare_task_fisher"} <= set(
        out.results
    )
    ref = _loop_squares(
        model,
        3,
        lambda i: [
            (
                1.0,
                -model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
                .logits[0]
                .log_softmax(-1)[y[i]],
            )
        ],
    )
    assert_close_dict(dict(ctx.get_fisher(0)), ref)


def test_gpt2_labels_equal_to_input_ids_without_shift_warn():
    """A causal LM's labels are its input ids (Hugging Face shifts inside its loss).
    Without ``shift=True`` each position is scored against the token it reads: the Fisher
    differs from the next-token Fisher (the loop below) by O(1), so natgrad warns."""
    model = _gpt2()
    ids, mask = _ids(3, 6, 11, [6, 3, 5])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def token_nll(i):
        logp = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]
        logp = logp.log_softmax(-1)
        return [(1.0, -sum(logp[t, ids[i, t + 1]] for t in _kept_positions(mask, i)))]

    ref = _loop_squares(model, 3, token_nll)
    with pytest.warns(UserWarning, match=r"labels equal the input ids.*TokenCategorical\(shift=True\)"):
        wrong = estimate_fisher(model, batch, "token_categorical")
    err = sum((wrong[k] - ref[k]).norm() ** 2 for k in ref) ** 0.5
    assert err > 0.1 * sum(v.norm() ** 2 for v in ref.values()) ** 0.5  # what it warns about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close_dict(dict(estimate_fisher(model, batch, TokenCategorical(shift=True))), ref)
        # token classification: labels are tags, not the ids
        tags = {**batch, "labels": (ids * 3 + 1) % 11}
        estimate_fisher(model, tags, "token_categorical")
