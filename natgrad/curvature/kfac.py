"""K-FAC: Kronecker factors of the Fisher for Linear and Conv layers.

For a layer ``s = W a (+ b)`` with per-sample loss ``l_n`` and output gradient
``b_n = ∂l_n/∂s_n``, the per-sample weight gradient is ``g_n = b_n ãₙᵀ`` where
``ã = [a; 1]`` when the layer has a (selected) bias, so weight and bias form one matrix
``[W, b]`` of shape ``(d_out, d_in [+1])``. K-FAC approximates the Fisher of that matrix,
flattened row-major (``V.reshape(-1)``, PyTorch's order), by

    ``F ≈ G ⊗ A``,   ``A = (1/(N·T)) Σ_{n,t} ã_{n,t} ã_{n,t}ᵀ``,   ``G = (1/N) Σ_{n,t} Σ_j b_{n,t,j} b_{n,t,j}ᵀ``

(``torch.kron(G, A)``; in column-major ``vec`` notation this is the usual ``A ⊗ G``).

* ``t`` runs over the ``T`` positions sharing the weight: ``T = 1`` for a Linear layer on
  ``(N, d_in)``, the tokens of ``(N, *, d_in)`` inputs, and the output locations of a
  convolution, whose inputs ``a_{n,t}`` are the unfolded patches (``F.unfold``; ordering
  ``(C_in, k_h, k_w)`` as in ``W.reshape(d_out, -1)``). This is the "expand" convention
  (KFC, Grosse & Martens 2016; Eschenhagen et al. 2023): positions act like extra samples
  in ``G`` and are averaged in ``A``. A module called several times in one forward pass
  contributes each call's positions.
* ``j`` runs over the label source's output cotangents: the data label (``empirical``),
  one predictive draw (``mc``), or the columns ``s_j`` of the output Fisher's factor
  (``exact``), so that ``Σ_j b_j b_jᵀ`` is ``E_y[b bᵀ]`` in closed form.

The factors are captured in one forward pass, whose output also gives the ``mc`` draws
(module forward hooks record the inputs; each hooked output is replaced by a clone so
that in-place activations after it do not disturb its gradient), and one backward pass
per cotangent with ``torch.autograd.grad`` with respect to the layer outputs;
parameters' ``.grad`` are never touched. Supported:
``nn.Linear``, and ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1``, ``padding_mode='zeros'``
and integer padding. Everything else is left to the diagonal Fisher.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    >>> f = kfac_factors(model, (x, y))
    >>> f["0"].A.shape, f["0"].G.shape, f["2"].A.shape
    (torch.Size([4, 4]), torch.Size([4, 4]), torch.Size([5, 5]))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from natgrad.engine.batch import OutputFn
from natgrad.engine.checks import check_choice, check_fixed_model
from natgrad.engine.common import to_acc
from natgrad.engine.likelihoods import Likelihood
from natgrad.engine.per_sample import ParamSpec, Plan, call_model
from natgrad.engine.report import Report

__all__ = [
    "KFACLayer",
    "KroneckerFactors",
    "kfac_layers",
    "kfac_factors",
    "kfac_eigen",
    "kfac_solve",
    "KFAC_DAMPING",
    "kfac_factored_inverses",
    "layer_matrix",
    "split_layer_matrix",
]


@dataclass
class KFACLayer:
    """A layer K-FAC covers: module name, module, weight name, bias name (or None)."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None


@dataclass
class KroneckerFactors(Report):
    """``A`` ``(d_in[+1], d_in[+1])`` and ``G`` ``(d_out, d_out)`` of one layer.

    float32 (float64 for float64 models).

    ``n_samples`` is ``N``; ``positions`` is ``T`` (summed over calls of the module).
    """

    A: torch.Tensor
    G: torch.Tensor
    n_samples: int
    positions: int


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


