"""The bad-input table of ``docs/bad-inputs.md``, measured at build time (a mkdocs hook).

Each case is one class of bad input (the classes of the project's fault audit), a small
example of it, and what natgrad should do with it. At build time every example runs
against the installed natgrad and the page shows what it does *now*: the exception and
the start of its message, the warning, or the silent result, marked handled or not. So
the page cannot drift from the code.

Run ``python docs/bad_inputs.py`` to print the table.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MARKER = "<!-- natgrad-bad-inputs -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # measure the natgrad of this checkout
    sys.path.insert(0, ROOT)


@dataclass
class Case:
    group: str
    name: str
    expect: str  # "error", "warn", "error or warn", or "correct"
    wanted: str  # what natgrad should do, for the table
    run: Callable[[], Any]  # for "correct": returns True when the result is right
    phrase: str | None = None  # a regular expression the error message must contain


def _cases() -> list[Case]:
    import torch
    from torch import nn

    import natgrad

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    F = natgrad.estimate_fisher(mlp(), (x, y))

    def with_entry(value):
        d = {k: v.clone() for k, v in F.items()}
        d["0.weight"][0, 0] = value
        return d

    def grads_of(m):
        nn.functional.cross_entropy(m(x), y).backward()
        return m

    def nan_grad_precondition():
        m = grads_of(mlp())
        m[0].weight.grad[0, 0] = float("nan")
        natgrad.FisherPreconditioner(m, kind="diag").step((x, y))

    def merge_nan():
        a = mlp()
        with torch.no_grad():
            a[0].weight[0, 0] = float("nan")
        natgrad.fisher_weighted_merge([a, mlp()], [F, F])

    def ewc_nan_anchor():
        m = mlp()
        anchor = {k: v.detach().clone() for k, v in m.named_parameters()}
        anchor["0.weight"][0, 0] = float("nan")
        natgrad.EWC(m, F, anchor=anchor)

    def corrupt_file():
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "f.safetensors")
            F.save(p)
            with open(p, "rb") as fh:
                raw = bytearray(fh.read())
            raw[-8:] = b"\x00\x00\x80\xff" * 2  # two entries become -inf
            with open(p, "wb") as fh:
                fh.write(raw)
            natgrad.DiagonalFisher.load(p)

    def tracker_other_model():
        t = natgrad.FisherTracker(mlp())
        t.update("a", (x, y))
        other = natgrad.FisherTracker(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
        other.load_state_dict(t.state_dict())

    def metric_context_tuple():
        from natgrad.metrics import MetricContext, registry

        registry.compute_all(MetricContext(models=[mlp()], batches=(x, y)))

    def meta_model():
        with torch.device("meta"):
            m = mlp()
        natgrad.estimate_fisher(m, (x, y))

    def prelu_shapes():
        m = nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 3))
        gr = natgrad.per_sample_grads(m, (x, y))
        return all(v.shape == (6, *p.shape) for (k, p), v in zip(m.named_parameters(), gr.values(), strict=True))

    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.out = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, s):
            return self.out(self.gru(s)[0][:, -1])

    def gru_fisher():
        m, s = GRUNet(), torch.randn(6, 2, 4, generator=g)
        F = natgrad.estimate_fisher(m, (s, y))
        ref = {k: torch.zeros_like(p) for k, p in m.named_parameters()}
        for i in range(6):  # one backward per sample
            m.zero_grad()
            nn.functional.cross_entropy(m(s[i : i + 1]), y[i : i + 1]).backward()
            for k, p in m.named_parameters():
                ref[k] += p.grad**2 / 6
        return all(torch.allclose(F[k], ref[k], rtol=1e-4, atol=1e-7) for k in ref)

    def shared_mask():
        class Masked(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 3)

            def forward(self, inp, scale):
                return self.lin(inp) * scale

        m, scale = Masked(), torch.tensor([1.0, 2.0, 3.0])
        F = natgrad.estimate_fisher(m, {"inp": x, "scale": scale, "labels": y}, engine="vmap")
        ref = torch.zeros_like(m.lin.weight)
        for i in range(6):
            m.zero_grad()
            nn.functional.cross_entropy(m(x[i : i + 1], scale), y[i : i + 1]).backward()
            ref += m.lin.weight.grad**2 / 6
        return torch.allclose(F["lin.weight"], ref, rtol=1e-4, atol=1e-7)

    label_out = torch.tensor([0, 1, 2, 3, 0, 1])
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    dropout = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    return [
        Case("labels", "class label ≥ number of classes", "error",
             "ValueError naming the sample and the value",
             lambda: natgrad.estimate_fisher(mlp(), (x, label_out))),
        Case("labels", "the same, `engine=\"vmap\"`", "error", "the same error on every path",
             lambda: natgrad.estimate_fisher(mlp(), (x, label_out), engine="vmap")),
        Case("labels", "label -100 without an ignore index", "error",
             "ValueError naming the sample and the value",
             lambda: natgrad.estimate_fisher(mlp(), (x, torch.tensor([0, 1, 2, -100, 0, 1])))),
        Case("labels", "int32 class labels", "correct", "cast to int64 (or say `.long()`)",
             lambda: abs(natgrad.estimate_fisher(mlp(), (x, y.int())).total() - F.total())
             <= 1e-6 * F.total()),
        Case("labels", "float labels for a categorical likelihood", "error",
             "ValueError: integer class indices expected",
             lambda: natgrad.estimate_fisher(mlp(), (x, y.float()))),
        Case("labels", "Bernoulli target outside [0, 1]", "error", "ValueError naming the value",
             lambda: natgrad.estimate_fisher(nn.Linear(4, 1), (x, torch.full((6, 1), 2.0)), "bernoulli")),
        Case("labels", "one-logit model under the default categorical likelihood", "error",
             "ValueError: one class (zero Fisher); use likelihood='bernoulli'",
             lambda: natgrad.estimate_fisher(nn.Linear(4, 1), x, labels="exact"),
             r"likelihood='bernoulli'"),
        Case("labels", "a final `nn.Sigmoid` under `likelihood=\"bernoulli\"`", "error",
             "ValueError: probabilities, not logits",
             lambda: natgrad.estimate_fisher(nn.Sequential(nn.Linear(4, 2), nn.Sigmoid()), x,
                                             "bernoulli", labels="exact"),
             r"not logits"),
        Case("labels", "`CustomLikelihood` whose nll returns the batch mean", "error",
             "ValueError: one value per sample, shape (N,)",
             lambda: natgrad.estimate_fisher(
                 nn.Linear(4, 1), (x, torch.zeros(6, 1)),
                 natgrad.CustomLikelihood(lambda f, t: ((f - t) ** 2).sum(-1).mean())),
             r"one negative log-likelihood per sample"),
        Case("labels", "encoder `attention_mask` with decoder labels of another length", "error",
             "ValueError naming the mask and `decoder_input_ids`",
             lambda: natgrad.estimate_fisher(
                 _tokens_model(), {"input_ids": torch.zeros(2, 4, dtype=torch.long),
                             "attention_mask": torch.ones(2, 4),
                             "labels": torch.zeros(2, 3, dtype=torch.long)}, "token_categorical"),
             r"decoder_input_ids"),
        Case("model mode", "train-mode BatchNorm", "error",
             "ValueError: per-sample gradients are undefined; use eval mode or GroupNorm",
             lambda: natgrad.estimate_fisher(bn, (x, y))),
        Case("model mode", "train-mode Dropout", "error or warn",
             "an error or a warning: the Fisher would include dropout noise",
             lambda: natgrad.estimate_fisher(dropout, (x, y))),
        Case("NaN/Inf", "NaN in the inputs (`estimate_fisher`)", "error",
             "FloatingPointError naming the parameter",
             lambda: natgrad.estimate_fisher(mlp(), (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y))),
        Case("NaN/Inf", "NaN in the inputs (`per_sample_grads`)", "error",
             "FloatingPointError naming the parameter",
             lambda: natgrad.per_sample_grads(mlp(), (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y))),
        Case("NaN/Inf", "NaN target, Gaussian likelihood", "error", "an error naming the targets",
             lambda: natgrad.estimate_fisher(nn.Linear(4, 1), (x, torch.full((6, 1), float("nan"))), "gaussian")),
        Case("NaN/Inf", "NaN in `.grad` given to the preconditioner", "error",
             "FloatingPointError naming the parameter", nan_grad_precondition),
        Case("NaN/Inf", "NaN in an EWC Fisher", "error", "FloatingPointError naming the entry",
             lambda: natgrad.EWC(mlp(), with_entry(float("nan")), lam=1.0)),
        Case("NaN/Inf", "NaN in an EWC anchor", "error", "an error naming the entry", ewc_nan_anchor),
        Case("NaN/Inf", "NaN weights in a model to merge", "error", "an error naming the model and entry",
             merge_nan),
        Case("NaN/Inf", "NaN Fisher given to `scale_by_fisher`", "error", "an error naming the entry",
             lambda: natgrad.scale_by_fisher(grads_of(mlp()), with_entry(float("nan")))),
        Case("negative Fisher", "negative entry given to `scale_by_fisher`", "error",
             "ValueError: a Fisher is ≥ 0",
             lambda: natgrad.scale_by_fisher(grads_of(mlp()), with_entry(-2.0), damping=1.0)),
        Case("negative Fisher", "negative entry given to `fisher_importance(normalize=False)`", "error",
             "ValueError: a Fisher is ≥ 0",
             lambda: natgrad.fisher_importance(with_entry(-2.0), mlp(), normalize=False)),
        Case("negative Fisher", "`DiagonalFisher` built with a negative value", "error",
             "ValueError: a Fisher is ≥ 0",
             lambda: natgrad.DiagonalFisher({"w": torch.tensor([-1.0])}, 3)),
        Case("arguments", "`chunk_size=0` (capture path)", "error", "ValueError naming chunk_size",
             lambda: natgrad.estimate_fisher(mlp(), (x, y), chunk_size=0)),
        Case("arguments", "`model=None`", "error", "TypeError: a torch.nn.Module expected",
             lambda: natgrad.estimate_fisher(None, (x, y))),
        Case("arguments", "a Fisher given as a list", "error", "TypeError: a {name: tensor} mapping expected",
             lambda: natgrad.EWC(mlp(), [1.0, 2.0])),
        Case("arguments", "Python lists instead of tensors", "error", "TypeError or ValueError: tensors expected",
             lambda: natgrad.estimate_fisher(mlp(), ([[0.0] * 4] * 6, [0] * 6)), phrase="tensor"),
        Case("arguments", "`MetricContext(batches=(x, y))` (a tuple, not a list of batches)", "error",
             "an error: a list of batches expected", metric_context_tuple),
        Case("arguments", "a model on the meta device", "error", "an error naming the device", meta_model),
        Case("model", "the model's own forward fails (input shape mismatch)", "error",
             "the model's error, with the batch's shapes and dtypes",
             lambda: natgrad.estimate_fisher(mlp(), (torch.randn(6, 5), y)), phrase="forward"),
        Case("other model", "`EWC.penalty` of another architecture", "error", "an error naming the mismatch",
             lambda: natgrad.EWC(mlp(), F).penalty(other)),
        Case("other model", "`FisherTracker.load_state_dict` from another model", "error",
             "an error naming the mismatch on load", tracker_other_model),
        Case("files", "a Fisher file whose bytes were changed", "error",
             "an error: checksum mismatch, the file is corrupt", corrupt_file),
        Case("exactness", "`nn.PReLU`: per-sample gradient shapes", "correct",
             "every per-sample result is (N, *param.shape)", prelu_shapes),
        Case("exactness", "`nn.GRU`: Fisher against a per-sample loop", "correct",
             "the exact per-sample loop where vmap fails", gru_fisher),
        Case("exactness", "a tensor argument shared by the batch (no batch axis)", "correct",
             "reaches the model unchanged; Fisher equals the loop's", shared_mask),
        Case("exactness", "float64 model", "correct", "a float64 Fisher",
             lambda: natgrad.estimate_fisher(mlp().double(), (x.double(), y))["0.weight"].dtype
             == torch.float64),
    ]


def _tokens_model() -> Any:
    """A token tagger whose logits follow the labels' length (a decoder's)."""
    import torch
    from torch import nn

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(1, 3)

        def forward(self, input_ids, attention_mask=None):
            return self.head(torch.ones(input_ids.shape[0], 3, 1))

    return Tokens()


def _from_natgrad(exc: BaseException) -> bool:
    """The exception comes from a ``raise`` statement in natgrad's own code (a named
    error), not from a torch operation that natgrad happened to call."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames or f"{os.sep}natgrad{os.sep}" not in frames[-1].filename:
        return False
    last = frames[-1]
    lines = [linecache.getline(last.filename, i).strip() for i in range(last.lineno - 3, last.lineno + 1)]
    return any(line.startswith("raise") for line in lines)


