"""The capture-based fast path against the vmap engine and brute-force loops."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import natgrad
from natgrad import estimate_fisher
from natgrad.engine import capture
from natgrad.engine.batch import parse_batch
from natgrad.engine.capture import split_key, split_params
from natgrad.engine.per_sample import Plan
from tests.conftest import RoutedMoE, TinyEncoder
from tests.reference import (
    assert_close_dict,
    ce_sum,
    exact_categorical_fisher_loop,
    fisher_from_grads,
    loop_grads,
    loop_grads_by,
)

LABELS = ["empirical", "mc", "exact"]


def both(model, batch, **kw):
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    fast = estimate_fisher(model, batch, engine="fast", generator=gen(), **kw)
    slow = estimate_fisher(model, batch, engine="vmap", generator=gen(), **kw)
    return fast, slow


def split_of(model, batch, labels="empirical"):
    plan = Plan(model, "categorical", labels, 1, None, None, None)
    return split_params(plan, parse_batch(batch))


class Tied(nn.Module):
    """Embedding whose weight is reused as the output projection (tied weights)."""

    def __init__(self, vocab=9, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids).mean(1))))


class SeqConv1d(nn.Module):
    """Conv1d + per-token Linear on (N, T, D) + a free parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1)
        self.proj = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = torch.relu(self.conv(x)).transpose(1, 2)  # (N, T, 3)
        h = torch.tanh(self.proj(h)) * self.scale
        return self.head(h.mean(1))


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("case", ["mlp_case", "cnn_case", "embed_case"])
def test_engines_agree(case, labels, request):
    model, x, y = request.getfixturevalue(case)
    fast, slow = both(model, (x, y), labels=labels, mc_samples=3)
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)


def test_fast_empirical_matches_loop(cnn_case):
    model, x, y = cnn_case
    ref = {k: (g.float() ** 2).mean(0) for k, g in loop_grads(model, ce_sum, x, y).items()}
    got = estimate_fisher(model, (x, y), engine="fast")
    assert_close_dict(dict(got), ref, rtol=1e-5, atol=1e-9)


def test_fast_exact_matches_class_loop(mlp_case):
    model, x, _ = mlp_case
    got = estimate_fisher(model, x, labels="exact", engine="fast")
    assert_close_dict(dict(got), exact_categorical_fisher_loop(model, x), rtol=1e-5, atol=1e-9)


def test_linear_on_a_batch_shared_input_with_several_label_columns():
    """A Linear reading a buffer shared by the whole batch, shape (1, I): with exact labels
    (one backward per class) its squares used the unexpanded input and raised a shape
    error; against the class loop."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lin = nn.Linear(4, 3), nn.Linear(2, 3)
            self.register_buffer("const", torch.randn(1, 2))

        def forward(self, x):
            return self.fc(x) + self.lin(self.const)

    torch.manual_seed(42)
    model = Shared().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    got = estimate_fisher(model, x, labels="exact", engine="fast")
    assert_close_dict(dict(got), exact_categorical_fisher_loop(model, x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("labels", LABELS)
def test_transformer_encoder_agrees(encoder_case, labels):
    model, ids, mask, y = encoder_case
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    fast, slow = both(model, batch, labels=labels, mc_samples=2)
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)
    split = split_of(model, batch)
    # Every parameter is captured: Linear, Embedding, LayerNorm and self-attention.
    assert split.rest == []
    assert "enc.layers.0.self_attn.out_proj.weight" in split.fast_names


def test_token_categorical_per_token_head():
    torch.manual_seed(1)
    model = TinyEncoder(per_token=True).double().eval()
    ids = torch.randint(0, 13, (3, 4))
    labels = torch.randint(0, 13, (3, 4))
    labels[0, 2] = -100
    batch = {"input_ids": ids, "labels": labels}
    for lab in LABELS:
        fast, slow = both(model, batch, likelihood="token_categorical", labels=lab)
        assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("labels", LABELS)
def test_tied_weight(labels):
    torch.manual_seed(0)
    model = Tied().double()
    ids, y = torch.randint(0, 9, (6, 4)), torch.randint(0, 9, (6,))
    fast, slow = both(model, (ids, y), labels=labels)
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)
    split = split_of(model, (ids, y))
    # The tied weight's per-sample gradient is the sum of its two modules' gradients.
    assert split.rest == [] and split.tied == {"emb.weight": [model.emb, model.out]}
    # Consumers hooking single modules (the Laplace capture path) leave the tied weight out.
    assert "emb.weight" not in split.module_names and "mid.weight" in split.module_names
    ref = {k: (g.float() ** 2).mean(0) for k, g in loop_grads(model, ce_sum, ids, y).items()}
    if labels == "empirical":
        assert_close_dict(dict(fast), ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("labels", LABELS)
def test_pruned_model(cnn_case, labels):
    model, x, y = cnn_case
    prune.l1_unstructured(model.fc, "weight", amount=0.5)
    prune.random_unstructured(model.c2, "bias", amount=0.5)
    fast, slow = both(model, (x, y), labels=labels)
    assert "fc.weight_orig" in fast and "c2.bias_orig" in fast
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)
    assert (fast["fc.weight_orig"][model.fc.weight_mask == 0] == 0).all()
    assert "fc.weight_orig" in split_of(model, (x, y)).fast_names
    assert not any(k.endswith("forward_pre_hooks") for k in fast)
    assert len(model.fc._forward_hooks) == 0  # the capture hooks are removed


def test_conv1d_and_sequence_linear_with_free_parameter():
    torch.manual_seed(0)
    model = SeqConv1d().double()
    x, y = torch.randn(5, 2, 9, dtype=torch.float64), torch.randint(0, 3, (5,))
    for lab in LABELS:
        fast, slow = both(model, (x, y), labels=lab, mc_samples=2)
        assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)
    split = split_of(model, (x, y))
    assert split.rest == ["scale"]


def test_seq_first_layers_go_to_vmap():
    """A Linear applied to (T, N, D) has its batch axis second: it must not be captured."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):  # x: (N, T, 3)
            return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))

    torch.manual_seed(0)
    model = SeqFirst().double()
    x, y = torch.randn(4, 4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    split = split_of(model, (x, y))
    assert "lin.weight" in split.rest and "head.weight" in split.fast_names
    fast, slow = both(model, (x, y))
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)


