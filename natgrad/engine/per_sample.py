"""The general engine: exact per-sample gradients with ``torch.func``.

For a model ``f(x; θ)`` and a likelihood with per-sample loss
``l_n(θ) = -log p(y_n | f(x_n; θ))``, the per-sample gradient is
``g_n = ∇θ l_n = J_nᵀ ∇_f l_n`` with ``J_n = ∂f(x_n)/∂θ``. We compute it per sample
with ``functional_call`` + ``vmap(vjp(...))`` over chunks of the batch, so peak memory
grows with ``chunk_size × P`` and never with ``N × P``.

Every chunk's result is checked to have shape ``(n, *param.shape)`` (or
``(n, J, *param.shape)`` with ``J`` label columns) before it is used. Where
``torch.func`` fails on a module or returns another shape, the engine moves to a
composition without nested ``vmap`` and then to an exact per-sample loop (one warning
naming the module and the error; see :meth:`Plan.run`). Inputs without the batch
dimension reach the model unchanged (see :mod:`natgrad.engine.batch`).

The label source decides which output cotangents ``u`` are pulled back through ``J_n``:

* ``empirical``: ``u = ∇_f l_n(y_n)`` with the data label (one column);
* ``mc``: ``u_j = ∇_f l_n(ỹ_j)``, ``ỹ_j ~ p(y | f(x_n))`` for ``j = 1..k``, weight ``1/k``;
* ``exact``: the columns ``s_j`` of a symmetric factor of ``E_y[∇_f l ∇_f lᵀ]``, so
  ``Σ_j (J_nᵀ s_j)² = E_y[g_n²]`` exactly.

Dropout: under ``vmap(randomness="different")`` each sample draws its own mask in
train mode; call ``model.eval()`` for a deterministic Fisher.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, overload

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten
from typing_extensions import Unpack

from natgrad.engine.batch import (
    Batch,
    OutputFn,
    add_batch_axis,
    default_output_fn,
    kept_positions,
    parse_batch,
)
from natgrad.engine.checks import (
    check_choice,
    check_finite,
    check_finite_per_sample,
    check_int,
    check_model,
    check_no_batch_mixing,
    check_output_rows,
    check_per_sample_loss,
    forward_failed,
    integer_labels,
    torch_func_refusal,
    warn_unshifted_lm_labels,
)
from natgrad.engine.common import acc_dtype, internal_pass, to_acc, vjp_pair, with_autograd
from natgrad.engine.likelihoods import (
    Bernoulli,
    Gaussian,
    Likelihood,
    TokenCategorical,
    get_likelihood,
)
from natgrad.engine.options import LABEL_SOURCES, EstimatorOptions, Options, ParamSpec

__all__ = ["per_sample_grads", "select_params", "LABEL_SOURCES", "ParamSpec"]

logger = logging.getLogger(__name__)

_EXACT_COLUMNS = 32  # exact-label factor columns built at once per sample
CHUNK_FLOATS = 2**25  # default chunk: about 128 MiB of float32 per-sample gradients


def select_params(model: nn.Module, params: ParamSpec = None) -> dict[str, nn.Parameter]:
    """The parameters to differentiate, by name, in ``model.named_parameters()`` order.

    Args:
        model: the model.
        params: ``None`` (every parameter with ``requires_grad``), a list of names, a
            predicate ``(name, param) -> bool``, or a module / list of modules of ``model``.

    Raises:
        ValueError: unknown names (the message lists valid ones), the second name of a
            tied weight (the message names the first), modules not in the model, or an
            empty selection.
    """
    return _select(model, params, dict(model.named_parameters()))


def _select(
    model: nn.Module, params: ParamSpec, named: dict[str, nn.Parameter]
) -> dict[str, nn.Parameter]:
    """:func:`select_params` from ``named``, the model's ``dict(named_parameters())``."""
    if params is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
    elif isinstance(params, nn.Module) or (
        isinstance(params, (list, tuple))
        and params
        and all(isinstance(m, nn.Module) for m in params)
    ):
        mods = [params] if isinstance(params, nn.Module) else list(params)
        ids = {id(p) for m in mods for p in m.parameters()}
        all_ids = {id(p) for p in named.values()}
        if not ids <= all_ids:
            raise ValueError("params lists a module that is not part of the model.")
        chosen = {k: p for k, p in named.items() if id(p) in ids}
    elif callable(params):
        chosen = {k: p for k, p in named.items() if params(k, p)}
    elif isinstance(params, (list, tuple, set)):
        unknown = [k for k in params if k not in named]
        canonical = {id(p): k for k, p in named.items()}
        tied = {
            k: canonical[id(p)]
            for k, p in model.named_parameters(remove_duplicate=False)
            if k in unknown and id(p) in canonical
        }
        if tied:
            pairs = ", ".join(f"{k!r} is {v!r}" for k, v in tied.items())
            raise ValueError(
                f"params names tied weights by their second name ({pairs}: the same tensor, "
                "which model.named_parameters() lists once, under its first name); select "
                f"{sorted(set(tied.values()))} instead (results are keyed by that name)."
            )
        if unknown:
            raise ValueError(
                f"Unknown parameter names {unknown}; the model has {list(named)[:12]}"
                + (" ..." if len(named) > 12 else "")
                + ". Use names from model.named_parameters()."
            )
        chosen = {k: named[k] for k in named if k in set(params)}
    else:
        raise TypeError(
            "params must be None, a list of parameter names, a predicate (name, param) -> bool, "
            f"or a list of modules; got {type(params).__name__}."
        )
    if not chosen:
        raise ValueError(
            "No parameters selected: the model has no trainable parameters matching `params`."
        )
    return chosen


