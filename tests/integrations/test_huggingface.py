"""natgrad.integrations.huggingface under a real ``transformers.Trainer`` (CPU, no downloads).

A tiny ``BertForSequenceClassification`` (hidden 32, 2 layers, 2 heads, vocab 100) is
trained for 1-2 steps. Every effect is checked against a reference written here by
hand: the SGD update against ``-lr (∇CE + λ F (θ - θ*))`` from plain autograd, the saved
Fisher against one backward per sample, the logged metrics against per-sample loops on
a snapshot of the weights taken at the logging step.
Skipped when ``transformers`` is not installed (``pip install 'natgrad[integrations]'``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import natgrad
from tests.reference import fisher_from_grads, loop_grads_by

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("natgrad.integrations.huggingface")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N, T, C = 8, 6, 3


def _bert(dropout=0.1):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=C,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg)


def _data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, T), generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    return ids, labels


def _dataset(ids, labels):
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(labels))]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        warmup_steps=0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _loader(ids, labels, batch_size=4):
    return torch.utils.data.DataLoader(
        _dataset(ids, labels), batch_size=batch_size, collate_fn=transformers.default_data_collator
    )


def _loop_fisher(model, ids, labels, names=None):
    """The empirical diagonal Fisher by one backward per sample (model in eval mode)."""
    model.eval()

    def loss(i):
        logits = model(input_ids=ids[i : i + 1]).logits
        return F.cross_entropy(logits, labels[i : i + 1], reduction="sum")

    return fisher_from_grads(loop_grads_by(model, loss, len(labels), names))


# -- EWC -------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulation", [1, 2])
def test_ewc_loss_gives_the_sgd_step_of_ce_plus_penalty(tmp_path, accumulation):
    """One SGD step under the Trainer moves θ by -lr (∇CE + λ F (θ0 - θ*)), also with
    gradient accumulation (the penalty counts once per optimizer step), and the loss
    the Trainer differentiates is CE + (λ/2) Σ F (θ - θ*)² computed by hand."""
    model = _bert(dropout=0.0)
    ids, labels = _data(4)
    names = ["classifier.weight", "classifier.bias", "bert.encoder.layer.1.output.dense.weight"]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    fisher = {k: torch.rand(named[k].shape, generator=g) for k in names}
    anchor = {k: named[k].detach() + 0.5 * torch.randn(named[k].shape, generator=g) for k in names}
    lam, lr = 3.0, 0.1
    ewc = natgrad.EWC(model, fisher, lam=lam, anchor=anchor)
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}

    # reference, by hand: gradient of the mean CE over the 4 samples + λ F (θ0 - θ*)
    ref = copy.deepcopy(model).train()
    ce = F.cross_entropy(ref(input_ids=ids).logits, labels)
    grads = torch.autograd.grad(ce, list(ref.parameters()))
    expected = {
        k: theta0[k] - lr * gk for (k, _), gk in zip(ref.named_parameters(), grads, strict=True)
    }
    for k in names:
        expected[k] = expected[k] - lr * lam * fisher[k] * (theta0[k] - anchor[k])
    by_hand = sum(0.5 * lam * (fisher[k] * (theta0[k] - anchor[k]) ** 2).sum() for k in names)

    calls = []
    loss_func = hf.EWCLoss(ewc)

    def recording(outputs, labels_, num_items_in_batch=None):
        loss = loss_func(outputs, labels_, num_items_in_batch=num_items_in_batch)
        calls.append((loss.detach(), loss_func.last_penalty, num_items_in_batch))
        return loss

    trainer = transformers.Trainer(
        model=model,
        args=_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation,
        ),
        train_dataset=_dataset(ids, labels),
        compute_loss_func=recording,
    )
    trainer.train()

    assert len(calls) == accumulation
    for _, penalty, _ in calls:
        torch.testing.assert_close(penalty, by_hand, rtol=1e-5, atol=1e-6)
    if accumulation == 1:  # the one call's loss is CE + penalty
        torch.testing.assert_close(calls[0][0], ce.detach() + by_hand, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-4, atol=1e-6, msg=k)
    # the penalty moved the covered weights: without it they would differ
    k = names[0]
    assert not torch.allclose(expected[k], theta0[k] - lr * dict(zip(
        [n for n, _ in ref.named_parameters()], grads, strict=True))[k], atol=1e-4)  # fmt: skip


def test_ewc_loss_leaves_eval_losses_alone_and_refuses_float_labels():
    model = _bert(dropout=0.0)
    ewc = natgrad.EWC(model, {"classifier.bias": torch.ones(C)}, lam=1.0)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    logits = torch.randn(4, C)
    labels = torch.tensor([0, 1, 2, -100])
    loss_func = hf.EWCLoss(ewc)
    model.eval()
    torch.testing.assert_close(loss_func((logits,), labels), F.cross_entropy(logits[:3], labels[:3]))
    model.train()
    torch.testing.assert_close(
        loss_func((logits,), labels), F.cross_entropy(logits[:3], labels[:3]) + 0.5 * C
    )
    with pytest.raises(TypeError, match="integer class labels"):
        loss_func((logits,), torch.rand(4))
    with pytest.raises(TypeError, match="natgrad.EWC"):
        hf.EWCLoss({"classifier.bias": torch.ones(C)})
    with pytest.raises(TypeError, match="callable"):
        hf.EWCLoss(ewc, loss_fn=3)


# -- Fisher at the end of training -------------------------------------------------------
def test_fisher_saved_at_train_end_equals_a_per_sample_loop(tmp_path, caplog):
    model = _bert(dropout=0.1)
    ids, labels = _data(4)  # one batch, one step: the saved Fisher is of the trained model
    cb = hf.SaveFisherCallback(_loader(ids, labels))
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=_dataset(ids, labels),
        callbacks=[cb],
    )
    with caplog.at_level("INFO", logger="natgrad.integrations"):
        trainer.train()
    path = os.path.join(str(tmp_path), "fisher.safetensors")
    assert cb.path == path and os.path.exists(path)
    assert path in caplog.text
    assert model.training  # the Trainer's mode is restored after the eval-mode pass
    loaded = natgrad.DiagonalFisher.load(path, model)
    assert loaded.n_samples == 4
    direct = natgrad.estimate_fisher(copy.deepcopy(model).eval(), _loader(ids, labels))
    ref = _loop_fisher(copy.deepcopy(model), ids, labels)
    assert set(loaded) == set(ref)
    for k in ref:
        torch.testing.assert_close(loaded[k], direct[k], rtol=1e-5, atol=1e-9, msg=k)
        torch.testing.assert_close(loaded[k], ref[k], rtol=1e-3, atol=1e-8, msg=k)


@pytest.mark.slow
def test_fisher_saved_in_each_checkpoint_folder(tmp_path):
    model = _bert(dropout=0.1)
    ids, labels = _data(N)
    cb = hf.SaveFisherCallback(_loader(ids, labels), at_checkpoints=True, max_batches=1)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=_dataset(ids, labels),
        callbacks=[cb],
    )
    trainer.train()
    for step in (1, 2):
        f = natgrad.DiagonalFisher.load(tmp_path / f"checkpoint-{step}" / "fisher.safetensors")
        assert f.n_samples == 4  # max_batches=1 of batch size 4
    final = natgrad.DiagonalFisher.load(tmp_path / "fisher.safetensors", model)
    last = natgrad.DiagonalFisher.load(tmp_path / "checkpoint-2" / "fisher.safetensors")
    for k in final:  # the weights did not change after the last checkpoint
        torch.testing.assert_close(final[k], last[k])


# -- metrics ----------------------------------------------------------------------------
class _Snapshot(transformers.TrainerCallback):
    """Copies the weights at each step end (after the metrics callback logged)."""

    def __init__(self):
        self.states = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = copy.deepcopy(model.state_dict())


def test_logged_metrics_equal_direct_references(tmp_path):
    model = _bert(dropout=0.1)
    ids, labels = _data(N)
    probe_ids, probe_labels = _data(4, seed=7)
    probe = {"input_ids": probe_ids, "labels": probe_labels}
    damping = 0.5
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(ids, labels)
    )
    metrics_cb = hf.FisherMetricsCallback(trainer, probe, every_n_steps=2, damping=damping)
    snap = _Snapshot()
    trainer.add_callback(metrics_cb)
    trainer.add_callback(snap)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "fisher/trace" in h]
    assert [h["step"] for h in logged] == [2]  # every 2nd of 2 steps
    for h in logged:
        ref_model = _bert(dropout=0.1)
        ref_model.load_state_dict(snap.states[h["step"]])
        names = [k for k, _ in ref_model.named_parameters()]
        fisher = _loop_fisher(ref_model, probe_ids, probe_labels, names)
        assert h["fisher/trace"] == pytest.approx(sum(float(v.sum()) for v in fisher.values()), rel=1e-3)
        layers = {}
        for k, v in fisher.items():
            mod = k.rsplit(".", 1)[0]
            layers[mod] = layers.get(mod, 0.0) + float(v.sum())
        for mod, v in layers.items():
            assert h[f"fisher/layer/{mod}"] == pytest.approx(v, rel=2e-3, abs=1e-9), mod
        ref_model.eval()
        ce = F.cross_entropy(ref_model(input_ids=probe_ids).logits, probe_labels)
        grads = torch.autograd.grad(ce, list(ref_model.parameters()))
        gn = sum(float((gk.double() ** 2).sum()) for gk in grads) ** 0.5
        dn = sum(
            float(((gk.double() / (fisher[k].double() + damping)) ** 2).sum())
            for k, gk in zip(names, grads, strict=True)
        ) ** 0.5
        assert h["fisher/grad_norm"] == pytest.approx(gn, rel=1e-4)
        assert h["fisher/natgrad_norm"] == pytest.approx(dn, rel=1e-3)
        assert h["fisher/natgrad_ratio"] == pytest.approx(dn / gn, rel=1e-3)
    assert metrics_cb.last == {k: v for k, v in logged[-1].items() if k.startswith("fisher/")}
    assert model.training


def test_metrics_callback_refuses_bad_options(tmp_path):
    model = _bert()
    ids, labels = _data(4)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(ids, labels))
    batch = {"input_ids": ids, "labels": labels}
    with pytest.raises(TypeError, match="transformers.Trainer"):
        hf.FisherMetricsCallback(model, batch)
    with pytest.raises(ValueError, match="every_n_steps"):
        hf.FisherMetricsCallback(trainer, batch, every_n_steps=0)
    with pytest.raises(TypeError, match=r"metrics=\['trace'\]"):
        hf.FisherMetricsCallback(trainer, batch, metrics="trace")
    with pytest.raises(ValueError, match="Unknown metrics 'trase'"):
        hf.FisherMetricsCallback(trainer, batch, metrics=["trase"])
    with pytest.raises(ValueError, match="plain file name"):
        hf.SaveFisherCallback(batch, filename="sub/fisher.safetensors")


# -- imports ----------------------------------------------------------------------------
def test_missing_transformers_names_the_pip_command_and_natgrad_imports_no_framework():
    code = (
        "import sys, natgrad\n"
        "print('transformers' in sys.modules, 'lightning' in sys.modules)\n"
        "sys.modules['transformers'] = None\n"
        "try:\n"
        "    import natgrad.integrations.huggingface\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=_root())
    first, message = out.stdout.split("\n", 1)
    assert first.split() == ["False", "False"], out.stderr  # import natgrad imports neither
    assert "natgrad.integrations.huggingface needs the 'transformers' package" in message
    assert "pip install 'natgrad[integrations]'" in message, out.stderr
    assert "pip install transformers" in message


def _root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- natural gradient through Trainer(optimizers=...) ------------------------------------
def test_natural_gradient_from_backward_through_trainer_optimizers(tmp_path):
    """Trainer(optimizers=(NaturalGradient(SGD, FisherPreconditioner(source="backward")),
    None)): one step moves the preconditioned weights by -lr g / (F + λ), with F the
    empirical diagonal Fisher of the Trainer's own backward (one backward per sample
    here), and the others by -lr g."""
    model = _bert(dropout=0.0)
    ids, labels = _data(4)
    names = ["classifier.weight", "classifier.bias", "bert.pooler.dense.weight"]
    lr, lam = 0.1, 0.2
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    ref = copy.deepcopy(model).train()
    ce = F.cross_entropy(ref(input_ids=ids).logits, labels)
    g = dict(zip(theta0, torch.autograd.grad(ce, list(ref.parameters())), strict=True))
    fisher = _loop_fisher(ref, ids, labels, names)

    pre = natgrad.FisherPreconditioner(model, kl_clip=None, kind="diag", damping=lam, params=names, source="backward")
    opt = natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=lr), pre)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=_dataset(ids, labels),
        optimizers=(opt, None),
    )
    trainer.train()
    for k, p in model.named_parameters():
        step = g[k] / (fisher[k] + lam) if k in names else g[k]
        torch.testing.assert_close(p.detach(), theta0[k] - lr * step, rtol=1e-4, atol=1e-6, msg=k)


def test_ekfac_from_backward_through_trainer_optimizers(tmp_path):
    """EKFAC over the BERT's top Linears, from the records of the Trainer's own forward
    and backward (Trainer(optimizers=(NaturalGradient(...), None)), no batch passed):
    one step equals a hand-run EKFAC step whose curvature natgrad estimates by its own
    pass on the same batch (empirical labels), so the Trainer's backward gave the same
    per-sample gradients; the LayerNorms and embeddings take plain SGD steps."""
    model = _bert(dropout=0.0)
    ids, labels = _data(4)
    names = [f"{m}.{p}" for m, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and not m.startswith("bert.encoder.layer.0.")
             for p in ("weight", "bias")]  # the Linears of the last encoder layer and after
    lr, lam = 0.1, 0.05
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    ref = copy.deepcopy(model).eval()
    ref_pre = natgrad.FisherPreconditioner(ref, kl_clip=None, kind="ekfac", damping=lam, params=names)
    F.cross_entropy(ref(input_ids=ids).logits, labels).backward()
    ref_pre.step({"input_ids": ids, "labels": labels})
    pre = natgrad.FisherPreconditioner(model, kl_clip=None, kind="ekfac", damping=lam, params=names,
                                       source="backward")
    opt = natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=lr), pre)
    transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1),
                         train_dataset=_dataset(ids, labels), optimizers=(opt, None)).train()
    assert pre.curvature.structure() == {k: "ekfac" for k in names}
    for k, p in model.named_parameters():
        q = ref.get_parameter(k)
        torch.testing.assert_close(p.detach(), theta0[k] - lr * q.grad, rtol=1e-4, atol=1e-6,
                                   msg=k)
        assert not torch.equal(p.detach(), theta0[k]) or q.grad.abs().max() == 0, k


@pytest.mark.parametrize("kind", ["kfac", "diag"])
def test_natural_gradient_with_gradient_accumulation_equals_the_full_batch_step(tmp_path, kind):
    """gradient_accumulation_steps=2 over two micro-batches of 4 gives one step equal to a
    hand-run NaturalGradient step on all 8 samples (its curvature and gradient checked
    against dense references in tests/optim), once the Trainer divides the micro-batch
    losses (`trainer.model_accepts_loss_kwargs = False`, as docs/integrations.md says).
    Left at the Trainer's default for a model taking **kwargs, the micro-batch means are
    not divided and the step differs (gradient 2x, curvature 4x): the documented pitfall."""
    ids, labels = _data(8)
    names = ["classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
             "bert.pooler.dense.bias"]

    def optimizer(model):
        pre = natgrad.FisherPreconditioner(model, kind=kind, damping=0.1, params=names,
                                           source="backward", kl_clip=None)
        return natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1), pre)

    ref = _bert(dropout=0.0).train()
    opt = optimizer(ref)
    F.cross_entropy(ref(input_ids=ids).logits, labels).backward()
    opt.step()

    def run(divide):
        model = _bert(dropout=0.0)
        trainer = transformers.Trainer(
            model=model, train_dataset=_dataset(ids, labels), optimizers=(optimizer(model), None),
            args=_args(tmp_path, max_steps=1, gradient_accumulation_steps=2))
        accepts = trainer.model_accepts_loss_kwargs
        if divide:
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        return model, accepts

    model, _ = run(divide=True)
    for (k, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=k)
    model, accepts = run(divide=False)
    if accepts:  # the pitfall the docs describe (transformers 5)
        assert not torch.allclose(model.classifier.weight, ref.classifier.weight, atol=1e-4)


# -- loss_reduction="token_mean": a language model's per-token mean loss ----------------
def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).double()


def _lm_data(n=4, t=T, seed=3, first_kept=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, t), generator=g)
    labels = ids.clone()
    labels[1, 3:] = -100  # padding: a shorter second sequence
    if not first_kept:
        labels[:, 0] = -100
    return ids, labels


def _gpt2_names(model):
    # the blocks' Conv1D layers (the LM head is tied to the token embedding)
    return [k for k, _ in model.named_parameters() if ".attn.c_" in k or ".mlp.c_" in k]


def _sequence_fisher(model, ids, labels, names):
    """(1/N) Σ_n g_n², g_n the gradient of sequence n's summed shifted token loss: one
    backward per sequence."""
    def loss(i):
        logits = model(input_ids=ids[i : i + 1]).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, 50), labels[i : i + 1, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")

    return fisher_from_grads(loop_grads_by(model, loss, len(ids), names))


def test_token_mean_reads_a_causal_lm_loss_as_per_sequence_losses():
    """A GPT-2 called with labels= computes the mean over its kept shifted tokens; with
    loss_reduction="shifted_token_mean" the recorded diagonal equals the per-sequence
    Fisher of a loop (the count read from labels[..., 1:]), also with the model inside a
    wrapper module; with "mean" it would be (N/K)² of it, and the call warns."""
    model = _gpt2()
    ids, labels = _lm_data()
    names = _gpt2_names(model)
    ref = _sequence_fisher(copy.deepcopy(model), ids, labels, names)
    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw)

    for net, pre_names in ((model, names), (Wrap(model), [f"m.{k}" for k in names])):
        model.zero_grad()
        pre = natgrad.FisherPreconditioner(net, kind="diag", source="backward",
                                           params=pre_names, kl_clip=None,
                                           loss_reduction="shifted_token_mean")
        net(input_ids=ids, labels=labels).loss.backward()
        pre.step()
        got = pre.curvature.diagonal()
        for k, pk in zip(names, pre_names, strict=True):
            # Hugging Face's causal-LM loss computes in float32 (logits.float())
            torch.testing.assert_close(got[pk], ref[k], rtol=1e-6, atol=1e-12)
        pre.close()
    model.zero_grad()
    pre = natgrad.FisherPreconditioner(model, kind="diag", source="backward", params=names,
                                       kl_clip=None)
    with pytest.warns(UserWarning, match="token_mean"):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    pre.step()
    kept = int(labels[:, 1:].ne(-100).sum())
    k = names[0]
    torch.testing.assert_close(pre.curvature.diagonal()[k], ref[k] * (len(ids) / kept) ** 2,
                               rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_token_mean_through_the_trainer_equals_the_sequence_fisher_step(tmp_path, accumulation):
    """The Hugging Face Trainer on a causal LM (it passes num_items_in_batch, the kept
    labels of the whole step, which the model divides by): one NaturalGradient step with
    loss_reduction="token_mean" moves the selected weights by -lr g / (F + λ), F the
    per-sequence Fisher of a loop and g the gradient of the mean over every kept token;
    with gradient accumulation too (each micro-batch's forward scaled by the step's count)."""
    model = _gpt2()
    ids, labels = _lm_data(first_kept=False)  # the Trainer counts labels unshifted here
    names = _gpt2_names(model)
    lr, lam = 0.1, 0.05
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    fisher = _sequence_fisher(ref, ids, labels, names)
    logits = ref(input_ids=ids).logits[:, :-1]
    mean = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    g = dict(zip(theta0, torch.autograd.grad(mean, list(ref.parameters())), strict=True))
    pre = natgrad.FisherPreconditioner(model, kind="diag", damping=lam, params=names,
                                       source="backward", loss_reduction="shifted_token_mean",
                                       kl_clip=None)
    opt = natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=lr), pre)
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]
    trainer = transformers.Trainer(
        model=model, train_dataset=data, optimizers=(opt, None),
        args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4 // accumulation,
                   gradient_accumulation_steps=accumulation))
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    for k, p in model.named_parameters():
        step = g[k] / (fisher[k] + lam) if k in names else g[k]
        torch.testing.assert_close(p.detach(), theta0[k] - lr * step, rtol=1e-5, atol=1e-8)


def test_ewc_loss_keeps_a_float64_model_in_float64_and_a_bf16_loss_unrounded():
    # the default loss cast float64 logits to float32 (a float64 model's loss 9e-6 off at
    # 325), and the penalty was cast to the task loss's dtype (bf16 rounding); found by
    # review. Reference: float64 cross-entropy and the hand-computed penalty.
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3).double()
    fisher = {k: torch.rand_like(p) for k, p in m.named_parameters()}
    anchor = {k: p.detach() + 0.3 for k, p in m.named_parameters()}
    ewc = natgrad.EWC(m, fisher, lam=1.7, anchor=anchor)
    x, y = torch.randn(8, 4, dtype=torch.float64) * 1e3, torch.randint(0, 3, (8,))
    by_hand = sum(0.5 * 1.7 * (fisher[k] * 0.3**2).sum() for k in fisher)
    loss = hf.EWCLoss(ewc)({"logits": m(x)}, y)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(m(x), y) + by_hand, rtol=1e-13, atol=0)
    bf16 = hf.EWCLoss(ewc, loss_fn=lambda o, lab, num_items_in_batch=None:
                      torch.tensor(1.0, dtype=torch.bfloat16))
    torch.testing.assert_close(bf16({"logits": m(x)}, y), 1.0 + by_hand, rtol=1e-13, atol=0)
