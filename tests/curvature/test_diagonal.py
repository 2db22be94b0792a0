"""DiagonalFisher: arithmetic, state, files and top coordinates."""

import pytest
import torch
from torch import nn

from natgrad import DiagonalFisher, estimate_fisher, top_coordinates
from tests.conftest import mlp


def _fisher(n=3, scale=1.0):
    return DiagonalFisher(
        {"a.weight": torch.arange(6.0).view(2, 3) * scale, "a.bias": torch.ones(2) * scale}, n
    )


def test_arithmetic():
    f, g = _fisher(3, 1.0), _fisher(1, 5.0)
    h = f + g
    assert h.n_samples == 4
    torch.testing.assert_close(h["a.bias"], torch.full((2,), (3 * 1 + 1 * 5) / 4))
    torch.testing.assert_close((2 * f)["a.weight"], f["a.weight"] * 2)
    torch.testing.assert_close(f.ema(g, 0.9)["a.bias"], torch.full((2,), 0.9 + 0.1 * 5))
    assert f.total() == pytest.approx(15 + 2)
    assert f.normalize().total() == pytest.approx(1.0)
    assert f.layer_totals() == {"a": pytest.approx(17.0)}
    with pytest.raises(ValueError, match="decay"):
        f.ema(g, 1.5)
    with pytest.raises(ValueError, match="only in right Fisher: b"):
        f + DiagonalFisher({**dict(f), "b": torch.ones(1)}, 1)
    with pytest.raises(ValueError, match="all zero"):
        (0 * f).normalize()


def test_state_dict_round_trip():
    f = _fisher()
    g = DiagonalFisher.from_state_dict(f.state_dict())
    assert g.n_samples == f.n_samples and list(g) == list(f)
    assert all(torch.equal(f[k], g[k]) for k in f)


def test_save_load_bit_exact(tmp_path, mlp_case):
    model, x, y = mlp_case
    F = estimate_fisher(model, (x, y), labels="exact")
    path = tmp_path / "f.safetensors"
    F.save(path)
    G = DiagonalFisher.load(path, model)
    assert G.n_samples == F.n_samples and G.labels == "exact" and G.likelihood == "categorical"
    assert list(G) == list(F) and all(torch.equal(F[k], G[k]) for k in F)
    assert not list(tmp_path.glob(".fisher-*"))  # no temporary file left behind


def test_load_against_other_model_names_differences(tmp_path, mlp_case):
    model, x, y = mlp_case
    path = tmp_path / "f.safetensors"
    estimate_fisher(model, (x, y)).save(path)
    with pytest.raises(ValueError, match=r"shapes differ.*0.weight: \(7, 5\) vs \(9, 5\)"):
        DiagonalFisher.load(path, mlp((5, 9, 4)))
    with pytest.raises(
        ValueError,
        match=r"parameters the model lacks: \['0.weight', '0.bias', '2.weight', '2.bias'\]",
    ):
        DiagonalFisher.load(path, nn.Sequential(nn.Identity(), nn.Linear(5, 4)).double())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No Fisher file"):
        DiagonalFisher.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        DiagonalFisher.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    with pytest.raises(ValueError, match="not a natgrad Fisher"):
        DiagonalFisher.load(other)


def test_top_coordinates():
    f = DiagonalFisher(
        {"a": torch.tensor([[0.5, 9.0], [3.0, 0.0]]), "b": torch.tensor([4.0, 3.0])}, 1
    )
    assert top_coordinates(f, 3) == [("a", (0, 1), 9.0), ("b", (0,), 4.0), ("a", (1, 0), 3.0)]
    assert len(top_coordinates(f, 100)) == 6
    with pytest.raises(ValueError, match="k"):
        top_coordinates(f, 0)


def test_ema_in_place_writes_the_average_into_the_fisher():
    a = DiagonalFisher({"w": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0])}, 3)
    b = DiagonalFisher({"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([6.0])}, 5,
                       labels="mc")
    w = a["w"]
    out = a.ema_(b, 0.75)
    assert out is a and a["w"] is w  # the same tensors, overwritten
    torch.testing.assert_close(a["w"], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 4]))
    torch.testing.assert_close(a["b"], torch.tensor([0.75 * 2 + 0.25 * 6]))
    assert a.n_samples == 8 and a.labels == "mixed"
    torch.testing.assert_close(b["w"], torch.tensor([3.0, 0.0]))  # other untouched
    with pytest.raises(ValueError, match="decay"):
        a.ema_(b, 1.5)


def test_ema_in_place_of_a_subclass_with_its_own_ema_is_that_ema():
    class Halved(DiagonalFisher):
        def ema(self, other, decay):
            return Halved({k: 0.5 * (self[k] + other[k]) for k in self}, 1)

    a = Halved({"w": torch.tensor([1.0])}, 1)
    out = a.ema_(Halved({"w": torch.tensor([3.0])}, 1), 0.9)
    assert out is not a and isinstance(out, Halved)
    torch.testing.assert_close(out["w"], torch.tensor([2.0]))
    torch.testing.assert_close(a["w"], torch.tensor([1.0]))


@pytest.mark.parametrize(("saved", "model_dtype"), [(torch.float32, torch.float64),
                                                    (torch.float64, torch.float32)])
def test_load_follows_the_model_dtype(tmp_path, saved, model_dtype):
    """With a model, loaded values take the model's accumulation dtype (the exact cast of
    the stored values); without one they keep the file's dtype; nothing else changes."""
    torch.manual_seed(0)
    stored = {"0.weight": torch.rand(3, 2, dtype=saved), "0.bias": torch.rand(3, dtype=saved)}
    DiagonalFisher(stored, 7, labels="mc", likelihood="gaussian").save(tmp_path / "f.st")
    model = nn.Sequential(nn.Linear(2, 3)).to(model_dtype)
    G = DiagonalFisher.load(tmp_path / "f.st", model)
    assert list(G) == ["0.weight", "0.bias"]
    for k, v in stored.items():
        assert G[k].dtype == model_dtype
        assert torch.equal(G[k], v.to(model_dtype))  # elementwise cast, nothing else
    assert (G.n_samples, G.labels, G.likelihood) == (7, "mc", "gaussian")
    H = DiagonalFisher.load(tmp_path / "f.st")  # no model: the file's dtype
    assert all(H[k].dtype == saved and torch.equal(H[k], v) for k, v in stored.items())
    assert all(p.dtype == model_dtype for p in model.parameters())  # the model is untouched


def test_top_coordinates_ranks_float64_values_in_float64():
    # every value was cast to float32: 1+1e-12 and 1+2e-12 tied with 1 (wrong order),
    # 1e39 reported as inf, 1e-50 tied with 0; found by review
    f = {"w": torch.tensor([1 + 1e-12, 1.0, 1 + 2e-12, 1e39, 1e-50, 0.0], dtype=torch.float64)}
    got = top_coordinates(f, 6)
    assert [idx for _, idx, _ in got] == [(3,), (2,), (0,), (1,), (4,), (5,)]
    assert got[0][2] == 1e39 and got[1][2] == 1 + 2e-12 and got[4][2] == 1e-50