def model_device(model: nn.Module, first: torch.Tensor | None = None) -> torch.device:
    """The device of the model's first parameter (``first``, when the caller has it), else
    of its first buffer, else the CPU."""
    p = first if first is not None else next(model.parameters(), None)
    if p is None:
        b = next(model.buffers(), None)
        return b.device if b is not None else torch.device("cpu")
    return p.device


class Plan:
    """Everything the vmapped per-sample function needs, resolved once per call.

    It checks the model (:func:`check_model`, :func:`check_no_batch_mixing`) unless
    ``checked=True``: the caller has just run :func:`check_fixed_model`, which does both.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        labels: str,
        mc_samples: int,
        params: ParamSpec,
        output_fn: OutputFn | None,
        generator: torch.Generator | None,
        *,
        what: str = "natgrad",
        checked: bool = False,
    ) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{what} differentiates the model, which torch.inference_mode() forbids, and "
                f"it is on here: call {what} outside the `with torch.inference_mode():` "
                "block, or inside `with torch.inference_mode(False):` (natgrad.estimate_fisher, "
                "estimate_curvature, per_sample_grads, fisher_uncertainty and "
                "optimize_prior_precision do this themselves)."
            )
        if not checked:
            check_model(model, what)
            check_no_batch_mixing(model)
        self.model = model
        self.lik: Likelihood = get_likelihood(likelihood)
        self.labels = check_choice("labels", labels, LABEL_SOURCES)
        check_int("mc_samples", mc_samples, 1)
        self.k = int(mc_samples)
        named = dict(model.named_parameters())  # one walk for the selection and the device
        self.params = _select(model, params, named)
        self.output_fn: OutputFn = output_fn or default_output_fn
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.tier = 0  # 0: nested vmap, 1: flat vmap, 2: exact loop (see run)
        self.device = model_device(model, next(iter(named.values()), None))
        self.P = sum(p.numel() for p in self.params.values())
        self.batches_seen = 0  # batches parsed so far; names the batch in forward errors

    @classmethod
    def from_options(
        cls, model: nn.Module, likelihood: str | Likelihood, opts: Options, *, what: str,
        checked: bool = False,
    ) -> Plan:
        """The plan of resolved estimator options (:class:`natgrad.engine.options.Options`)."""
        return cls(
            model, likelihood, opts.labels, opts.mc_samples, opts.params, opts.output_fn,
            opts.generator, what=what, checked=checked,
        )  # fmt: skip

    # -- labels ------------------------------------------------------------------
    def prepare(self, batch: Any) -> tuple[Batch, torch.Tensor | None, torch.Tensor | None]:
        """Parse a batch; return it with the target (masked) and the MC label draws.

        One forward pass gives the output the target is checked against: of the whole
        batch for ``labels="mc"`` (whose draws need it), else of the first sample only.
        The whole target is checked here, once, before any ``vmap`` (see
        :meth:`check_target`).
        """
        b, target = self.parse(batch)
        return (b, *self.labels_of(b, target))

    def labels_of(
        self, b: Batch, target: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(target, draws)`` of a parsed batch: the target checked against a forward
        pass (see :meth:`prepare`), and the MC label draws (``labels="mc"``, else None)."""
        mc = self.labels == "mc"
        on = b if mc else b.select(0, 1)
        out = self.forward(on, full=b, detach=False)  # its autograd node is checked
        target = self.check_target(out, target, on, b)
        out = out.detach()
        return target, self.draw(out, target) if mc else None

    def check_target(
        self, out: torch.Tensor, target: torch.Tensor | None, on: Batch,
        full: Batch | None = None,
    ) -> torch.Tensor | None:
        """The batch's whole target, validated by the likelihood against the model's
        output ``out`` on ``on`` (the whole batch or its first sample) and cast to the
        dtype the likelihood reads; every engine calls this once per batch before using
        the target. ``full``: the whole batch when ``on`` is a probe of it (its padding
        mask is read, :func:`check_padding_read`). ``out`` must have one row per sample of ``on``
        (:func:`natgrad.engine.checks.check_output_rows`), with labels or without.

        Raises:
            ValueError: an output without one row per sample; labels out of range, of
                the wrong dtype or shape, or non-finite; an output the likelihood cannot
                have (e.g. probabilities for a softmax); a padding mask over positions
                of the outputs that the likelihood cannot leave out.
        """
        self.check_rows(out, on, full)
        check_padding_read(self.lik, out, on if full is None else full)
        if target is None:  # no labels to check against the output: check the output
            self.lik.check_output(out)
            return None
        return self.lik.prepare_target(out, target, rows=on.size)

    def check_rows(self, out: torch.Tensor, on: Batch, full: Batch | None = None) -> None:
        """:func:`natgrad.engine.checks.check_output_rows` of the model's output ``out``
        on ``on`` (``full``: the user's batch when ``on`` is a probe of a few of its
        samples), naming the entries passed whole (:meth:`Batch.shared_hint`)."""
        if out.dim() > 0 and out.shape[0] == on.size:
            return  # the message (and its hint about shared entries) only on failure
        probe = on.size == 1 and self.labels != "mc"
        hint = (on if full is None else full).shared_hint()
        check_output_rows(out, on.size, probe=probe, hint=hint)

    def parse(self, batch: Any) -> tuple[Batch, torch.Tensor | None]:
        """Parse a batch onto the model's device; return it with its (masked) target."""
        b = parse_batch(batch).to(self.device)
        self.batches_seen += 1
        target = masked_target(self.lik, b)
        if self.labels == "empirical" and target is None:
            raise ValueError(
                "labels='empirical' needs the data's labels, but the batch has none: pass "
                "(x, y) or a dict with 'labels', or use labels='mc' / labels='exact'."
            )
        return b, target

    def draw(self, out: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """``k`` MC labels per sample from the predictive at ``out``, shape ``(N, k, ...)``."""
        self.lik.check_drawable(
            out,
            "labels='mc' cannot sample from them: check the inputs and whether training diverged.",
        )
        return self.lik.sample(out.detach(), self.generator, self.k, target).movedim(0, 1)

    @property
    def weight(self) -> float:
        """The weight ``w_j`` of every label column: ``1/k`` for ``mc``, else 1."""
        return 1.0 / self.k if self.labels == "mc" else 1.0

    def columns(
        self, out: torch.Tensor, target: torch.Tensor | None, draws: torch.Tensor | None
    ) -> Iterator[torch.Tensor]:
        """The label columns ``u_j`` at outputs ``out``, in groups of shape ``(J, *out.shape)``.

        ``draws`` has shape ``(N, k, ...)``. Shared by both engines, so that they pull
        back the same columns.
        """
        lik = self.lik
        if self.labels == "empirical":
            assert target is not None  # check_target refused a batch without labels
            yield lik.output_grad(out, target).unsqueeze(0)
        elif self.labels == "mc":
            assert draws is not None  # draw() ran for labels='mc'
            yield torch.stack([lik.output_grad(out, draws[:, j]) for j in range(self.k)])
        else:
            K = lik.num_factor_columns(out)
            step = min(K, _EXACT_COLUMNS)
            for s in range(0, K, step):
                yield lik.factor_columns(out, s, min(s + step, K), target)

    def column_list(
        self, out: torch.Tensor, target: torch.Tensor | None, draws: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Every label column of :meth:`columns` on its own, each of ``out``'s shape (the
        empirical and MC columns without stacking and unstacking them)."""
        if self.labels == "empirical":
            assert target is not None  # check_target refused a batch without labels
            return [self.lik.output_grad(out, target)]
        if self.labels == "mc":
            assert draws is not None  # draw() ran for labels='mc'
            return [self.lik.output_grad(out, draws[:, j]) for j in range(self.k)]
        return [c[j] for c in self.columns(out, target, draws) for j in range(len(c))]

    def all_columns(
        self, out: torch.Tensor, target: torch.Tensor | None, draws: torch.Tensor | None
    ) -> torch.Tensor:
        """Every label column at once, ``(J, *out.shape)``, each to be weighted by
        :attr:`weight` (the one label-source switch: :meth:`columns`)."""
        return torch.cat(list(self.columns(out, target, draws)), 0)

    def restrict(self, names: Iterable[str]) -> Plan:
        """A copy of this plan that differentiates only the parameters ``names``."""
        sub = copy.copy(self)
        keep = set(names)
        sub.params = {k: p for k, p in self.params.items() if k in keep}
        sub.P = sum(p.numel() for p in sub.params.values())
        return sub

    @property
    def where(self) -> str:
        """The current batch, as named in errors (``"batch 0"`` is the first)."""
        return f"batch {max(self.batches_seen - 1, 0)}"

    def forward(
        self, b: Batch, *, full: Batch | None = None, detach: bool = True
    ) -> torch.Tensor:
        """The model's output on ``b``, detached unless ``detach=False`` (the checks of
        :meth:`check_target` read its autograd node); ``full``: the user's batch when
        ``b`` is a one-sample probe of it, so that a failure reports the shapes the user
        passed."""
        # Grad mode on purpose: under no_grad, eval-mode nn.TransformerEncoderLayer takes
        # fused inference kernels whose outputs differ from the differentiable path
        # (NaN with some masks), and the MC labels must come from the same function.
        with torch.enable_grad():
            if full is not None and full is not b:
                try:
                    with internal_pass():
                        raw = self.model(*b.args, **b.kwargs)
                except Exception as exc:
                    self.probe_failed(exc, b, full)
            else:
                raw = call_model(self.model, b, self.where)
            out = self.output_fn(raw)
            return out.detach() if detach else out

    def probe_failed(self, exc: Exception, probe: Batch, full: Batch) -> NoReturn:
        """:func:`probe_failed` for this plan's model and current batch."""
        probe_failed(exc, self.model, probe, full, self.where)

    # -- per-sample function -----------------------------------------------------
    def per_sample(
        self,
        mode: str,
        arg_dims: tuple[int | None, ...],
        kw_dims: dict[str, int | None],
        n: int,
        nested: bool,
    ) -> Callable[..., dict[str, torch.Tensor]]:
        """A function of one sample returning its gradients ``(J, *param.shape)``
        (``mode="grads"``) or ``Σ_j w_j g_j²`` in the accumulation dtype (float64 for
        float64 parameters, else float32; ``mode="squares"``).

        ``arg_dims`` / ``kw_dims`` say which inputs are per-sample (see
        :class:`natgrad.engine.batch.Batch`); shared inputs reach the model unchanged.

        With ``nested``, a group of ``J`` label columns is pulled back by one ``vmap``
        inside the ``vmap`` over the ``n`` samples of the chunk (fast). Some batching
        rules confuse those two levels (``nn.PReLU``'s backward): sizes that differ
        then give an error or a wrong shape, which :meth:`run` catches, but equal
        sizes would mix samples with columns silently. So a group is never vmapped
        when ``J == n`` or ``J == 1``: its columns are pulled back one at a time,
        as are all of them without ``nested`` (no vmap inside the per-sample function).
        """
        model, output_fn, weight = self.model, self.output_fn, self.weight

        def pull(pullback: Callable[..., Any], c: torch.Tensor) -> dict[str, torch.Tensor]:
            if nested and c.shape[0] not in (1, n):
                g = vmap(pullback)(c)[0]
            else:
                gs = [pullback(u)[0] for u in c.unbind(0)]
                g = {k: torch.stack([gj[k] for gj in gs]) for k in gs[0]}
            return {k: v.to_dense() if v.is_sparse else v for k, v in g.items()}

        def fn(
            p: dict[str, torch.Tensor],
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            target: torch.Tensor | None,
            draws: torch.Tensor | None,
        ) -> dict[str, torch.Tensor]:
            args, kwargs = add_batch_axis(args, kwargs, arg_dims, kw_dims)
            target = as_one_sample(target)

            def f(pp: dict[str, torch.Tensor]) -> torch.Tensor:
                with internal_pass():
                    return output_fn(functional_call(model, pp, args, kwargs, strict=False))

            out, pullback = vjp_pair(f, p)
            cols = self.columns(out, target, as_one_sample(draws))
            if mode == "grads":
                gs = [pull(pullback, c.to(out.dtype)) for c in cols]
                return {k: torch.cat([g[k] for g in gs]) for k in p}
            acc: dict[str, torch.Tensor] | None = None
            for c in cols:
                g = pull(pullback, c.to(out.dtype))
                sq = {k: (to_acc(v) ** 2).sum(0) for k, v in g.items()}
                acc = sq if acc is None else {k: acc[k] + sq[k] for k in acc}
            assert acc is not None  # columns() yields at least one group
            return {k: v * weight for k, v in acc.items()} if weight != 1.0 else acc

        return fn

    def run(
        self,
        b: Batch,
        target: torch.Tensor | None,
        draws: torch.Tensor | None,
        mode: str,
        chunk_size: int | None,
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(n, result)`` for each chunk of ``n`` samples of the batch.

        ``result`` maps each parameter to ``(n, *param.shape)`` (squares) or
        ``(n, J, *param.shape)`` (grads), checked before it is returned. Three exact
        compositions, tried in turn; a failure (any error) or a result of another
        shape moves the plan to the next for the rest of its pass:

        1. ``vmap`` over samples, label columns in nested ``vmap`` groups;
        2. ``vmap`` over samples, label columns one at a time (no nesting);
        3. the exact per-sample loop: the same function one sample at a time, no
           ``vmap`` at all, with one warning naming the module and the error.

        If the loop fails too, its error (the model's own) propagates, without the
        warning; a loop result of the wrong shape raises.
        """
        K = self.k if self.labels == "mc" else 1
        chunk = check_int("chunk_size", chunk_size, 1, optional=True) or max(
            1, min(b.size, CHUNK_FLOATS // max(self.P * K, 1))
        )
        logger.debug(
            "per-sample %s: batch of %d in chunks of %d samples (P=%d, label columns %d), "
            "composition %d of 3",
            mode, b.size, chunk, self.P, K, self.tier + 1,
        )  # fmt: skip
        params = {k: p.detach() for k, p in self.params.items()}
        for start in range(0, b.size, chunk):
            stop = min(start + chunk, b.size)
            n = stop - start
            sub = b.select(start, stop)
            t = None if target is None else target[start:stop]
            d = None if draws is None else draws[start:stop]
            in_dims = (
                None,
                sub.arg_dims,
                sub.kw_dims,
                None if t is None else 0,
                None if d is None else 0,
            )
            args = (params, sub.args, sub.kwargs, t, d)
            why: Callable[[], str] | None = None
            arg_dims, kw_dims = b.dims()
            while self.tier < 2:
                fn = self.per_sample(mode, arg_dims, kw_dims, n, nested=self.tier == 0)
                try:
                    res = vmap(fn, in_dims=in_dims, randomness="different")(*args)
                except Exception as exc:  # noqa: BLE001 - the loop re-raises real errors
                    why = _vmap_why(self, exc, in_dims, args)
                else:
                    bad = bad_shape(res, self.params, n, mode)
                    if bad is None:
                        break
                    why = _returned_why(bad)
                self.tier += 1
            else:
                fn = self.per_sample(mode, arg_dims, kw_dims, 1, nested=False)
                res = loop_samples(fn, in_dims, args, n, self.params)
                bad = bad_shape(res, self.params, n, mode)
                if bad is not None:
                    raise RuntimeError(
                        f"The exact per-sample loop returned {bad}; natgrad does not return "
                        "a result of the wrong shape. Please report this model."
                    )
                if why is not None:  # switched to the loop on this chunk
                    warn_fallback(why())
            yield n, res


def _vmap_why(
    plan: Plan, exc: Exception, in_dims: tuple[Any, ...], args: tuple[Any, ...]
) -> Callable[[], str]:
    """The (lazy) reason for leaving ``vmap``: its error, naming the failing module."""
    return lambda: vmap_failure(plan.model, exc, lambda: _failing_module(plan, in_dims, args))


def _returned_why(bad: str) -> Callable[[], str]:
    """The (lazy) reason for leaving ``vmap``: a result of the wrong shape."""
    return lambda: f"vmap returned {bad}"


def bad_shape(
    res: dict[str, Any], params: Mapping[str, torch.Tensor], n: int, mode: str
) -> str | None:
    """A description of the first result whose shape is not ``(n, *param.shape)``
    (``mode="squares"``) or ``(n, J, *param.shape)`` with one ``J`` for all (grads)."""
    cols: set[int] = set()
    for k, p in params.items():
        v = res.get(k)
        shape = None if v is None else tuple(v.shape)
        if mode == "grads":
            ok = (
                shape is not None
                and len(shape) == p.dim() + 2
                and shape[0] == n
                and shape[2:] == tuple(p.shape)
            )
            if ok and shape is not None:
                cols.add(shape[1])
            want = f"({n}, J, {', '.join(map(str, p.shape))})"
        else:
            ok = shape == (n, *p.shape)
            want = str((n, *p.shape))
        if not ok or len(cols) > 1:
            return f"per-sample results of shape {shape} for {k!r} (expected {want})"
    return None


def warn_fallback(why: str) -> None:
    """The one warning of a switch from ``vmap`` to the exact per-sample loop."""
    logger.info("%s: exact per-sample loop from now on for this pass", why)
    warnings.warn(
        f"{why}. Falling back to an exact per-sample loop (one forward and backward pass "
        "per sample: the same result, slower).",
        RuntimeWarning,
        stacklevel=5,
    )


def vmap_failure(
    model: nn.Module,
    exc: BaseException,
    diagnose: Callable[[], nn.Module | None] | None = None,
) -> str:
    """Why ``vmap`` failed on ``model``: the module it failed in, and the error.

    The module is the innermost one whose forward was running when ``exc`` was
    raised; for an error in the backward pass, ``diagnose()`` (if given) names it.
    """
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "data-dependent control flow" in str(exc):
        return (
            f"vmap cannot trace {type(model).__name__}: it branches on tensor values (e.g. "
            "Hugging Face attention-mask checks); for speed, remove the branch (for Hugging "
            "Face encoders pass a 4-D boolean attention mask)"
        )
    names = {id(m): k for k, m in model.named_modules()}
    where = None
    tb = exc.__traceback__
    while tb is not None:  # the innermost module whose forward was running
        mod = tb.tb_frame.f_locals.get("self")
        if isinstance(mod, nn.Module) and id(mod) in names:
            where = mod
        tb = tb.tb_next
    if where is None and diagnose is not None:
        where = diagnose()
    if where is None or where is model:
        what = type(model).__name__
    else:
        what = f"module {names[id(where)]!r} ({type(where).__name__}) of {type(model).__name__}"
    return f"vmap cannot compute per-sample gradients of {what}: {type(exc).__name__}: {first[:200]}"


_DIAGNOSE_PARAMS = 256  # at most this many one-parameter probes to name a failing module


def _failing_module(
    plan: Plan, in_dims: tuple[Any, ...], args: tuple[Any, ...]
) -> nn.Module | None:
    """The module of the first parameter whose vmapped gradient alone fails (one sample)."""
    params, a, kw, t, d = args
    if len(params) > _DIAGNOSE_PARAMS:
        return None
    def first(x: Any, dim: int | None) -> Any:
        return x[:1] if dim == 0 else x

    one = (
        tuple(first(x, dim) for x, dim in zip(a, in_dims[1], strict=True)),
        {k: first(x, in_dims[2][k]) for k, x in kw.items()},
        None if t is None else t[:1],
        None if d is None else d[:1],
    )
    owners = {id(p): m for m in plan.model.modules() for p in m.parameters(recurse=False)}
    for name in params:
        fn = plan.restrict([name]).per_sample("squares", in_dims[1], in_dims[2], 1, nested=False)
        try:
            vmap(fn, in_dims=in_dims, randomness="different")({name: params[name]}, *one)
        except Exception:  # noqa: BLE001 - this parameter's module is the culprit
            return owners.get(id(plan.params[name]))
    return None


def hooked_output(
    model: nn.Module,
    b: Batch,
    output_fn: OutputFn,
    where: str,
    hooks: Iterable[tuple[nn.Module, Callable[..., Any]]],
    mode: contextlib.AbstractContextManager[Any] | None = None,
    *,
    grad: bool = True,
) -> torch.Tensor:
    """``output_fn`` of one forward of ``model`` on ``b`` with grad mode on (off when
    ``grad=False``) and a forward hook per ``(module, hook)`` pair of ``hooks`` for this
    pass only (removed even on failure), inside ``mode`` when one is given (e.g. a
    ``TorchFunctionMode`` that records free parameters). The one capture sequence of the
    capture path, K-FAC, Laplace and structured pruning's layer walks."""
    # first among each module's forward hooks: the hook sees the layer's own output, and a
    # forward hook of the user's that replaces it runs after, on what the hook returns
    handles = [m.register_forward_hook(h, prepend=True) for m, h in hooks]
    try:
        with torch.set_grad_enabled(grad), (mode if mode is not None else contextlib.nullcontext()):
            return output_fn(call_model(model, b, where))
    finally:
        for h in handles:
            h.remove()


def call_model(model: nn.Module, b: Batch, where: str) -> Any:
    """``model(*b.args, **b.kwargs)``; a failure of the model's own forward is re-raised
    naming ``where``, the inputs' shapes and dtypes and the parameters' dtypes
    (:func:`natgrad.engine.checks.forward_failed`), chained to the original."""
    try:
        with internal_pass():
            return model(*b.args, **b.kwargs)
    except Exception as exc:
        err = forward_failed(exc, model, b.args, b.kwargs, where)
        if err is exc:
            raise
        raise err from exc


def probe_failed(exc: Exception, model: nn.Module, probe: Batch, full: Batch, where: str) -> NoReturn:
    """Raise for a model forward that failed on ``probe``, a few samples cut from the
    user's batch ``full`` (natgrad probes one sample before ``vmap``): rerun on ``full``,
    whose error names the shapes the user passed; if ``full`` runs, the model fails on the
    probe's samples alone, which per-sample computations need, and the error says so."""
    with torch.enable_grad():
        call_model(model, full, where)
    where = f"{probe.size} sample(s) cut from {where} (the whole batch runs)"
    # a likely cause: the samples were read from the wrong entry (Batch.shared_hint)
    err = forward_failed(exc, model, probe.args, probe.kwargs, where, full.shared_hint())
    if err is exc:
        raise exc
    raise err from exc


def masked_target(lik: Likelihood, b: Batch) -> torch.Tensor | None:
    """The batch's target, with tokens whose label mask is 0 set to ``ignore_index``.

    Only ``token_categorical`` reads the mask; a masked batch without labels gets
    an all-zero target that carries the mask for ``mc`` / ``exact`` labels. The mask is
    :meth:`natgrad.engine.batch.Batch.label_mask` (``attention_mask``; for an
    encoder-decoder batch, ``decoder_attention_mask`` or none), read by
    :func:`natgrad.engine.batch.kept_positions`; it must cover the labels' ``(N, T)``
    positions exactly (never broadcast).

    Raises:
        ValueError: a mask of a shape :func:`~natgrad.engine.batch.kept_positions` does
            not read, or of another length than the labels.
    """
    target = b.target
    if not isinstance(lik, TokenCategorical):
        return target
    if not lik.shift and target is not None:
        warn_unshifted_lm_labels(target, b.args, b.kwargs, lik.ignore_index)
    found = b.label_mask()
    if found is None:
        return target
    key, mask = found
    keep = kept_positions(key, mask)
    if target is None:
        target = torch.zeros(keep.shape, dtype=torch.long, device=keep.device)
    elif target.dim() != 2:  # not token labels: the likelihood's check names them
        return target
    elif tuple(target.shape) != tuple(keep.shape):
        raise ValueError(
            f"The batch's {key!r} covers {tuple(keep.shape)} positions but the labels have "
            f"shape {tuple(target.shape)}: natgrad leaves out the label positions the mask "
            "marks 0, so it must have the labels' (N, T) shape. For an encoder-decoder "
            "model, attention_mask is the encoder's: pass the decoder's inputs as "
            "decoder_input_ids (natgrad then reads decoder_attention_mask, or no mask, and "
            "the labels' -100 entries mark the padding); otherwise give the mask and the "
            "labels the same length."
        )
    target = integer_labels(target, lik.name)  # uint8 cannot hold ignore_index
    return torch.where(keep, target, torch.full_like(target, lik.ignore_index))


def check_padding_read(lik: Likelihood, out: torch.Tensor, b: Batch) -> None:
    """Raise ValueError (warn for 2-D outputs) when the batch's label mask pads positions
    of per-position outputs that ``lik`` cannot leave out.

    ``token_categorical`` carries the padding in its labels (:func:`masked_target`);
    ``gaussian`` and ``bernoulli`` sum over every output, so outputs with one row per position,
    ``(N, T, ...)`` or ``(N, T)`` with ``T`` the mask's length, would count the padded
    positions in the Fisher and the loss. ``(N, T, ...)`` outputs are refused; ``(N, T)``
    ones warn (an ``(N, D)`` head whose ``D`` equals ``T`` by chance cannot be told apart
    from per-position values, and is right). A
    :class:`~natgrad.engine.likelihoods.CustomLikelihood` or other likelihood reads what
    its ``nll`` reads and is not checked. One host sync, on batches whose mask has a
    readable shape.
    """
    if not isinstance(lik, (Gaussian, Bernoulli)) or out.dim() < 2:
        return  # before reading the batch's mask: this runs on every batch
    found = b.label_mask()
    if found is None:
        return
    key, mask = found
    try:
        keep = kept_positions(key, mask)
    except ValueError:  # a mask natgrad does not read as padding: not read
        return
    if tuple(out.shape[1:2]) != tuple(keep.shape[1:]) or bool(keep.all()):
        return
    what = (
        f"The batch's {key!r} {tuple(mask.shape)} marks padded positions, and the model's "
        f"{tuple(out.shape)} outputs have one row per position, but the {lik.name} "
        "likelihood sums over every output: the padded positions would count in the "
        "Fisher and the loss. natgrad leaves padding out only for token_categorical "
        "(whose labels carry it). Pass sequences without padding (batches of equal "
        "length), or a natgrad.CustomLikelihood whose nll(output, target) leaves the "
        "padded positions out (e.g. with the mask as an extra channel of the target)."
    )
    if out.dim() >= 3:  # (N, T, D): rows per position, unambiguously
        raise ValueError(what)
    # (N, T): per-position values, or an (N, D) head whose D equals T by chance (a pooled
    # multi-label or regression head, which is right): warned, not refused
    warnings.warn(
        what + f" If the {out.shape[1]} outputs are not positions (an (N, D) head whose D "
        "equals the mask's length by chance), the Fisher is right: a "
        "natgrad.CustomLikelihood with the same nll silences this.",
        UserWarning,
        stacklevel=2,
    )


def mean_loss_grad(
    model: nn.Module,
    batch: Any,
    likelihood: str | Likelihood,
    names: Sequence[str],
    *,
    output_fn: OutputFn | None = None,
    what: str = "the batch",
) -> tuple[dict[str, torch.Tensor], int]:
    """``∇θ L`` of the mean loss ``L = (1/N) Σ_n l_n`` over ``batch``, and ``N``.

    One ordinary forward and backward pass (``.grad`` is not touched); padding is left
    out as in the Fisher (:func:`masked_target`). Gradients come in the accumulation
    dtype (float64 stays float64, else float32); parameters that do not reach the loss
    get zeros.

    Raises:
        ValueError: the batch has no labels (named by ``what``), or they do not fit.
        FloatingPointError: a non-finite gradient.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> g, n = mean_loss_grad(model, (torch.randn(3, 2), torch.tensor([0, 1, 1])), "categorical", ["bias"])
        >>> n, g["bias"].shape
        (3, torch.Size([2]))
    """
    lik = get_likelihood(likelihood)
    named = dict(model.named_parameters())
    b = parse_batch(batch).to(model_device(model))
    if b.target is None:
        raise ValueError(
            f"{what} has no labels: the loss gradient needs the data's labels, but the batch "
            "has none; pass (x, y) or a dict with 'labels'."
        )
    target = masked_target(lik, b)
    assert target is not None  # b.target was checked above
    params = [named[k] for k in names]
    with torch.enable_grad():
        out = (output_fn or default_output_fn)(call_model(model, b, what))
        check_padding_read(lik, out, b)
        target = lik.prepare_target(out, target)
        losses = check_per_sample_loss(lik.nll(out, target), out, lik.name)
        grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
    res: dict[str, torch.Tensor] = {}
    for k, p, g in zip(names, params, grads, strict=True):
        res[k] = to_acc(torch.zeros_like(p) if g is None else g.detach())
        check_finite(f"the gradient of {what}'s loss for {k!r}", res[k])
    return res, b.size


def loop_samples(
    fn: Callable[..., Any],
    in_dims: tuple[Any, ...],
    args: tuple[Any, ...],
    n: int,
    params: Iterable[str],
) -> Any:
    """``vmap(fn, in_dims)(*args)`` computed one sample at a time (no tracing of the model).

    ``fn`` may return any pytree of tensors; each leaf is stacked over the ``n`` samples.
    What ``torch.func`` cannot differentiate in the model (checkpointing, saved-tensor
    hooks, a custom autograd.Function without ``setup_context``) is raised by name
    (:func:`natgrad.engine.checks.torch_func_refusal`, naming ``params``), chained to
    torch.func's error; any other error of ``fn`` is raised as is.
    """

    def take(x: Any, dim: Any, i: int) -> Any:
        if dim is None:
            return x
        if isinstance(x, tuple):
            return tuple(take(v, dv, i) for v, dv in zip(x, dim, strict=True))
        if isinstance(x, dict):
            return {k: take(v, dim[k], i) for k, v in x.items()}
        return x[i]

    try:
        outs = [fn(*(take(a, d, i) for a, d in zip(args, in_dims, strict=True))) for i in range(n)]
    except Exception as exc:
        named = torch_func_refusal(exc, params)
        if named is None:
            raise
        raise named from exc
    leaves, spec = tree_flatten(outs[0])
    stacked = [torch.stack(col) for col in zip(*(tree_flatten(o)[0] for o in outs), strict=True)]
    return tree_unflatten(stacked if leaves else [], spec)


@overload
def as_one_sample(t: torch.Tensor) -> torch.Tensor: ...


@overload
def as_one_sample(t: None) -> None: ...


@overload
def as_one_sample(t: torch.Tensor | None) -> torch.Tensor | None: ...


def as_one_sample(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with a batch axis of size 1 (a per-sample target or label draw inside vmap)."""
    return t.unsqueeze(0) if isinstance(t, torch.Tensor) else t


@with_autograd
def per_sample_grads(
    model: nn.Module,
    batch: Any,
    likelihood: str | Likelihood = "categorical",
    **options: Unpack[EstimatorOptions],
) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients ``g_n = ∇θ l_n`` of the per-sample negative log-likelihood.

    ``l_n(θ) = -log p(y_n | x_n, θ)``, summed over all outputs of sample ``n`` (all
    kept tokens of a sequence), never from a batch-mean gradient. Parameters of
    ``nn.Linear``, ``nn.Conv1d/2d``, eval-mode BatchNorm, ``nn.LayerNorm`` and
    ``nn.Embedding`` modules come from one batched forward that records each layer's
    input ``a`` and one backward pass per label column for its output gradients ``b``:
    ``g_n = Σ_t b_nt a_ntᵀ`` (Conv: over unfolded patches; see
    :mod:`natgrad.engine.capture_grads`). Every other parameter is computed with
    ``torch.func`` per sample, with the same labels.

    Args:
        model: any ``nn.Module``; BatchNorm must be in eval mode. Train-mode dropout is
            allowed here (unlike in the Fisher estimators): each sample draws its own mask,
            as in a batched forward, so ``g_n`` is the gradient of sample ``n``'s training
            loss for that draw.
        batch: ``(x, y)``, ``x`` / ``(x,)`` (with ``labels="mc"`` or ``"exact"``), or a
            dict such as ``{"input_ids", "attention_mask", "labels"}``. Integer labels of
            any width (uint8, int32) are cast to int64, which is exact. Entries without
            the batch dimension (or wrapped in :func:`natgrad.shared`) are passed to
            every sample whole.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"``,
            ``"token_categorical"`` or a :class:`natgrad.engine.likelihoods.Likelihood`.
        **options: the estimator options (:class:`natgrad.EstimatorOptions`):
            ``labels``, ``mc_samples``, ``params``, ``chunk_size``, ``generator``,
            ``output_fn``, ``engine`` (``"auto"``: the capture path where it applies,
            ``torch.func`` for the rest; ``"fast"``: the same, but an error when no
            parameter qualifies; ``"vmap"``: ``torch.func`` for every parameter; the
            engines agree to float tolerance and use the same MC draws).

    Warns:
        RuntimeWarning: once, when ``vmap`` fails on the model (e.g. ``nn.GRU``) and the
            exact per-sample loop computes the rest.

    Returns:
        ``{name: tensor}`` of shape ``(N, *param.shape)``; with ``labels="exact"``, or
        ``"mc"`` with ``mc_samples > 1``, shape ``(N, K, *param.shape)``: for ``mc``, one
        unweighted gradient per draw; for ``exact``, ``g_nk = J_nᵀ s_k`` for the ``K``
        columns of a factor ``Σ_k s_k s_kᵀ`` of the output Fisher (``K = C - 1`` for a
        ``C``-class softmax, one per output for Bernoulli and Gaussian), so that
        ``E_y[g_n g_nᵀ] = Σ_k g_nk g_nkᵀ``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; inputs are Python lists.
        ValueError: train-mode BatchNorm; a meta-device model; an empty batch; labels
            out of range (checked on the whole batch before any ``vmap``, naming the
            sample and value), of the wrong dtype or shape, or non-finite targets; an
            unknown ``engine``, or ``engine="fast"`` with no parameter it covers.
        FloatingPointError: a non-finite per-sample gradient, naming the parameter and
            the first bad sample.
        Exception: the model's own forward failure, re-raised (same type) naming the
            batch, the inputs' shapes and dtypes and the parameters' dtypes.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
        >>> g = per_sample_grads(model, (x, y))
        >>> g["weight"].shape
        torch.Size([5, 2, 3])
    """
    # capture_grads imports this module: imported here, at call time
    from natgrad.engine.capture import RowsNotSamples, cached_split, drop_modules
    from natgrad.engine.capture_grads import capture_grads, grads_split

    opts = Options.resolve("per_sample_grads", options)
    plan = Plan.from_options(model, likelihood, opts, what="per_sample_grads")
    b, target = plan.parse(batch)
    split = grads_split(plan, b, opts.engine)
    finite: set[str] = set()  # proven finite without reading every entry
    res: dict[str, torch.Tensor] | None = None
    while split is not None and res is None:
        try:
            res, finite = capture_grads(plan, split, b, target, opts.chunk_size)
        except RowsNotSamples as exc:  # index routing: those layers on vmap from now on
            logger.info("capture: %s", exc)
            drop_modules(cached_split(plan, b), exc.modules, plan)
            new = grads_split(plan, b, opts.engine)
            split = None if new is None or any(m in new.fast for m in exc.modules) else new
    if res is None:
        target, draws = plan.labels_of(b, target)
        chunks = [r for _, r in plan.run(b, target, draws, "grads", opts.chunk_size)]
        res = {k: torch.cat([c[k] for c in chunks]) for k in plan.params}
    squeeze = plan.labels == "empirical" or (plan.labels == "mc" and plan.k == 1)
    out = {k: g.squeeze(1) if squeeze else g for k, g in res.items()}
    unproven = {k: g for k, g in out.items() if k not in finite}
    check_finite_per_sample(unproven, (*b.args, *b.kwargs.values()))
    return out


def square_sums(
    plan: Plan, batches: Iterable[Any], chunk_size: int | None
) -> Iterable[tuple[int, dict[str, torch.Tensor]]]:
    """For each batch, yield ``(n, Σ_n Σ_j w_j g_nj²)`` (general vmap path), in the
    accumulation dtype: float64 for float64 parameters, else float32."""
    for batch in batches:
        b, target, draws = plan.prepare(batch)
        acc = {k: torch.zeros_like(p, dtype=acc_dtype(p.dtype)) for k, p in plan.params.items()}
        for _, res in plan.run(b, target, draws, "squares", chunk_size):
            for k in acc:
                acc[k] += res[k].sum(0)
        yield b.size, acc
