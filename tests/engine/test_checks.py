import numpy as np
import pytest

from natgrad.engine.checks import check_int


def test_check_int_accepts_integers_and_rejects_the_rest():
    assert check_int("k", 3, 1) == 3
    assert check_int("k", np.int64(2), 1) == 2
    assert check_int("chunk_size", None, 1, optional=True) is None
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"Invalid k: .*; it must be an integer >= 1\.$"):
            check_int("k", bad, 1)
    with pytest.raises(ValueError, match=r"it must be an integer >= 1 or None\."):
        check_int("chunk_size", 0, 1, optional=True)
