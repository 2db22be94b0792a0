"""natgrad inside the Hugging Face Trainer: EWC, a saved Fisher, logged metrics, K-FAC.

Two tasks on a tiny BERT classifier (random weights from a config, synthetic token
data; no download). Task A is trained with K-FAC natural gradient
(``Trainer(optimizers=(NaturalGradient(...), None))``, curvature recorded from the
Trainer's own backward); its Fisher is saved next to the checkpoints
(``SaveFisherCallback``); task B is trained with the EWC penalty added to the loss
(``compute_loss_func=EWCLoss(ewc)``) while Fisher metrics are logged every 5 steps
(``FisherMetricsCallback``). No training loop here: the Trainer runs everything.

Install (from the repository root; the `integrations` extra adds transformers,
accelerate and lightning):
    pip install -e ".[demo,integrations]"
Run: python examples/hf_trainer.py [output_dir]
"""

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import natgrad

try:
    import transformers

    from natgrad.integrations.huggingface import EWCLoss, FisherMetricsCallback, SaveFisherCallback
except ImportError as exc:
    sys.exit(f"{exc}\nThis example needs: pip install -e \".[demo,integrations]\"")

T, VOCAB, C = 8, 100, 3


def task(seed, n=64):
    """Token sequences labelled by which third of the vocabulary their first token is in
    (task A) or their last token (task B)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    pos = 0 if seed == 0 else -1
    labels = (ids[:, pos] * C) // VOCAB
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def accuracy(model, data):
    model.eval()
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    with torch.no_grad():
        return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


def main(out_dir):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=C,
        attn_implementation="eager",
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg)
    task_a, task_b = task(0), task(1)

    def args(name, **kw):
        return transformers.TrainingArguments(
            output_dir=os.path.join(out_dir, name), num_train_epochs=8,
            per_device_train_batch_size=16, report_to="none", use_cpu=True,
            save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, **kw,
        )  # fmt: skip

    # Task A: K-FAC natural gradient from the Trainer's own backward, on the linear layers.
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    pre = natgrad.FisherPreconditioner(
        model, kind="kfac", damping=0.1, source="backward", params=linear, update_every=2
    )
    opt = natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), pre)
    fisher_loader = torch.utils.data.DataLoader(
        task_a, batch_size=32, collate_fn=transformers.default_data_collator
    )
    save = SaveFisherCallback(fisher_loader)
    transformers.Trainer(
        model=model, args=args("task_a"), train_dataset=task_a, optimizers=(opt, None),
        callbacks=[save],
    ).train()  # fmt: skip
    pre.close()
    print(f"task A (K-FAC natural gradient): accuracy on A {accuracy(model, task_a):.2f}")
    fisher_a = natgrad.DiagonalFisher.load(save.path, model)
    print(f"Fisher of task A saved to {save.path}: trace {fisher_a.total():.4g}, N={fisher_a.n_samples}")

    # Task B: AdamW (the Trainer's default) plus the EWC penalty anchored at task A.
    ewc = natgrad.EWC(model, fisher_a, lam=100.0)
    trainer = transformers.Trainer(
        model=model, args=args("task_b", learning_rate=2e-3), train_dataset=task_b,
        compute_loss_func=EWCLoss(ewc),
    )  # fmt: skip
    probe = transformers.default_data_collator(task_b[:16])
    trainer.add_callback(
        FisherMetricsCallback(
            trainer, probe, every_n_steps=5, metrics=["trace", "natural_gradient_norms"]
        )
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "fisher/trace" in h]
    for h in logged:
        print(
            f"step {h['step']:3d}: fisher/trace {h['fisher/trace']:.4g}  "
            f"natgrad_ratio {h.get('fisher/natgrad_ratio', float('nan')):.4g}"
        )
    print(
        f"task B (EWC, lam=100): accuracy on B {accuracy(model, task_b):.2f}, "
        f"on A {accuracy(model, task_a):.2f}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="natgrad_hf_"))
