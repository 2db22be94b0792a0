"""Shared small models and data (float64 unless a test says otherwise)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """2 conv + linear on 1x8x8 inputs."""

    def __init__(self, classes=4):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.flatten(1))


class EmbedNorm(nn.Module):
    """Embedding + LayerNorm + mean-pool + linear, on token ids (N, T)."""

    def __init__(self, vocab=11, d=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)).mean(1))


class TinyEncoder(nn.Module):
    """2-layer transformer encoder classifier; takes input_ids and attention_mask."""

    def __init__(self, vocab=13, d=8, classes=3, per_token=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab if per_token else classes)
        self.per_token = per_token

    def forward(self, input_ids, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        h = self.enc(self.emb(input_ids), src_key_padding_mask=pad)
        if self.per_token:
            return self.head(h)
        if attention_mask is None:
            return self.head(h.mean(1))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class RoutedMoE(nn.Module):
    """Top-1 mixture of experts with index routing: ``out[idx == e] = expert_e(x[idx == e])``.

    Inputs ``(N, D)`` are routed per sample; inputs ``(N, T, D)`` per token (each
    expert then runs on the tokens routed to it, and their outputs are summed over T).
    """

    def __init__(self, d=4, experts=3, out=3):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, out) for _ in range(experts))
        self.out = out

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        idx = self.router(flat).argmax(-1)
        y = flat.new_zeros(flat.shape[0], self.out)
        for e, expert in enumerate(self.experts):
            sel = idx == e
            y[sel] = expert(flat[sel])
        return y.reshape(*x.shape[:-1], self.out).sum(1) if x.dim() == 3 else y


def mlp(sizes=(5, 7, 4), act=nn.Tanh):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def mlp_case():
    torch.manual_seed(0)
    model = mlp().double()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    return model, x, y


@pytest.fixture
def cnn_case():
    torch.manual_seed(0)
    model = TinyCNN().double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    return model, x, y


@pytest.fixture
def embed_case():
    torch.manual_seed(0)
    model = EmbedNorm().double()
    x = torch.randint(0, 11, (7, 5))
    y = torch.randint(0, 3, (7,))
    return model, x, y


@pytest.fixture
def encoder_case():
    torch.manual_seed(0)
    model = TinyEncoder().double().eval()
    ids = torch.randint(0, 13, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    y = torch.randint(0, 3, (5,))
    return model, ids, mask, y
