"""``source="backward"`` under the Hugging Face Trainer: the loss scalings it reads wrong
by a factor are named (``natgrad/curvature/backward.py``).

A tiny ``BertForSequenceClassification`` (float64, no dropout) under the real Trainer
with ``gradient_accumulation_steps=2``: its loss is the mean over its own micro-batch and
ignores ``num_items_in_batch``, so with ``trainer.model_accepts_loss_kwargs`` True (the
default for a model whose ``forward`` takes ``**kwargs``) the Trainer does not divide the
micro-batch means and the recorded curvature is 4 times the Fisher of a per-sample loop.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import natgrad
from tests.reference import fisher_from_grads, loop_grads_by

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

N, T, C = 8, 6, 3
NAMES = ["classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
         "bert.pooler.dense.bias"]
UNDIVIDED = r"num_items_in_batch=.*2x and the recorded curvature 4x too large.*model_accepts_loss_kwargs = False"


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=C, attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (N, T), generator=g), torch.randint(0, C, (N,), generator=g)


def loop_fisher(model, ids, labels):
    """(1/N) Σ_n g_n², g_n the gradient of sample n's cross-entropy: one backward each."""
    def loss(i):
        return F.cross_entropy(model(input_ids=ids[i : i + 1]).logits, labels[i : i + 1])

    return fisher_from_grads(loop_grads_by(model, loss, N, NAMES))


def train(tmp_path, accumulation, divide):
    """One optimizer step under the Trainer; the preconditioner (its curvature from that
    step's records, at the starting weights) and the warnings it gave."""
    model = bert()
    ids, labels = data()
    pre = natgrad.FisherPreconditioner(model, kind="diag", damping=0.1, params=NAMES,
                                       source="backward", kl_clip=None)
    opt = natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1), pre)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=N // accumulation,
        gradient_accumulation_steps=accumulation, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to="none",
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    dataset = [{"input_ids": ids[i], "labels": labels[i]} for i in range(N)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   optimizers=(opt, None))
    assert trainer.model_accepts_loss_kwargs  # BERT's forward takes **kwargs
    if divide:
        trainer.model_accepts_loss_kwargs = False  # the documented fix
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return pre, [str(w.message) for w in caught]


def test_trainer_undivided_micro_batch_means_warn_with_the_factor(tmp_path):
    ids, labels = data()
    ref = loop_fisher(bert(), ids, labels)
    pre, said = train(tmp_path, accumulation=2, divide=False)
    assert any(re.search(UNDIVIDED, m) for m in said), said
    got = pre.curvature.diagonal()
    for k in NAMES:  # what the warning says: 2² times the Fisher
        torch.testing.assert_close(got[k], 4 * ref[k], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("accumulation, divide", [(2, True), (1, False)])
def test_trainer_exact_settings_do_not_warn(tmp_path, accumulation, divide):
    """The documented fix (model_accepts_loss_kwargs = False), and no accumulation (the
    Trainer's loss is then the batch mean either way): the Fisher, and no warning."""
    ids, labels = data()
    ref = loop_fisher(bert(), ids, labels)
    pre, said = train(tmp_path, accumulation, divide)
    assert not [m for m in said if "num_items_in_batch=" in m], said
    got = pre.curvature.diagonal()
    for k in NAMES:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-8, atol=1e-12)