def _clip(text: str, n: int = 150) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def measure(case: Case) -> tuple[bool, str]:
    """(handled, what natgrad does now) for one case."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.run()
            exc = None
        except Exception as e:  # noqa: BLE001 - any outcome is what we report
            exc = e
    warned = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    if exc is not None:
        named = _from_natgrad(exc)
        now = f"`{type(exc).__name__}`: {_clip(exc)}"
        if not named:
            now += " (raised inside torch)"
        ok = named and (case.phrase is None or re.search(case.phrase, str(exc), re.I) is not None)
        return case.expect in ("error", "error or warn") and ok, now
    warning = f"warns `{warned[0].category.__name__}`: {_clip(warned[0].message)}" if warned else ""
    if case.expect == "correct":
        now = "correct" if result else "wrong result, no error"
        return bool(result), f"{now}; {warning}" if warning else now
    if warned:
        return case.expect in ("warn", "error or warn"), warning
    return False, "passes silently (no error, no warning)"


def table() -> str:
    """The Markdown table, one row per case, measured now."""
    rows = [
        "| class | bad input | natgrad should | natgrad now | |",
        "|---|---|---|---|---|",
    ]
    done = 0
    cases = _cases()
    for c in cases:
        ok, now = measure(c)
        done += ok
        mark = "✅" if ok else "❌"
        rows.append(f"| {c.group} | {c.name} | {c.wanted} | {now} | {mark} |")
    import natgrad

    head = (
        f"Measured with natgrad {natgrad.__version__} when this page was built: "
        f"{done} of {len(cases)} cases handled.\n"
    )
    return head + "\n" + "\n".join(rows)


def on_page_markdown(markdown: str, page, **kwargs) -> str:  # mkdocs hook
    """Replace the marker on the bad-input page with the measured table."""
    if MARKER in markdown:
        return markdown.replace(MARKER, table())
    return markdown


if __name__ == "__main__":
    print(table())
