"""Bundled real datasets for examples, the demo and benchmarks (generated locally, never downloaded).

* MNIST-1D (``pip install mnist1d``): 40-dimensional 1-D signals of the digits 0-9,
  4000 train / 1000 test, made by ``mnist1d.data.make_dataset(get_dataset_args())``.
* scikit-learn's digits: 1797 8x8 images bundled with scikit-learn.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Split", "load_mnist1d", "load_digits"]


@dataclass
class Split:
    """Train and test tensors (float32 inputs, int64 labels)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def subset(self, classes: Iterable[int]) -> Split:
        """Only the samples whose label is in ``classes``."""
        keep_tr = torch.isin(self.y_train, torch.as_tensor(list(classes)))
        keep_te = torch.isin(self.y_test, torch.as_tensor(list(classes)))
        return Split(
            self.x_train[keep_tr], self.y_train[keep_tr], self.x_test[keep_te], self.y_test[keep_te]
        )


def load_mnist1d(seed: int = 42) -> Split:
    """MNIST-1D with the package's default arguments (4000 train / 1000 test), standardized.

    Raises:
        ImportError: with the install command, when ``mnist1d`` is missing.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d") from None
    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    x, xt = np.asarray(d["x"], dtype=np.float32), np.asarray(d["x_test"], dtype=np.float32)
    mu, sd = x.mean(), x.std()
    return Split(
        torch.from_numpy((x - mu) / sd),
        torch.from_numpy(np.asarray(d["y"], dtype=np.int64)),
        torch.from_numpy((xt - mu) / sd),
        torch.from_numpy(np.asarray(d["y_test"], dtype=np.int64)),
    )


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits as flat 64-vectors scaled to [0, 1], split at random."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise ImportError(
            "The digits data set needs scikit-learn: pip install scikit-learn"
        ) from None
    d = _load()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return Split(x[tr], y[tr], x[te], y[te])