def test_relu_inplace_and_embedding_padding_idx():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(7, 4, padding_idx=0),
        nn.Flatten(),
        nn.Linear(12, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 3),
    ).double()
    ids, y = torch.randint(0, 7, (8, 3)), torch.randint(0, 3, (8,))
    ids[0, 1] = 0
    fast, slow = both(model, (ids, y))
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)
    assert fast["0.weight"][0].abs().sum() == 0


def test_bfloat16_accumulates_in_float32(mlp_case):
    model, x, y = mlp_case
    model = model.to(torch.bfloat16)
    got = estimate_fisher(model, (x.bfloat16(), y), engine="fast")
    ref = estimate_fisher(model.double(), (x, y), engine="vmap")
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_close_dict(dict(got), dict(ref), rtol=0.1, atol=1e-4)


def test_model_and_inputs_unchanged(mlp_case):
    model, x, y = mlp_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = x.clone()
    estimate_fisher(model, (x, y), engine="fast", labels="exact")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x0)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_engine_errors(mlp_case):
    model, x, y = mlp_case
    with pytest.raises(ValueError, match="Unknown engine 'fastest'; expected one of 'auto'"):
        estimate_fisher(model, (x, y), engine="fastest")

    class OnlyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(5))

        def forward(self, z):
            return (z * self.scale)[:, :4]

    with pytest.raises(ValueError, match="engine='fast' found no parameter.*engine='auto'"):
        estimate_fisher(OnlyScale().double(), (x, y), engine="fast")
    auto = estimate_fisher(OnlyScale().double(), (x, y), engine="auto")
    assert auto.n_samples == len(x)


def test_multiple_batches_and_mlp_default(mlp_case):
    model, x, y = mlp_case
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    got = estimate_fisher(model, batches)
    ref = {k: (g.float() ** 2).mean(0) for k, g in loop_grads(model, ce_sum, x, y).items()}
    assert_close_dict(dict(got), ref, rtol=1e-5, atol=1e-9)


def test_gaussian_sequence_regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, 2, dtype=torch.float64)
    for lab in LABELS:
        fast, slow = both(model, (x, y), likelihood="gaussian", labels=lab)
        assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)
    ref = loop_grads(model, lambda o, t: 0.5 * ((o - t) ** 2).sum(), x, y)
    got = estimate_fisher(model, (x, y), "gaussian", engine="fast")
    assert_close_dict(dict(got), {k: (g.float() ** 2).mean(0) for k, g in ref.items()})