def kfac_layers(
    model: nn.Module, selected: Mapping[str, nn.Parameter]
) -> tuple[dict[str, KFACLayer], list[str]]:
    """Split the selected parameters into K-FAC layers and the rest.

    A supported module (see the module docstring) is a K-FAC layer when its weight is
    selected; its bias joins it when selected too. Weights shared by several modules,
    and every other selected parameter, are returned in the rest (names, model order).

    Args:
        model: the model.
        selected: ``{name: parameter}`` as from :func:`natgrad.select_params`.

    Returns:
        ``({module name: KFACLayer}, [other parameter names])``.

    Example:
        >>> import torch
        >>> from natgrad import select_params
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
        >>> layers, rest = kfac_layers(model, select_params(model))
        >>> list(layers), rest
        (['0'], ['1.weight', '1.bias'])
    """
    name_of = {id(p): k for k, p in selected.items()}
    users: dict[int, int] = {}
    for _, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            users[id(w)] = users.get(id(w), 0) + 1
    layers: dict[str, KFACLayer] = {}
    for mname, m in model.named_modules():
        if not _supported(m) or id(m.weight) not in name_of or users[id(m.weight)] > 1:
            continue
        bias = m.bias if isinstance(m.bias, nn.Parameter) else None
        bname = name_of.get(id(bias)) if bias is not None else None
        layers[mname] = KFACLayer(mname, m, name_of[id(m.weight)], bname)
    covered = {n for lay in layers.values() for n in (lay.weight, lay.bias) if n}
    return layers, [k for k in selected if k not in covered]


def _patches(layer: KFACLayer, x: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(N, T, d_in[+1])`` (float32, or float64) (unfolded patches for convolutions)."""
    m = layer.module
    if isinstance(m, nn.Linear):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    elif isinstance(m, nn.Conv1d):
        u = F.unfold(
            x.unsqueeze(2),
            (1, m.kernel_size[0]),
            dilation=(1, m.dilation[0]),
            padding=(0, m.padding[0]),
            stride=(1, m.stride[0]),
        )
        a = u.transpose(1, 2)
    else:
        u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        a = u.transpose(1, 2)
    a = to_acc(a)
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a


def _out_grads(layer: KFACLayer, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as ``(N, T, d_out)`` (float32, or float64)."""
    if isinstance(layer.module, nn.Linear):
        return to_acc(g.reshape(g.shape[0], -1, g.shape[-1]))
    return to_acc(g.flatten(2).transpose(1, 2))


def _cotangents(plan: Plan, out: torch.Tensor, target, draws) -> list[torch.Tensor]:
    lik = plan.lik
    o = out.detach()
    if plan.labels == "empirical":
        return [lik.output_grad(o, target)]
    if plan.labels == "mc":
        return [lik.output_grad(o, draws[:, 0])]
    k = lik.num_factor_columns(o)
    return list(lik.factor_columns(o, 0, k, target).unbind(0))


def kfac_factors(
    model: nn.Module,
    batch: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    labels: str = "empirical",
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
    layers: Mapping[str, KFACLayer] | None = None,
) -> dict[str, KroneckerFactors]:
    """K-FAC factors ``A``, ``G`` of every supported layer, from one batch.

    See the module docstring for the definitions (``F ≈ G ⊗ A`` row-major, "expand"
    convention for convolutions and sequences).

    Args:
        model: the model (BatchNorm in eval mode); not modified.
        batch: ``(x, y)``, ``x`` or a dict batch.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        labels: ``"empirical"``, ``"mc"`` (one draw per sample) or ``"exact"``.
        params: parameters to cover (see :func:`natgrad.select_params`).
        generator: for ``"mc"`` draws (default: seeded with 0).
        output_fn: maps model outputs to the output tensor.
        layers: the layers to capture, as from :func:`kfac_layers` (default: computed from
            ``params``; pass them to skip that work when calling repeatedly).

    Returns:
        ``{module name: KroneckerFactors}``; a layer the forward pass never called gets
        zero factors.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: train-mode BatchNorm or dropout (K-FAC needs a deterministic model:
            call ``model.eval()``), bad labels (checked on the whole batch), a batch
            without labels for ``"empirical"``, or a layer output that does not depend
            on the parameters.
    """
    check_fixed_model(model, "kfac_factors")
    plan = Plan(model, likelihood, labels, 1, params, output_fn, generator, what="kfac_factors")
    if layers is None:
        layers, _ = kfac_layers(model, plan.params)
    b, target = plan.parse(batch)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name):
        def fn(module, args, output):
            if not output.requires_grad:
                raise ValueError(
                    f"Layer {name!r}'s output does not require grad, so K-FAC cannot capture "
                    "its output gradient; select only parameters with requires_grad=True."
                )
            inputs[name].append(args[0].detach())
            outputs[name].append(output)
            return output.clone()

        return fn

    handles = [lay.module.register_forward_hook(hook(n)) for n, lay in layers.items()]
    try:
        with torch.enable_grad():
            out = plan.output_fn(call_model(model, b, plan.where))
    finally:
        for h in handles:
            h.remove()
    target = plan.check_target(out, target)
    draws = plan.draw(out, target) if plan.labels == "mc" else None
    names = [n for n in layers if outputs[n]]
    flat_outs = [o for n in names for o in outputs[n]]
    acts = {n: torch.cat([_patches(layers[n], x) for x in inputs[n]], 1) for n in names}
    n_samples = b.size
    G = {n: None for n in names}
    cots = _cotangents(plan, out, target, draws) if flat_outs else []
    for j, cot in enumerate(cots):
        grads = torch.autograd.grad(
            out,
            flat_outs,
            grad_outputs=cot.to(out.dtype),
            retain_graph=j < len(cots) - 1,
            allow_unused=True,
        )
        i = 0
        for n in names:
            parts = []
            for o, g in zip(outputs[n], grads[i : i + len(outputs[n])], strict=True):
                parts.append(_out_grads(layers[n], torch.zeros_like(o) if g is None else g))
            i += len(outputs[n])
            bt = torch.cat(parts, 1).reshape(-1, parts[0].shape[-1])
            gg = bt.T @ bt
            G[n] = gg if G[n] is None else G[n] + gg
    result = {}
    for n, lay in layers.items():
        w = lay.module.weight
        d_out = w.shape[0]
        d_in = w[0].numel() + (1 if lay.bias is not None else 0)
        if n in acts:
            a = acts[n]
            T = a.shape[1]
            a2 = a.reshape(-1, a.shape[-1])
            A = a2.T @ a2 / (n_samples * T)
            Gn = G[n] / n_samples
        else:
            T = 0
            dt = to_acc(w.detach()).dtype
            A = torch.zeros(d_in, d_in, device=w.device, dtype=dt)
            Gn = torch.zeros(d_out, d_out, device=w.device, dtype=dt)
        result[n] = KroneckerFactors(A, Gn, n_samples, T)
    return result


