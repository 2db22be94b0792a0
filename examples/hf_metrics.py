"""Compute every registered Fisher metric on a Hugging Face model.

A tiny BERT classifier is built from a config with random weights (no download; use
``from_pretrained`` for a real one). Batches are dicts with ``input_ids``,
``attention_mask`` and ``labels``; outputs carry ``.logits``.

transformers >= 5 branches on the mask's values while building the attention mask,
which ``torch.func.vmap`` cannot trace; expanding the mask to 4-D
(``mask[:, None, None, :].bool()``) skips that step and means the same.

Install (from the repository root; the `hf` extra adds transformers):
    pip install -e ".[demo,hf]"
Run: python examples/hf_metrics.py
"""

import sys

import torch

try:
    import transformers
except ImportError:
    sys.exit('This example needs transformers: pip install -e ".[demo,hf]"')

from natgrad.metrics import MetricContext, registry

torch.manual_seed(0)
config = transformers.BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
model = transformers.BertForSequenceClassification(config).eval()


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    mask = (torch.arange(12) < lengths[:, None]).long()
    return {
        "input_ids": ids * mask,
        "attention_mask": mask[:, None, None, :].bool(),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


ctx = MetricContext(
    models=[model],
    batches=[batch(16, 1), batch(16, 2)],
    tasks=["task_a", "task_b"],
    options={"top_fisher_directions": {"k": 3}, "fisher_pruning_masks": {"sparsity": 0.5}},
)
result = registry.compute_all(ctx)
for name in sorted(result.results):
    print(f"computed  {name:<26} ({result.seconds[name]:.2f} s)")
for name, why in result.skipped.items():
    print(f"skipped   {name:<26} {why}")
for name, why in result.failed.items():
    print(f"failed    {name:<26} {why}")
damage = result.results["fisher_damage_asymmetry"]
print(
    f"damage to task_a by task_b / the reverse: {damage.damage_to_first:.3g} / {damage.damage_to_second:.3g}"
)
print(
    "trace of task_a's Fisher per layer:",  # estimated by the context: get_fisher, not ctx.fisher
    {k: round(v, 4) for k, v in list(ctx.get_fisher(0).layer_totals().items())[:4]},
    "...",
)