class PosEncoder(nn.Module):
    """Embedding + learned positions (a free parameter) + encoder with an attention mask."""

    def __init__(self, vocab=11, d=8, T=5, causal=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T + 2, d) * 0.5)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)
        mask = (
            torch.randn(T, T) if not causal else nn.Transformer.generate_square_subsequent_mask(T)
        )
        self.register_buffer("mask", mask)

    def forward(self, ids, attention_mask):
        h = self.emb(ids) + self.pos[: ids.shape[1]]
        pad = attention_mask == 0
        return self.head(self.enc(h, mask=self.mask.to(h.dtype), src_key_padding_mask=pad)[:, 0])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("labels", LABELS)
def test_positions_and_attention_masks(labels, causal):
    torch.manual_seed(0)
    model = PosEncoder(causal=causal).double().eval()
    ids, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    am = torch.ones(4, 5, dtype=torch.long)
    am[1, 3:] = 0
    batch = {"ids": ids, "attention_mask": am, "labels": y}
    fast, slow = both(model, batch, labels=labels, mc_samples=2)
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)
    split = split_of(model, batch)
    assert "pos" in split.fast_names
    attn = "enc.layers.0.self_attn.in_proj_weight"
    assert (attn in split.rest) == causal  # causal masks take the general path
    if labels == "empirical":
        ref = loop_grads(model, ce_sum, {"ids": ids, "attention_mask": am}, y)
        ref = {k: (g.float() ** 2).mean(0) for k, g in ref.items()}
        assert_close_dict(dict(fast), ref, rtol=1e-5, atol=1e-9)


def test_split_is_recomputed_when_the_model_changes(mlp_case):
    model, x, y = mlp_case
    estimate_fisher(model, (x, y))  # caches the split for this model
    prune.l1_unstructured(model[2], "weight", amount=0.5)  # adds a pre-hook, renames params
    fast, slow = both(model, (x, y))
    assert "2.weight_orig" in fast
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)
    x3 = x.unsqueeze(1).expand(-1, 3, -1)  # new per-sample shape: a sequence input
    f3, s3 = both(nn.Sequential(model, nn.Flatten(), nn.Linear(12, 4)).double(), (x3, y))
    assert_close_dict(dict(f3), dict(s3), rtol=1e-5, atol=1e-9)


def test_parameter_subset_and_frozen(cnn_case):
    model, x, y = cnn_case
    model.c1.weight.requires_grad_(False)
    fast, slow = both(model, (x, y), params=["c2.weight", "fc.bias", "c1.bias"])
    assert set(fast) == {"c2.weight", "fc.bias", "c1.bias"}
    assert_close_dict(dict(fast), dict(slow), rtol=1e-5, atol=1e-9)


class Branchy(nn.Module):
    """A Linear (fast path) and a free scale (vmap path) behind a branch on tensor values,
    which vmap cannot trace."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = self.lin(x)
        if (h.abs() < 1e9).all():  # always true: data-dependent control flow for vmap
            h = h * self.scale
        return h


def test_loop_fallback_for_leftover_params_is_decided_once(mlp_case):
    _, x, y = mlp_case
    model = Branchy().double()
    batches = [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = estimate_fisher(model, batches)
    falls = [w for w in caught if "Falling back to an exact per-sample loop" in str(w.message)]
    assert len(falls) == 1  # the fallback sticks for the rest of the pass
    assert split_of(model, (x, y)).rest == ["scale"]
    ref = {k: (g.float() ** 2).mean(0) for k, g in loop_grads(model, ce_sum, x, y).items()}
    assert_close_dict(dict(got), ref, rtol=1e-5, atol=1e-9)


# -- Hugging Face transformers: BERT-style encoder and GPT-2 (tiny configs) -----------------


def tiny_bert(impl):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=23, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, num_labels=3,
        attn_implementation=impl,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).double().eval()


def tiny_gpt2(impl):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=19, n_positions=16, n_embd=8, n_layer=2, n_head=2, attn_implementation=impl
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def bert_batch(n=5, t=6):
    ids = torch.randint(0, 23, (n, t))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,))}


def loop_fisher(model, batch, loss):
    """Empirical Fisher by one backward pass per sample (brute force)."""
    n = batch["input_ids"].shape[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def sample_loss(i):
        out = model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
        return loss(out, batch["labels"][i : i + 1])

    return fisher_from_grads(loop_grads_by(model, sample_loss, n))


def token_ce_sum(out, y):
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_bert_two_dim_mask_all_captured(impl):
    model = tiny_bert(impl)
    batch = bert_batch()
    split = split_of(model, batch)
    # Position embeddings run on shared ids (1, T) and are added to the batched sum.
    assert split.rest == []
    assert "bert.embeddings.position_embeddings.weight" in split.fast_names
    assert list(split.shared.values()) == ["<output of bert.embeddings.position_embeddings>"]
    assert "bert.embeddings.position_embeddings.weight" not in split.module_names
    got = estimate_fisher(model, batch, engine="fast")
    assert_close_dict(dict(got), loop_fisher(model, batch, ce_sum), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_bert_mc_engines_agree(impl):
    model = tiny_bert(impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # vmap falls back to the loop
        fast, slow = both(model, bert_batch(), labels="mc", mc_samples=2)
    assert_close_dict(dict(fast), dict(slow), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_gpt2_tied_head_conv1d(impl):
    model = tiny_gpt2(impl)
    ids = torch.randint(0, 19, (3, 7))
    labels = torch.randint(0, 19, (3, 7))
    labels[1, 4:] = -100
    batch = {"input_ids": ids, "labels": labels}
    split = split_of(model, batch)
    assert split.rest == []
    assert split.tied == {"transformer.wte.weight": [model.transformer.wte, model.lm_head]}
    assert model.transformer.h[0].attn.c_attn in split.fast
    got = estimate_fisher(model, batch, "token_categorical", engine="fast")
    ref = loop_fisher(model, batch, token_ce_sum)
    assert_close_dict(dict(got), ref, rtol=1e-6, atol=1e-12)
    fast, slow = both(model, batch, likelihood="token_categorical", labels="mc", mc_samples=2)
    assert_close_dict(dict(fast), dict(slow), rtol=1e-6, atol=1e-12)


class InplaceSeq(nn.Module):
    """Linear on sequences whose output an in-place ReLU modifies, then a head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.act(self.proj(x)).mean(1))