def layer_matrix(
    layer: KFACLayer, grads: Mapping[str, torch.Tensor | None], dtype=torch.float32
) -> torch.Tensor:
    """The layer's gradient as the matrix ``[∇W, ∇b]`` of shape ``(d_out, d_in[+1])``.

    Missing (``None``) gradients count as zeros.

    Example:
        >>> import torch
        >>> lay = KFACLayer("", torch.nn.Linear(2, 1), "weight", "bias")
        >>> layer_matrix(lay, {"weight": torch.ones(1, 2), "bias": torch.tensor([3.0])})
        tensor([[1., 1., 3.]])
    """
    w = layer.module.weight
    gw = grads.get(layer.weight)
    gw = torch.zeros_like(w) if gw is None else gw
    V = gw.reshape(w.shape[0], -1).to(dtype)
    if layer.bias is not None:
        gb = grads.get(layer.bias)
        gb = torch.zeros(w.shape[0], device=w.device, dtype=dtype) if gb is None else gb
        V = torch.cat([V, gb.reshape(-1, 1).to(dtype)], dim=1)
    return V


def split_layer_matrix(layer: KFACLayer, V: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`layer_matrix`: ``{weight name: ..., bias name: ...}``.

    Example:
        >>> import torch
        >>> lay = KFACLayer("", torch.nn.Linear(2, 1), "weight", "bias")
        >>> split_layer_matrix(lay, torch.tensor([[1.0, 2.0, 3.0]]))
        {'weight': tensor([[1., 2.]]), 'bias': tensor([3.])}
    """
    w = layer.module.weight
    if layer.bias is None:
        return {layer.weight: V.reshape(w.shape)}
    return {layer.weight: V[:, :-1].reshape(w.shape), layer.bias: V[:, -1].contiguous()}


def kfac_eigen(A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eigendecompositions ``A = Q_A diag(d_A) Q_Aᵀ``, ``G = Q_G diag(d_G) Q_Gᵀ``.

    Eigenvalues are clamped at zero (the factors are positive semi-definite).

    Returns:
        ``{"QA", "dA", "QG", "dG"}``.

    Example:
        >>> import torch
        >>> kfac_eigen(torch.diag(torch.tensor([2.0, 1.0])), torch.eye(1))["dA"]
        tensor([1., 2.])
    """
    dA, QA = torch.linalg.eigh(A)
    dG, QG = torch.linalg.eigh(G)
    return {"QA": QA, "dA": dA.clamp_min(0), "QG": QG, "dG": dG.clamp_min(0)}


KFAC_DAMPING = ("factored", "exact")


def _pi(ma: float, mg: float) -> float:
    return (ma / mg) ** 0.5 if ma > 0 and mg > 0 else 1.0


def kfac_factored_inverses(
    A: torch.Tensor, G: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((G + (√λ/π) I)^-1, (A + π√λ I)^-1)`` for factored Tikhonov damping.

    ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (1 when either trace is 0). Then
    ``Ginv @ V @ Ainv`` equals ``kfac_solve(kfac_eigen(A, G), V, λ, "factored")`` (both
    factors are symmetric), at the cost of two Cholesky factorizations instead of two
    eigendecompositions.

    Example:
        >>> import torch
        >>> Ginv, Ainv = kfac_factored_inverses(torch.eye(2), torch.eye(1), 0.25)
        >>> Ginv, Ainv.diagonal()
        (tensor([[0.6667]]), tensor([0.6667, 0.6667]))
    """
    s = damping**0.5
    pi = _pi(float(A.diagonal().mean()), float(G.diagonal().mean()))

    def inv(M: torch.Tensor, shift: float) -> torch.Tensor:
        Ms = M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        L, info = torch.linalg.cholesky_ex(Ms)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
        return torch.linalg.pinv(Ms, hermitian=True)

    return inv(G, s / pi), inv(A, s * pi)


def kfac_solve(
    eig: Mapping[str, torch.Tensor], V: torch.Tensor, damping: float, mode: str = "exact"
) -> torch.Tensor:
    """Solve with the damped Kronecker factors; returns a matrix like ``V``.

    With the eigendecompositions of :func:`kfac_eigen` and row-major ``vec``:

    * ``mode="exact"``: ``(G ⊗ A + λI)^-1 vec(V)``, damping added to every eigenvalue
      ``d_G,i d_A,j`` of the Kronecker product: ``Q_G [(Q_Gᵀ V Q_A) / (d_G d_Aᵀ + λ)] Q_Aᵀ``.
    * ``mode="factored"`` (factored Tikhonov damping, Martens & Grosse 2015, §6.3):
      ``((G + (√λ/π) I) ⊗ (A + π√λ I))^-1 vec(V)`` with
      ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (``π = 1`` when either trace is 0), i.e.
      denominators ``(d_G,i + √λ/π)(d_A,j + π√λ)``. It damps low-curvature directions
      more strongly than ``exact``.

    Raises:
        ValueError: unknown ``mode``.

    Example:
        >>> import torch
        >>> eig = kfac_eigen(torch.eye(2) * 2, torch.eye(1) * 3)
        >>> kfac_solve(eig, torch.ones(1, 2), 0.0)
        tensor([[0.1667, 0.1667]])
    """
    check_choice("K-FAC damping mode", mode, KFAC_DAMPING)
    QA, dA, QG, dG = eig["QA"], eig["dA"], eig["QG"], eig["dG"]
    V = V.to(QA.dtype)
    inner = QG.T @ V @ QA
    if mode == "exact":
        denom = dG.unsqueeze(1) * dA.unsqueeze(0) + damping
    else:
        pi = _pi(float(dA.mean()), float(dG.mean()))
        s = damping**0.5
        denom = (dG + s / pi).unsqueeze(1) * (dA + s * pi).unsqueeze(0)
    return QG @ (inner / denom) @ QA.T
