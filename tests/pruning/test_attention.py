"""HeadAttention against nn.MultiheadAttention (cases found by review)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from natgrad.pruning.attention import from_multihead


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_head_attention_returns_the_weights_multihead_attention_returns(batch_first, average):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    att = from_multihead(mha)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, -2:] = True
    with torch.no_grad():
        want = mha(x, x, x, key_padding_mask=pad, average_attn_weights=average)
        got = att(x, x, x, key_padding_mask=pad, average_attn_weights=average)
        default = att(x, x, x)  # need_weights=True by default, as in nn.MultiheadAttention
        none = att(x, x, x, need_weights=False)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(default[1], mha(x, x, x)[1])
    assert none[1] is None