def test_layer_output_modified_in_place():
    # The output gradient must be taken before the in-place ReLU changed the output: the
    # engine sees the version change and reruns the forward with zero perturbations.
    torch.manual_seed(0)
    model = InplaceSeq().double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    assert set(split_of(model, (x, y)).fast_names) == {n for n, _ in model.named_parameters()}
    ref = fisher_from_grads(loop_grads(model, ce_sum, x, y))
    assert_close_dict(dict(estimate_fisher(model, (x, y), engine="fast")), ref, atol=1e-12)


class _Probe(torch.autograd.Function):
    """Identity whose backward (the first node the backward pass runs) calls ``check``."""

    @staticmethod
    def forward(ctx, x, check):
        ctx.check = check
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.check()
        return g, None


@pytest.mark.parametrize("labels", ["empirical", "mc"])
def test_one_column_backward_holds_no_layer_output(labels, monkeypatch):
    """With one label column whose output gradients are large (here: any, the budget
    set to 0), the capture path keeps no reference to the layer outputs through the
    backward pass (it runs to their gradient edges): a Linear output that only Tanh
    reads (Tanh saves its result, not its input) is already freed when the backward
    starts. The Fisher still equals the brute-force one (empirical labels)."""
    import weakref

    monkeypatch.setattr(capture, "_GROUP_FLOATS", 0)  # stream every column
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(5, 7), nn.Linear(7, 3)
    refs: list[weakref.ref] = []
    lin1.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    alive: list[bool] = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2 = lin1, lin2

        def forward(self, x):
            out = self.lin2(torch.tanh(self.lin1(x)))
            return _Probe.apply(out, lambda: alive.append(refs[-1]() is not None))

    model = Net()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    got = estimate_fisher(model, (x, y), labels=labels, engine="fast")
    assert alive and not alive[-1], "a layer output was held through the backward pass"
    if labels == "empirical":
        ref = fisher_from_grads(loop_grads(model, ce_sum, x, y))
        assert_close_dict(got, ref, rtol=1e-4, atol=1e-6)


