"""Independent references for tests: brute-force loops, dense matrices and closed forms.

Nothing here uses natgrad's engine: one ordinary backward pass per sample (and per
label), in float64 where the caller casts the model.
"""

from __future__ import annotations

import torch
from torch import nn

from natgrad.curvature.protocol import Curvature


def loop_grads(model: nn.Module, loss_fn, inputs, targets, names=None) -> dict[str, torch.Tensor]:
    """Per-sample gradients by one backward pass per sample: ``loss_fn(model(x_n), y_n)``."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    out = {k: [] for k in names}
    n = len(targets) if targets is not None else _size(inputs)
    for i in range(n):
        model.zero_grad(set_to_none=True)
        xi = _take(inputs, i)
        yi = None if targets is None else targets[i : i + 1]
        out_i = model(**xi) if isinstance(xi, dict) else model(xi)
        loss_fn(out_i, yi).backward()
        for k in names:
            g = named[k].grad
            out[k].append(torch.zeros_like(named[k]) if g is None else g.detach().clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def exact_categorical_fisher_loop(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(1/N) Σ_n Σ_c p_nc (∇θ log p_nc)²`` by one backward per sample and class."""
    named = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in named.items()}
    for i in range(len(x)):
        with torch.no_grad():
            p = model(x[i : i + 1]).softmax(-1)[0]
        for c in range(p.shape[0]):
            model.zero_grad(set_to_none=True)
            model(x[i : i + 1]).log_softmax(-1)[0, c].backward()
            for k, q in named.items():
                acc[k] += p[c] * q.grad**2
    return {k: v / len(x) for k, v in acc.items()}


def ce_sum(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="sum")


def _size(inputs):
    if isinstance(inputs, dict):
        return next(iter(inputs.values())).shape[0]
    return inputs.shape[0]


def _take(inputs, i):
    if isinstance(inputs, dict):
        return {k: v[i : i + 1] for k, v in inputs.items()}
    return inputs[i : i + 1]


def assert_close_dict(a, b, rtol=1e-5, atol=1e-7):
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        torch.testing.assert_close(
            a[k], b[k].to(a[k].dtype), rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
        )


def flatten_params(d, names) -> torch.Tensor:
    """Concatenate ``{name: tensor}`` into one flat float64 vector in ``names`` order."""
    return torch.cat([d[k].detach().reshape(-1).double() for k in names])


