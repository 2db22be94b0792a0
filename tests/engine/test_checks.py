import warnings

import numpy as np
import pytest
import torch

from natgrad.engine.checks import check_int, warn_unshifted_lm_labels


def test_check_int_accepts_integers_and_rejects_the_rest():
    assert check_int("k", 3, 1) == 3
    assert check_int("k", np.int64(2), 1) == 2
    assert check_int("chunk_size", None, 1, optional=True) is None
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"Invalid k: .*; it must be an integer >= 1\.$"):
            check_int("k", bad, 1)
    with pytest.raises(ValueError, match=r"it must be an integer >= 1 or None\."):
        check_int("chunk_size", 0, 1, optional=True)


def test_unshifted_lm_labels_warn_only_when_they_equal_the_ids():
    ids = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    labels = ids.masked_fill(ids == 0, -100)
    with pytest.warns(UserWarning, match="labels equal the input ids"):
        warn_unshifted_lm_labels(labels, (), {"input_ids": ids}, -100)
    with pytest.warns(UserWarning, match="labels equal the input ids"):
        warn_unshifted_lm_labels(labels, (ids,), {}, -100)  # a (ids, labels) tuple batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlm = torch.full_like(ids, -100)
        mlm[0, 1] = 9  # masked LM: the label is the original token, the input [MASK]
        warn_unshifted_lm_labels(mlm, (), {"input_ids": ids}, -100)
        one = torch.full_like(ids, -100)
        one[0, 0] = 3  # a single kept token is no evidence
        warn_unshifted_lm_labels(one, (), {"input_ids": ids}, -100)
        warn_unshifted_lm_labels(labels + 1, (), {"input_ids": ids}, -100)
        warn_unshifted_lm_labels(labels, (ids.float(),), {}, -100)


@pytest.mark.parametrize("nonneg", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_all_finite_names_the_first_non_finite_tensor(nonneg, bad):
    # nonneg=True (sums of squares) decides by the largest entry instead of the sum: NaN
    # and +inf are both caught and located, with the index and the count.
    from natgrad.engine.checks import check_all_finite

    ts = {"a": torch.rand(3, 4), "b": torch.rand(5), "c": torch.rand(2, 2)}
    check_all_finite(ts, "the sums of", "Fix it.", nonneg=nonneg)  # finite: passes
    ts["b"][3] = bad
    ts["c"][1, 0] = bad
    with pytest.raises(FloatingPointError, match=rf"the sums of 'b': {bad} at index \(3,\) \(1 of 5"):
        check_all_finite(ts, "the sums of", "Fix it.", nonneg=nonneg)


def test_check_all_finite_nonneg_passes_entries_whose_sum_overflows():
    # finite entries near the float32 maximum: their sum overflows to inf (the sum test
    # finds no culprit and passes), their maximum does not
    from natgrad.engine.checks import check_all_finite

    big = {"w": torch.full((4,), 3e38)}
    check_all_finite(big, "x", "y", nonneg=True)
    check_all_finite(big, "x", "y")
