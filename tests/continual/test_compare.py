import json
import math

import numpy as np
import pytest
import torch

from natgrad import compare_task_fisher


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_overlap_dense(f1: np.ndarray, f2: np.ndarray) -> float:
    """1 - Frechet distance of N(0, A), N(0, B), unit-trace A, B, via dense matrix roots."""
    a, b = np.diag(f1 / f1.sum()), np.diag(f2 / f2.sum())
    ra = _psd_sqrt(a)
    cross = _psd_sqrt(ra @ b @ ra)
    return 1.0 - 0.5 * float(np.trace(a + b - 2 * cross))


def _cos(u, v):
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def _rand(seed, zero_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    f = {
        "enc.weight": torch.rand(4, 3, generator=g),
        "enc.bias": torch.rand(4, generator=g),
        "head.weight": torch.rand(2, 4, generator=g),
    }
    if zero_frac:
        f["enc.weight"][0] = 0.0
    return f


def test_self_comparison_is_perfect():
    f = _rand(0)
    r = compare_task_fisher(f, f, top_k=5)
    assert r.cosine == pytest.approx(1.0)
    assert r.frechet_overlap == pytest.approx(1.0)
    assert r.topk_jaccard == 1.0
    assert r.task2vec_distance == pytest.approx(0.0, abs=1e-12)
    for layer in r.per_layer.values():
        assert layer.cosine == pytest.approx(1.0) and layer.frechet_overlap == pytest.approx(1.0)
        assert layer.topk_jaccard == 1.0
    assert sorted(r.per_layer) == ["enc", "head"]
    assert r.numel == 12 + 4 + 8 and r.top_k == 5
    json.dumps(r.to_dict())


def test_against_dense_references():
    f1, f2 = _rand(1, zero_frac=0.3), _rand(2)
    r = compare_task_fisher(f1, f2, top_k=6)
    a = np.concatenate([v.numpy().ravel() for v in f1.values()]).astype(np.float64)
    b = np.concatenate([v.numpy().ravel() for v in f2.values()]).astype(np.float64)
    assert r.cosine == pytest.approx(_cos(a, b), rel=1e-9)
    s = a + b
    assert r.task2vec_distance == pytest.approx(1 - _cos(a / s, b / s), rel=1e-9)
    assert r.frechet_overlap == pytest.approx(_frechet_overlap_dense(a, b), rel=1e-6)
    ta, tb = set(np.argsort(-a, kind="stable")[:6]), set(np.argsort(-b, kind="stable")[:6])
    assert r.topk_jaccard == pytest.approx(len(ta & tb) / len(ta | tb))
    # per layer: the head alone
    ha, hb = f1["head.weight"].double().numpy().ravel(), f2["head.weight"].double().numpy().ravel()
    head = r.per_layer["head"]
    assert head.cosine == pytest.approx(_cos(ha, hb), rel=1e-9)
    assert head.frechet_overlap == pytest.approx(_frechet_overlap_dense(ha, hb), rel=1e-6)
    assert head.top_k == 6 and head.numel == 8


def test_closed_forms_on_two_coordinates():
    r = compare_task_fisher(
        {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}, top_k=1
    )
    assert r.cosine == pytest.approx(0.6)
    assert r.task2vec_distance == pytest.approx(0.4)
    assert r.frechet_overlap == pytest.approx(2 * math.sqrt(0.25 * 0.75))
    assert r.topk_jaccard == 0.0
    d = compare_task_fisher({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])})
    assert (d.cosine, d.task2vec_distance, d.frechet_overlap) == (0.0, 1.0, 0.0)


def test_proportional_and_symmetric():
    f1 = _rand(3)
    f2 = {k: 5.0 * v for k, v in f1.items()}
    r = compare_task_fisher(f1, f2)
    assert r.task2vec_distance == pytest.approx(0.0, abs=1e-12)
    assert r.frechet_overlap == pytest.approx(1.0) and r.cosine == pytest.approx(1.0)
    g = _rand(4)
    x, y = compare_task_fisher(f1, g, top_k=0.25), compare_task_fisher(g, f1, top_k=0.25)
    assert x.to_dict() == y.to_dict()
    assert x.top_k == math.ceil(0.25 * 24) and x.per_layer["head"].top_k == 2


def test_zero_layer_gives_nan_and_json_none():
    f1 = _rand(5)
    f2 = dict(_rand(6))
    f2["head.weight"] = torch.zeros(2, 4)
    r = compare_task_fisher(f1, f2)
    assert math.isnan(r.per_layer["head"].cosine)
    assert math.isnan(r.per_layer["head"].frechet_overlap)
    assert math.isnan(r.per_layer["head"].topk_jaccard)
    assert r.to_dict()["per_layer"]["head"]["cosine"] is None
    assert 0.0 < r.frechet_overlap < 1.0


def test_errors():
    f = _rand(0)
    with pytest.raises(ValueError, match="Parameter names or shapes differ between fisher1"):
        compare_task_fisher(f, {"enc.weight": f["enc.weight"]})
    bad = dict(f)
    bad["enc.bias"] = torch.rand(5)
    with pytest.raises(ValueError, match=r"enc.bias: \(4,\) vs \(5,\)"):
        compare_task_fisher(f, bad)
    with pytest.raises(ValueError, match="an integer top_k is a count and must be >= 1"):
        compare_task_fisher(f, f, top_k=0)
    with pytest.raises(ValueError, match=r"fraction of the coordinates in \(0, 1\]"):
        compare_task_fisher(f, f, top_k=1.5)
    with pytest.raises(TypeError, match="top_k must be an int or a float"):
        compare_task_fisher(f, f, top_k="10")
    zero = {k: torch.zeros_like(v) for k, v in f.items()}
    with pytest.raises(ValueError, match="fisher2 is zero everywhere"):
        compare_task_fisher(f, zero)
    neg = {k: -v for k, v in f.items()}
    with pytest.raises(ValueError, match="fisher1 has negative"):
        compare_task_fisher(neg, f)
    with pytest.raises(ValueError, match="empty"):
        compare_task_fisher({}, {})


def test_jaccard_ranks_only_the_support():
    """Zeros ranked by position filled both top-k sets when a Fisher had fewer than k
    non-zeros: disjoint supports scored 1.0 (found by review). Reference: the Jaccard of
    the hand-built support sets."""
    f1 = {"w": torch.tensor([1.0] + [0.0] * 9)}
    f2 = {"w": torch.tensor([0.0, 1.0] + [0.0] * 8)}
    assert compare_task_fisher(f1, f2, top_k=3).topk_jaccard == 0.0
    g = torch.Generator().manual_seed(0)
    a, b = torch.zeros(1000), torch.zeros(1000)
    ia, ib = torch.randperm(1000, generator=g)[:20], torch.randperm(1000, generator=g)[:20]
    a[ia], b[ib] = torch.rand(20, generator=g) + 0.1, torch.rand(20, generator=g) + 0.1
    sa, sb = set(ia.tolist()), set(ib.tolist())
    r = compare_task_fisher({"w": a}, {"w": b})  # k = 50 > 20 non-zeros each
    assert r.top_k == 50 and r.topk_jaccard == pytest.approx(len(sa & sb) / len(sa | sb))