class _SharedInput(nn.Module):
    """A Linear on a batch-shared buffer added to every sample, a free parameter (an
    added offset), an in-place ReLU and a Conv1d: every kind of capture record."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.ctx = nn.Linear(2, 3)
        self.offset = nn.Parameter(torch.randn(3))
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3, 4)
        self.register_buffer("const", torch.randn(1, 2))

    def forward(self, x):
        h = self.conv(x).mean(-1) + self.ctx(self.const)
        return self.head(self.relu(h + self.offset))


@pytest.mark.parametrize("labels", ["empirical", "mc"])
@pytest.mark.parametrize("case", ["mlp_case", "cnn_case", "embed_case", "shared"])
def test_streamed_and_grouped_column_agree_exactly(case, labels, request, monkeypatch):
    """One label column is streamed through the backward pass when its output gradients
    exceed the group budget, else pulled back at once: both give the same Fisher, bit
    for bit, which the vmap engine confirms to tolerance."""
    if case == "shared":
        torch.manual_seed(0)
        model = _SharedInput()
        batch: object = (torch.randn(6, 2, 5), torch.randint(0, 4, (6,)))
    else:
        model, x, y = request.getfixturevalue(case)
        batch = (x, y)
    def run(engine):
        g = torch.Generator().manual_seed(3)
        return estimate_fisher(model, batch, labels=labels, engine=engine, generator=g)

    grouped = run("fast")
    monkeypatch.setattr(capture, "_GROUP_FLOATS", 0)  # stream every column
    streamed = run("fast")
    assert set(dict(grouped)) == set(dict(streamed))
    for k, v in dict(grouped).items():
        assert torch.equal(v, streamed[k]), k
    assert_close_dict(dict(grouped), dict(run("vmap")), rtol=1e-5, atol=1e-9)


class ContextTied(nn.Module):
    """A list of shared context tensors, each projected with the layer's own weight
    (a second use of ``lin.weight`` outside ``lin``) and added to every sample."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, context):
        h = self.lin(x)
        for c in context:
            h = h + torch.nn.functional.linear(c, self.lin.weight).mean(0)
        return h


def test_remembered_split_keys_on_tensors_inside_lists():
    # The split of {"context": []} puts lin.weight on the capture path (used once); with
    # {"context": [c]} it is used twice and must take vmap. A key that recorded only
    # `list` reused the first split: lin.weight's Fisher was silently wrong (max error
    # 0.62 on entries up to 0.92).
    torch.manual_seed(0)
    model = ContextTied().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    c = torch.randn(5, 4, dtype=torch.float64)
    estimate_fisher(model, {"x": x, "context": [], "labels": y})
    got = estimate_fisher(model, {"x": x, "context": [c], "labels": y})
    ref = estimate_fisher(model, {"x": x, "context": [c], "labels": y}, engine="vmap")
    assert_close_dict(dict(got), dict(ref), rtol=1e-10, atol=1e-12)


def test_split_key_sees_nested_shapes_dtypes_and_structure():
    model = ContextTied()
    plan = Plan(model, "categorical", "empirical", 1, None, None, None)
    x = torch.randn(4, 4)

    def key(ctx):
        return split_key(plan, parse_batch({"x": x, "ctx": ctx}))

    base = key({"a": [torch.zeros(5, 4)]})
    assert key({"a": [torch.zeros(5, 4)]}) == base  # same signature: the split is reused
    for other in (
        {"a": [torch.zeros(6, 4)]},  # shape
        {"a": [torch.zeros(5, 4, dtype=torch.float64)]},  # dtype
        {"a": [torch.zeros(5, 4), torch.zeros(5, 4)]},  # structure
        {"b": [torch.zeros(5, 4)]},  # keys
        {"a": (torch.zeros(5, 4),)},  # container type
    ):
        assert key(other) != base, other


def test_token_routed_experts_are_moved_to_vmap():
    # Per-token top-1 routing: each expert runs on the tokens routed to it (13 rows for 10
    # samples here). The two probes repeat the first sample, which sends one token to
    # expert 0, so the split took expert 0 for a per-sample layer, and its Fisher summed
    # squared per-TOKEN gradients (max error 0.70, silently). The probes now track rows
    # selected by data and send the expert to vmap; the capture pass's row count is the
    # second line of defence (for later calls too).
    torch.manual_seed(1)
    model = RoutedMoE().double()
    x, y = torch.randn(10, 3, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap cannot index by a mask: the exact loop
        ref = estimate_fisher(model, [(x, y), (x[:6], y[:6])], engine="vmap")
        # the probes see the expert's rows picked by data (x[idx]): vmap from the start
        assert "experts.0.weight" not in split_of(model, (x, y)).fast_names
        for _ in range(2):  # the first call moves it; the second reuses the moved split
            got = estimate_fisher(model, [(x, y), (x[:6], y[:6])])
            assert_close_dict(dict(got), dict(ref), rtol=1e-10, atol=1e-12)


def test_batches_of_one_pass_with_other_nested_inputs_take_their_own_split():
    # One pass over {"context": []} then {"context": [c]}: the first batch's split (lin.weight
    # on the capture path) was used for the next ones, where lin.weight is used twice:
    # its Fisher was off by up to 0.21, silently.
    torch.manual_seed(0)
    model = ContextTied().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    c = torch.randn(5, 4, dtype=torch.float64)
    data = [{"x": x, "context": ctx, "labels": y} for ctx in ([], [c], [])]
    got = estimate_fisher(model, data)
    ref = estimate_fisher(model, data, engine="vmap")
    assert_close_dict(dict(got), dict(ref), rtol=1e-10, atol=1e-12)
    assert not any(v.requires_grad for v in got.values())


def test_a_batch_object_that_comes_again_in_a_pass_is_read_again():
    # A list of epochs, [A, B] * 2: the pass once recognised the first batch by identity
    # and, meeting A again, reused B's parsed data (the Fisher of [A, B, B, B], silently).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    a = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    b = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    ref = fisher_from_grads(loop_grads(model, ce_sum, torch.cat([a[0], b[0]]),
                                       torch.cat([a[1], b[1]])))  # fmt: skip
    for data in ([a, b] * 2, [a, b, a, b, b, a]):
        got = estimate_fisher(model, data)
        # each sample counts as often as it comes: equal copies of A and B here or not
        n_a, n_b = sum(d is a for d in data) * 6, sum(d is b for d in data) * 5
        ga = fisher_from_grads(loop_grads(model, ce_sum, *a))
        gb = fisher_from_grads(loop_grads(model, ce_sum, *b))
        want = {k: (n_a * ga[k] + n_b * gb[k]) / (n_a + n_b) for k in ga}
        assert_close_dict(dict(got), want, rtol=1e-10, atol=1e-13)
    assert_close_dict(dict(estimate_fisher(model, [a, b] * 2)), ref, rtol=1e-10, atol=1e-13)


