"""Tiny float64 models and data shared by the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import TensorDataset

DTYPE = torch.float64


class BatchCentred(nn.Module):
    """Subtracts the batch mean: each loss depends on the whole batch (factoring refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        return self.fc2(h - h.mean(0, keepdim=True))


def make_data(n: int = 24, d: int = 5, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    w = torch.randn(d, classes, generator=g, dtype=DTYPE)
    logits = x @ w + 0.5 * torch.randn(n, classes, generator=g, dtype=DTYPE)
    return TensorDataset(x, logits.argmax(dim=1))


def make_regression_data(n: int = 20, d: int = 4, out: int = 2, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    y = x @ torch.randn(d, out, generator=g, dtype=DTYPE) + 0.1 * torch.randn(
        n, out, generator=g, dtype=DTYPE
    )
    return TensorDataset(x, y)


def linear_model(d: int = 5, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, classes)).to(DTYPE)


def mlp_model(d: int = 5, hidden: int = 4, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(d, hidden))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(hidden, classes))
    return model.to(DTYPE)


def bn_model(d: int = 5, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(d, 6))
    model.add_module("bn", nn.BatchNorm1d(6))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(6, classes))
    model = model.to(DTYPE)
    # non-trivial running statistics
    with torch.no_grad():
        model.train()
        model(torch.randn(32, d, dtype=DTYPE) * 2 + 1)
    return model


def ce_loss() -> nn.Module:
    return nn.CrossEntropyLoss(reduction="none")


def mse_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).sum(dim=1)


def save_checkpoint(model: nn.Module, path, learning_rate: float = 0.1) -> str:
    """Write ``model``'s weights as a checkpoint ``checkpoints_load_func`` reads; the path."""
    torch.save({"model_state": model.state_dict(), "learning_rate": learning_rate}, path)
    return str(path)


def snapshot(model: nn.Module) -> dict:
    """Everything about a model the library must not change."""
    return {
        "state": copy.deepcopy(model.state_dict()),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "ids": [id(p) for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["ids"] == before["ids"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"model entry {k} changed"


def flat_params(model: nn.Module, names=None) -> torch.Tensor:
    return torch.cat(
        [p.detach().reshape(-1) for n, p in model.named_parameters() if names is None or n in names]
    )


def sign_manifest(raw: dict) -> dict:
    """Recompute a (version 3) trajectory manifest's own SHA-256 after a test edited it."""
    from captum_sam.record_schema import SELF_HASH, manifest_digest

    version = raw.get("version")
    if isinstance(version, int) and version >= 3 and SELF_HASH in raw:
        raw[SELF_HASH] = manifest_digest(raw)
    return raw
