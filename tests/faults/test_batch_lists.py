"""A Python list of tensors is ONE batch [x, y] (a DataLoader's batch is a list): a
failure of that reading says so, and a silent misreading (labels not read) warns."""

import warnings

import pytest
import torch

import natgrad


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


class _Tok(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = torch.nn.Embedding(11, 8)
        self.lin = torch.nn.Linear(8, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.e(ids)))


def test_list_of_float_batches_error_names_the_one_batch_reading() -> None:
    xa, xb = torch.randn(10, 6), torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"was read as one \(x, y\) batch; to pass several batches"):
        natgrad.estimate_fisher(_mlp(), [xa, xb], labels="exact")


def test_list_of_batches_error_for_kfac_too() -> None:
    xa, xb = torch.randn(10, 6), torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"list of tuples"):
        natgrad.estimate_curvature(_mlp(), [xa, xb], kind="kfac", labels="exact")


@pytest.mark.parametrize("labels", ["exact", "mc"])
def test_list_of_two_id_batches_warns_labels_ignored(labels: str) -> None:
    torch.manual_seed(0)
    a, b = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
    with pytest.warns(UserWarning, match=rf"read as one batch \(x, y\); its second tensor is ignored as labels under labels='{labels}'"):
        F = natgrad.estimate_fisher(_Tok(), [a, b], likelihood="token_categorical", labels=labels)
    assert F.n_samples == 6  # the reading the warning describes


def test_tuple_and_list_of_tuples_do_not_warn() -> None:
    torch.manual_seed(0)
    a, b = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
    model = _Tok()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = natgrad.estimate_fisher(model, (a, b), likelihood="token_categorical", labels="exact")
        two = natgrad.estimate_fisher(model, [(a,), (b,)], likelihood="token_categorical",
                                      labels="exact")
        both = natgrad.estimate_fisher(model, torch.cat([a, b]), likelihood="token_categorical",
                                       labels="exact")
    assert one.n_samples == 6 and two.n_samples == 12
    for k in two:
        torch.testing.assert_close(two[k], both[k])


def test_empirical_list_batch_is_read_without_warning() -> None:
    # [x, y] is how a DataLoader collates a batch: it stays one batch, read silently
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F = natgrad.estimate_fisher(model, [x, y])
    ref = natgrad.estimate_fisher(model, (x, y))
    assert F.n_samples == 10
    for k in F:
        torch.testing.assert_close(F[k], ref[k])