def test_engine_fast_sends_index_routed_layers_to_vmap():
    # engine='fast' is 'auto' that refuses when no parameter qualifies. Per-sample
    # routing: the experts take vmap, the router stays on the capture path, the result is
    # vmap's. Per-token routing: the router runs on token rows too, nothing qualifies.
    torch.manual_seed(1)
    model = RoutedMoE().double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap cannot index by a mask: the exact loop
        ref = estimate_fisher(model, (x, y), engine="vmap")
        got = estimate_fisher(model, (x, y), engine="fast")
    assert_close_dict(dict(got), dict(ref), rtol=1e-10, atol=1e-12)
    assert split_of(model, (x, y)).fast_names == ["router.weight", "router.bias"]
    tokens = torch.randn(10, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="engine='fast' found no parameter"):
        estimate_fisher(model, (tokens, y), engine="fast")


class Routed(nn.Module):
    """Linear a run on the batch's rows reordered (or routed) by data, put back, then b."""

    def __init__(self, routing):
        super().__init__()
        self.routing = routing
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        order = x[:, 0].argsort()
        if self.routing == "getitem":
            h = self.a(x[order])[order.argsort()]
        elif self.routing == "index_select":
            h = self.a(x.index_select(0, order)).index_select(0, order.argsort())
        elif self.routing == "take_along_dim":
            h = self.a(torch.take_along_dim(x, order[:, None], 0))
            h = torch.take_along_dim(h, order.argsort()[:, None], 0)
        elif self.routing == "sorted":
            h = torch.zeros(x.shape[0], 4, dtype=x.dtype)
            h[order] = self.a(x[order])
        elif self.routing == "none_index":  # older HF mixture-of-experts code
            h = self.a(x[None, order][0])[order.argsort()]
        elif self.routing == "tolist":
            h = self.a(x[order.tolist()])[order.argsort()]
        elif self.routing == "keywords":
            s = torch.index_select(input=x, dim=0, index=order)
            h = torch.gather(input=self.a(s), dim=0,
                             index=order.argsort()[:, None].expand(-1, 4))
        elif self.routing == "setitem_slice":
            buf = torch.empty_like(x)
            buf[:] = x[order]
            h = self.a(buf)[order.argsort()]
        elif self.routing == "stack_unbind":
            rows = x.unbind(0)
            h = self.a(torch.stack([rows[i] for i in order.tolist()]))
            h = h[order.argsort()]
        elif self.routing == "embedding":  # the batch as the table
            h = self.a(F.embedding(order, x))[order.argsort()]
        elif self.routing == "flip":  # reversed rows, put back after the layer
            h = self.a(x.flip(0)).flip(0)
        elif self.routing == "roll":
            h = torch.roll(self.a(torch.roll(x, 1, 0)), -1, 0)
        elif self.routing == "cat_slices":  # a roll spelled with slices
            k = int(order[0])
            h = self.a(torch.cat([x[k:], x[:k]]))
            h = torch.cat([h[x.shape[0] - k:], h[:x.shape[0] - k]])
        elif self.routing == "onehot_matmul":  # a permutation matrix built from the data
            perm = F.one_hot(order, x.shape[0]).to(x.dtype)
            h = perm.T @ self.a(perm @ x)
        elif self.routing == "transposed_index":
            h = self.a(x.T[:, order].T)[order.argsort()]
        elif self.routing == "scatter_fresh":  # rows written to other samples' places
            s = torch.zeros_like(x)
            s[order.argsort()] = x
            h = torch.zeros(x.shape[0], 4, dtype=x.dtype)
            h[order] = self.a(s)
        else:  # an index built from arange, permuted by data
            idx = torch.arange(x.shape[0])[order]
            h = self.a(x[idx])[order.argsort()]
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("routing", [
    "getitem", "index_select", "take_along_dim", "sorted", "none_index", "tolist",
    "keywords", "setitem_slice", "stack_unbind", "embedding", "arange_perm", "flip", "roll",
    "cat_slices", "onehot_matmul", "transposed_index", "scatter_fresh",
])
def test_rows_selected_by_data_take_vmap_from_the_probes(routing):
    # The probes track rows picked by data along the batch axis (x[idx], index_select,
    # take_along_dim, a sorted batch x[perm] ... y[inv]): those layers take vmap, so
    # per-sample gradients land on their own samples (a sorted batch's were permuted,
    # off by 1.2; an expert that got exactly N rows was off by 0.03 of 0.55)
    from natgrad import per_sample_grads

    torch.manual_seed(0)
    model = Routed(routing).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = per_sample_grads(model, (x, y))
    ref = loop_grads(model, ce_sum, x, y)
    assert_close_dict(got, ref, rtol=1e-10, atol=1e-12)
    assert "a.weight" not in split_of(model, (x, y)).fast_names
    assert "b.weight" in split_of(model, (x, y)).fast_names or routing != "sorted"


