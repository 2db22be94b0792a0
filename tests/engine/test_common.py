"""natgrad.engine.common.psd_solve against float64 references (linalg.solve, pinv)."""

from __future__ import annotations

import torch

from natgrad.engine.common import psd_solve


def test_singular_systems_get_the_minimum_norm_solution_even_when_cholesky_finishes():
    # Gram matrices of rank d - 1: rounding lets Cholesky finish on about half of them
    # (with a pivot near eps·max), whose solve was up to 25x off the minimum-norm one
    # (found by review); with singular=True every one must equal pinv(A) b
    finished = 0
    for d in (12, 64):
        for seed in range(40):
            g = torch.Generator().manual_seed(seed)
            X = torch.randn(d - 1, d, generator=g, dtype=torch.float64)
            A = X.T @ X
            b = A @ torch.randn(d, 2, generator=g, dtype=torch.float64)  # consistent
            finished += int(torch.linalg.cholesky_ex(A)[1]) == 0
            want = torch.linalg.pinv(A, hermitian=True) @ b
            torch.testing.assert_close(psd_solve(A, b, singular=True), want, rtol=1e-7,
                                       atol=1e-9)
    assert finished > 0  # the case under test occurred


def test_ill_conditioned_positive_definite_systems_keep_every_component():
    # a pivot threshold once sent these to the pseudo-inverse, which zeroed the small
    # direction (found by review): float64 diag(1e6, 1e-11) and float32 with a 1e-6 ratio
    A = torch.diag(torch.tensor([1e6, 1e-11], dtype=torch.float64))
    x = psd_solve(A, A @ torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(x, torch.ones(2, 1, dtype=torch.float64), rtol=1e-6, atol=0)
    A32 = torch.diag(torch.cat([torch.full((99,), 1e3), torch.tensor([1e-3])]))
    x32 = psd_solve(A32, A32 @ torch.ones(100, 1))
    torch.testing.assert_close(x32, torch.ones(100, 1), rtol=1e-5, atol=0)


def test_positive_definite_and_batched_systems_are_solved_exactly():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 30, 8, generator=g, dtype=torch.float64)
    A = X.transpose(1, 2) @ X + 1e-3 * torch.eye(8, dtype=torch.float64)  # (3, 8, 8)
    b = torch.randn(3, 8, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(psd_solve(A, b), torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    # singular members: the batch's minimum-norm solutions
    A[1] = X[1, :3].T @ X[1, :3]
    b[1] = A[1] @ b[1]
    got = psd_solve(A, b, singular=True)
    torch.testing.assert_close(got[1], torch.linalg.pinv(A[1], hermitian=True) @ b[1],
                               rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got[0], torch.linalg.solve(A[0], b[0]), rtol=1e-8, atol=1e-10)


def test_module_list_is_modules_in_order_with_shared_and_missing_children():
    # random module graphs: shared submodules reached from several parents (and from a
    # deeper and a shallower place), None children; module_list is list(model.modules())
    import random

    from torch import nn

    from natgrad.engine.common import module_list

    rng = random.Random(0)
    for _ in range(200):
        pool = [nn.Module() for _ in range(rng.randint(1, 9))]
        for i, m in enumerate(pool):  # children only from later modules: no cycles
            for j in range(rng.randint(0, 3)):
                if i + 1 < len(pool):
                    child = pool[rng.randint(i + 1, len(pool) - 1)] if rng.random() > 0.1 else None
                    m.register_module(f"c{j}", child)
        root = pool[0]
        assert [id(m) for m in module_list(root)] == [id(m) for m in root.modules()]
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2)))
    assert module_list(seq) == list(seq.modules())