def unflatten_params(flat: torch.Tensor, shapes: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_params` for ``{name: shape}`` (dict order)."""
    out, i = {}, 0
    for k, shape in shapes.items():
        m = 1
        for s in shape:
            m *= int(s)
        out[k] = flat[i : i + m].reshape(shape)
        i += m
    return out


def dense_from_mv(curv, shapes: dict) -> torch.Tensor:
    """The dense float64 matrix of a curvature, column by column: ``D e_i = curv.mv(e_i)``."""
    names = list(shapes)
    p = sum(int(torch.Size(s).numel()) for s in shapes.values())
    cols = []
    for i in range(p):
        e = torch.zeros(p, dtype=torch.float64)
        e[i] = 1.0
        cols.append(flatten_params(curv.mv(unflatten_params(e, shapes)), names))
    return torch.stack(cols, 1)


def dense_fisher(grads: dict[str, torch.Tensor], names) -> torch.Tensor:
    """``(1/N) Σ_n g_n g_nᵀ`` in float64 from per-sample gradients ``{name: (N, *shape)}``."""
    g = torch.cat([grads[k].reshape(grads[k].shape[0], -1).double() for k in names], 1)
    return g.T @ g / g.shape[0]


def loop_grads_by(model: nn.Module, sample_loss, n: int, names=None) -> dict[str, torch.Tensor]:
    """Per-sample gradients by one backward pass per sample of ``sample_loss(i)``.

    ``sample_loss(i)`` runs the model on sample ``i`` however the caller needs (shared
    tensors passed whole, per-sample ones sliced) and returns the scalar loss ``l_i``.
    """
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    out = {k: [] for k in names}
    for i in range(n):
        model.zero_grad(set_to_none=True)
        sample_loss(i).backward()
        for k in names:
            g = named[k].grad
            if g is not None and g.is_sparse:  # Embedding(sparse=True)
                g = g.to_dense()
            out[k].append(torch.zeros_like(named[k]) if g is None else g.detach().clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def exact_categorical_fisher_by(model: nn.Module, sample_logits, n: int) -> dict[str, torch.Tensor]:
    """``(1/N) Σ_n Σ_c p_nc (∇θ log p_nc)²``, one backward per sample and class, where
    ``sample_logits(i)`` returns the logits ``(C,)`` of sample ``i``."""
    named = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in named.items()}
    for i in range(n):
        with torch.no_grad():
            p = sample_logits(i).softmax(-1)
        for c in range(p.shape[0]):
            model.zero_grad(set_to_none=True)
            sample_logits(i).log_softmax(-1)[c].backward()
            for k, q in named.items():
                if q.grad is not None:
                    acc[k] += p[c] * q.grad**2
    model.zero_grad(set_to_none=True)
    return {k: v / n for k, v in acc.items()}


def fisher_from_grads(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher ``(1/N) Σ_n g_n²`` of per-sample gradients ``(N, ...)``."""
    return {k: (g**2).mean(0) for k, g in grads.items()}


def dense_label_fisher(model: nn.Module, x, likelihood: str, draws=None) -> torch.Tensor:
    """``(1/N) Σ_n E_y[g_n g_nᵀ]`` (dense, float64) by one backward per sample and label.

    ``likelihood``: ``"categorical"`` (``Σ_c p_c ∇log p_c ∇log p_cᵀ``), ``"gaussian"``
    (σ = 1: ``Σ_d ∇f_d ∇f_dᵀ``) or ``"bernoulli"`` (``Σ_d p_d(1 - p_d) ∇f_d ∇f_dᵀ``), the
    expectation in closed form; or, with ``draws`` ``(N, k, ...)``, the mean over the
    drawn labels of the empirical outer products.
    """
    named = dict(model.named_parameters())
    params = list(named.values())
    n = x.shape[0]
    P = sum(p.numel() for p in params)
    D = torch.zeros(P, P, dtype=torch.float64)

    def grad(scalar):
        gs = torch.autograd.grad(scalar, params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in gs]).double()

    for i in range(n):
        out = model(x[i : i + 1])[0]
        if draws is not None:
            k = draws.shape[1]
            for j in range(k):
                y = draws[i, j]
                if likelihood == "categorical":
                    nll = -out.log_softmax(-1)[y]
                elif likelihood == "gaussian":
                    nll = 0.5 * ((out - y) ** 2).sum()
                else:
                    nll = torch.nn.functional.binary_cross_entropy_with_logits(
                        out, y.to(out.dtype), reduction="sum"
                    )
                g = grad(nll)
                D += torch.outer(g, g) / k
            continue
        if likelihood == "categorical":
            p = out.softmax(-1).detach()
            for c in range(out.shape[0]):
                g = grad(-out.log_softmax(-1)[c])
                D += p[c] * torch.outer(g, g)
        else:
            p = torch.sigmoid(out).detach()
            for d in range(out.shape[0]):
                g = grad(out[d])
                w = 1.0 if likelihood == "gaussian" else p[d] * (1 - p[d])
                D += w * torch.outer(g, g)
    return D / n


def check_against_dense(curv, shapes: dict, dense: torch.Tensor, lam: float = 0.3, tol=None):
    """Every Curvature method of ``curv`` against the dense matrix ``dense`` (float64)."""
    names = list(shapes)
    kw = {} if tol is None else {"rtol": tol, "atol": tol}
    torch.testing.assert_close(dense_from_mv(curv, shapes), dense, **kw)
    gen = torch.Generator().manual_seed(1)
    vf = torch.randn(dense.shape[0], dtype=torch.float64, generator=gen)
    v = unflatten_params(vf, shapes)
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    inv = torch.linalg.inv(dense + lam * eye)
    torch.testing.assert_close(flatten_params(curv.solve(v, lam), names), inv @ vf, **kw)
    torch.testing.assert_close(curv.quad(v).double(), vf @ dense @ vf, **kw)
    torch.testing.assert_close(flatten_params(curv.diagonal(), names), dense.diagonal(), **kw)
    torch.testing.assert_close(
        flatten_params(curv.inverse_diagonal(lam), names), inv.diagonal(), **kw
    )
    torch.testing.assert_close(
        curv.logdet(lam).double(), torch.linalg.slogdet(dense + lam * eye).logabsdet, **kw
    )

class DenseCurvature(Curvature):
    """A test-only :class:`natgrad.Curvature` held as one dense float64 PSD matrix.

    ``DenseCurvature(matrix, shapes, n)``: ``matrix`` is ``P x P`` over the parameters
    ``shapes = {name: shape}`` flattened in that order (as :func:`flatten_params`);
    ``n`` is ``n_samples``. Every method is the textbook dense formula (``torch.linalg``),
    an independent reference for the uses written against the protocol. Vectors may
    name a subset of the parameters: missing names count as zero, and results cover
    every parameter. Not registered as a kind (the contract tests do not pick it up).
    """

    kind = "dense"

    def __init__(self, matrix, shapes, n_samples=1, structure_kind="dense"):
        m = torch.as_tensor(matrix, dtype=torch.float64)
        self.matrix = 0.5 * (m + m.T)
        self.shapes = {k: torch.Size(s) for k, s in shapes.items()}
        p = sum(s.numel() for s in self.shapes.values())
        assert self.matrix.shape == (p, p), (self.matrix.shape, p)
        self.n_samples = int(n_samples)
        self._kind = structure_kind

    @classmethod
    def estimate(cls, model, data, likelihood="categorical", **options):
        """Empirical Fisher ``(1/N) Σ g_n g_nᵀ`` by one backward per sample."""
        x, y = data
        names = options.get("names") or [k for k, _ in model.named_parameters()]
        grads = loop_grads(model, ce_sum, x, y, names)
        named = dict(model.named_parameters())
        shapes = {k: named[k].shape for k in names}
        return cls(dense_fisher(grads, names), shapes, len(y))

    def _flat(self, v):
        dt = next(iter(v.values())).dtype if v else torch.float64
        dt = torch.promote_types(dt, torch.float64)
        parts = []
        for k, s in self.shapes.items():
            if k in v:
                parts.append(v[k].reshape(-1).to(dt))
            else:
                parts.append(torch.zeros(s.numel(), dtype=dt))
        extra = [k for k in v if k not in self.shapes]
        if extra:
            raise ValueError(f"names not covered: {extra}")
        return torch.cat(parts)

    def _unflat(self, flat, like):
        out = unflatten_params(flat, self.shapes)
        dt = next(iter(like.values())).dtype if like else torch.float64
        return {k: t.to(dt) for k, t in out.items()}

    def mv(self, v):
        return self._unflat(self.matrix @ self._flat(v), v)

    def solve(self, v, damping):
        eye = torch.eye(self.matrix.shape[0], dtype=torch.float64)
        return self._unflat(torch.linalg.solve(self.matrix + damping * eye, self._flat(v)), v)

    def quad(self, v):
        f = self._flat(v)
        return f @ (self.matrix.to(f.dtype) @ f)

    def diagonal(self):
        return unflatten_params(torch.diagonal(self.matrix).clone(), self.shapes)

    def inverse_diagonal(self, damping):
        eye = torch.eye(self.matrix.shape[0], dtype=torch.float64)
        inv = torch.linalg.inv(self.matrix + damping * eye)
        return unflatten_params(torch.diagonal(inv).clone(), self.shapes)

    def logdet(self, damping):
        eye = torch.eye(self.matrix.shape[0], dtype=torch.float64)
        return torch.linalg.slogdet(self.matrix + damping * eye)[1]

    def structure(self):
        return {k: self._kind for k in self.shapes}

    def __add__(self, other):
        n = self.n_samples + other.n_samples
        m = (self.n_samples * self.matrix + other.n_samples * other.matrix) / n
        return type(self)(m, self.shapes, n, self._kind)

    def __mul__(self, scalar):
        return type(self)(float(scalar) * self.matrix, self.shapes, self.n_samples, self._kind)

    def ema(self, other, decay):
        m = decay * self.matrix + (1 - decay) * other.matrix
        return type(self)(m, self.shapes, self.n_samples + other.n_samples, self._kind)

    def to(self, *args, **kwargs):
        return self

    def state_dict(self):
        return {"matrix": self.matrix.clone(), "shapes": dict(self.shapes),
                "n_samples": self.n_samples}

    def load_state_dict(self, state):
        self.__init__(state["matrix"], state["shapes"], state["n_samples"], self._kind)

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["matrix"], state["shapes"], state["n_samples"])

    def all_reduce(self, group=None):
        return self



def dense_copy(curv, shapes: dict, kind: str = "dense") -> DenseCurvature:
    """A :class:`DenseCurvature` holding ``curv``'s matrix read off through ``mv``."""
    return DenseCurvature(dense_from_mv(curv, shapes), shapes, curv.n_samples, kind)


def random_diag_fisher(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """A positive random diagonal Fisher ``{name: U(0, 1)}`` shaped like the parameters."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}


def output_jacobian(model: nn.Module, x: torch.Tensor, names) -> torch.Tensor:
    """``(N, D, P)`` Jacobian of every output w.r.t. the parameters ``names`` (flattened
    in that order, as :func:`flatten_params`): one backward per sample and output."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        out = model(x[i : i + 1]).reshape(-1)
        per_out = []
        for c in range(out.shape[0]):
            g = torch.autograd.grad(out[c], [params[k] for k in names], retain_graph=True,
                                    allow_unused=True)
            g = [torch.zeros_like(params[k]) if gk is None else gk for k, gk in zip(names, g, strict=True)]
            per_out.append(flatten_params(dict(zip(names, g, strict=True)), names))
        rows.append(torch.stack(per_out))
    return torch.stack(rows)