def test_row_count_check_backs_up_the_probes(monkeypatch):
    # With the probes' row tracking and the two-sample row check off, the capture pass's
    # row count still moves the experts to vmap (13 token rows for 10 samples)
    from natgrad.engine import capture, capture_ops

    monkeypatch.setattr(capture_ops.ProbeMode, "_selects_rows", lambda *a: False)
    two = capture._two_samples
    monkeypatch.setattr(capture, "_two_samples", lambda plan, b, mods: (two(plan, b, [])[0], set()))
    torch.manual_seed(1)
    model = RoutedMoE().double()
    x, y = torch.randn(10, 3, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = estimate_fisher(model, (x, y), engine="vmap")
        assert "experts.0.weight" in split_of(model, (x, y)).fast_names  # the probes missed it
        got = estimate_fisher(model, (x, y))
    assert_close_dict(dict(got), dict(ref), rtol=1e-10, atol=1e-12)


def test_tables_read_by_ids_keep_the_capture_path():
    # a buffer table and a cast parameter table indexed by the batch's ids are not rows
    # picked from the batch: the layers after them stay on the capture path
    class Tables(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(10, 4))
            self.emb = nn.Parameter(torch.randn(10, 4))
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, ids):
            h = self.table[ids] + self.emb.to(torch.float64)[ids]
            return self.b(torch.tanh(self.a(h)))

    torch.manual_seed(0)
    model = Tables().double()
    ids, y = torch.randint(0, 10, (6,)), torch.randint(0, 3, (6,))
    fast = split_of(model, (ids, y)).fast_names
    assert {"a.weight", "a.bias", "b.weight", "b.bias"} <= set(fast)


def test_a_one_sample_first_batch_does_not_decide_the_pass():
    # one sample cannot show that a model mixes samples: the next, larger batch of the
    # same pass is checked again (it reused the one-sample split: 0.089 off)
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.tanh(h - 0.5 * h.mean(0)))

    torch.manual_seed(0)
    model = Mixing().double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    data = [(x[:1], y[:1]), (x[1:], y[1:])]
    got = estimate_fisher(model, data)
    ref = estimate_fisher(model, data, engine="vmap")
    assert_close_dict(dict(got), dict(ref), rtol=1e-10, atol=1e-13)


def test_engine_fast_names_the_input_signature_when_a_later_batch_fits_nothing():
    # without a bias, the second batch's context list reads the only weight twice
    torch.manual_seed(0)
    model = ContextTied()
    model.lin = nn.Linear(4, 3, bias=False)
    model.double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    c = torch.randn(5, 4, dtype=torch.float64)
    data = [{"x": x, "context": [], "labels": y}, {"x": x, "context": [c], "labels": y}]
    with pytest.raises(ValueError, match=r"batch 2 has another input signature"):
        estimate_fisher(model, data, engine="fast")


def test_the_two_sample_check_alone_finds_reordered_rows(monkeypatch):
    # with the probes' operation tracking off, forwards of two distinct samples alone and
    # together, in both orders, still show a layer whose rows are another sample's
    from natgrad import per_sample_grads
    from natgrad.engine import capture_ops

    monkeypatch.setattr(capture_ops.ProbeMode, "_selects_rows", lambda *a: False)

    torch.manual_seed(0)
    model = Routed("getitem").double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert "a.weight" not in split_of(model, (x, y)).fast_names
    assert "b.weight" in split_of(model, (x, y)).fast_names
    assert_close_dict(per_sample_grads(model, (x, y)), loop_grads(model, ce_sum, x, y),
                      rtol=1e-10, atol=1e-12)


class _ScaledLinear(nn.Linear):
    """An equalized-learning-rate Linear: its own forward uses 2W."""

    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


class _ScaledConv2d(nn.Conv2d):
    """Keeps nn.Conv2d.forward but scales the weight in _conv_forward."""

    def _conv_forward(self, x, w, b):
        return super()._conv_forward(x, 2.0 * w, b)


def _patched_linear():
    lin = nn.Linear(4, 5)
    lin.forward = lambda x: F.linear(x, 2.0 * lin.weight, lin.bias)  # an adapter-style patch
    return lin


@pytest.mark.parametrize("first", ["subclass", "conv_forward", "instance"])
@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_layers_with_their_own_forward_are_not_read_as_plain_layers(first, kind):
    """A Linear/Conv subclass with its own forward (or _conv_forward), or a forward set on
    the instance, may transform its weight: the capture path and K-FAC read it as the
    plain layer (per-sample gradients 0.5x, Fisher 0.25x off; found by review). At N = 1
    and one output position K-FAC is exact, so every kind's diagonal must equal the
    squared gradient of the loss (an autograd reference)."""
    torch.manual_seed(0)
    if first == "conv_forward":
        model = nn.Sequential(_ScaledConv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))
        x = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    else:
        lay = _ScaledLinear(4, 5) if first == "subclass" else _patched_linear()
        model = nn.Sequential(lay, nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(1, 4, dtype=torch.float64)
    model = model.double().eval()
    y = torch.tensor([1])
    g = torch.autograd.grad(F.cross_entropy(model(x), y), model[0].weight)[0]
    d = natgrad.estimate_curvature(model, (x, y), kind=kind).diagonal()["0.weight"]
    torch.testing.assert_close(d, g**2, rtol=1e-10, atol=1e-14)
    psg = natgrad.per_sample_grads(model, (x, y))["0.weight"][0]
    torch.testing.assert_close(psg, g, rtol=1e-10, atol=1e-14)


def test_accelerate_hooked_layers_stay_plain_layers():
    """Hugging Face accelerate's hooks (device_map dispatch, offload) set forward on the
    instance but run the class's own forward: still the capture path and K-FAC (the
    instance-forward rule first sent them to vmap, 75x slower, and K-FAC refused them;
    found by review). Same values as the unhooked model."""
    hooks = pytest.importorskip("accelerate.hooks")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    hooked = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    hooked.load_state_dict(plain.state_dict())
    for m in hooked:
        if isinstance(m, nn.Linear):
            hooks.add_hook_to_module(m, hooks.AlignDevicesHook(execution_device="cpu",
                                                               io_same_device=True))
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    from natgrad.engine.capture_layers import runs_own_forward

    assert all(runs_own_forward(m, nn.Linear) for m in hooked if isinstance(m, nn.Linear))
    a = natgrad.estimate_curvature(plain, (x, y), kind="kfac")
    b = natgrad.estimate_curvature(hooked, (x, y), kind="kfac")
    assert b.structure() == a.structure() == {k: "kfac" for k in a.structure()}
    fa, fb = estimate_fisher(plain, (x, y)), estimate_fisher(hooked, (x, y))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)

    class Double(hooks.ModelHook):  # a hook that changes the output is not the plain layer
        def post_forward(self, module, output):
            return 2 * output

    scaled = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    scaled.load_state_dict(plain.state_dict())
    hooks.add_hook_to_module(scaled[2], Double())
    assert not runs_own_forward(scaled[2], nn.Linear)
    ref = fisher_from_grads(loop_grads(scaled, ce_sum, x, y))
    assert_close_dict(dict(estimate_fisher(scaled, (x, y))), ref, rtol=1e-10, atol=1e-14)
