"""Shared setup of the Captum conformance tests: tiny float64 models, data and checkpoints.

Every twin gets the original model; every Captum class gets a deep copy (Captum loads
checkpoints into the model it is given and may change ``requires_grad``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import DTYPE

N_TRAIN, N_TEST, N_HESSIAN = 14, 5, 9
TIGHT = dict(rtol=1e-8, atol=1e-10)


class TwoInput(nn.Module):
    """A model whose forward takes two tensors (batches ``(x1, x2, y)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_a, self.fc_b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.act, self.fc2 = nn.Tanh(), nn.Linear(4, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc_a(x1) + self.fc_b(x2)))


def mlp(out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(5, 4))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(4, out))
    return model.to(DTYPE)


@dataclass
class Setting:
    """A model, its training set, a test batch, checkpoints and the loss factory."""

    model: nn.Module
    train: TensorDataset
    test: tuple
    hessian: TensorDataset
    ckpt_dir: str
    ckpts: list[str]
    loss: str  # "ce" or "mse"
    lr: float = 1.0  # the learning rate stored in the checkpoints (1: none stored)

    def loss_fn(self, reduction: str) -> nn.Module:
        return (nn.CrossEntropyLoss if self.loss == "ce" else nn.MSELoss)(reduction=reduction)

    def captum_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def test_loader(self, batch_size: int = 2) -> DataLoader:
        return DataLoader(TensorDataset(*self.test), batch_size=batch_size, shuffle=False)

    def train_loader(self, batch_size: int = 4) -> DataLoader:
        return DataLoader(self.train, batch_size=batch_size, shuffle=False)


def save_checkpoints(
    model: nn.Module, directory: str, n: int = 3, seed: int = 0, lr: float | None = None
) -> list[str]:
    """``n`` checkpoints: ``model``'s weights perturbed by seeded noise, as state dicts."""
    os.makedirs(directory, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for c in range(n):
        state = {
            k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in model.state_dict().items()
        }
        if lr is not None:
            state["learning_rate"] = lr
        path = os.path.join(directory, f"ckpt-{c}.pt")
        torch.save(state, path)
        paths.append(path)
    return paths


def make_setting(
    directory: str, loss: str = "ce", packed: bool = False, lr: float | None = None, seed: int = 0
) -> Setting:
    """A tiny classification ("ce", 3 classes) or regression ("mse", (B, 1)) problem."""
    g = torch.Generator().manual_seed(100 + seed)
    n = N_TRAIN + N_TEST
    if packed:
        torch.manual_seed(seed)
        model = TwoInput().to(DTYPE)
        x1 = torch.randn(n, 3, generator=g, dtype=DTYPE)
        x2 = torch.randn(n, 2, generator=g, dtype=DTYPE)
        features = [x1, x2]
        logits = x1 @ torch.randn(3, 3, generator=g, dtype=DTYPE) + x2 @ torch.randn(
            2, 3, generator=g, dtype=DTYPE
        )
    else:
        model = mlp(out=3 if loss == "ce" else 1, seed=seed)
        x = torch.randn(n, 5, generator=g, dtype=DTYPE)
        features = [x]
        logits = x @ torch.randn(5, 3, generator=g, dtype=DTYPE)
    if loss == "ce":
        y = (logits + 0.5 * torch.randn(logits.shape, generator=g, dtype=DTYPE)).argmax(1)
    else:
        y = logits[:, :1] + 0.1 * torch.randn(n, 1, generator=g, dtype=DTYPE)
    train = TensorDataset(*[f[:N_TRAIN] for f in features], y[:N_TRAIN])
    test = tuple(f[N_TRAIN:] for f in features) + (y[N_TRAIN:],)
    hessian = TensorDataset(*[f[:N_HESSIAN] for f in features], y[:N_HESSIAN])
    next(iter(model.children())).eval()  # mixed train/eval flags, which must survive
    ckpts = save_checkpoints(model, directory, seed=seed, lr=lr)
    return Setting(model, train, test, hessian, directory, ckpts, loss, 1.0 if lr is None else lr)


def strip_lr_loader(model: nn.Module, path: str) -> float:
    """A Captum ``checkpoints_load_func`` for state dicts with a ``"learning_rate"`` entry."""
    state = torch.load(path, weights_only=True)
    lr = float(state.pop("learning_rate", 1.0))
    model.load_state_dict(state)
    return lr


def loader(data, batch_size: int = 4) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------- plain autograd references


def checkpoint_params(model: nn.Module, path: str) -> tuple[dict, float]:
    """The parameters stored in ``path`` (by name) and its learning rate (1 if none)."""
    state = torch.load(path, weights_only=True)
    lr = float(state.pop("learning_rate", 1.0))
    return {n: state[n].clone() for n, _ in model.named_parameters()}, lr


def example_loss(model, params, batch, k, loss_fn) -> torch.Tensor:
    """The loss of example ``k`` alone (a batch of one), summed to a scalar."""
    *features, y = batch
    out = torch.func.functional_call(model, params, tuple(f[k : k + 1] for f in features))
    return loss_fn(out, y[k : k + 1]).sum()


def example_grads(model, params, batch, loss_fn, wrt) -> torch.Tensor:
    """``(B, P_wrt)`` per-example gradients w.r.t. the parameters named in ``wrt``."""
    rows = []
    for k in range(len(batch[-1])):
        leaves = {n: p.detach().clone().requires_grad_(n in wrt) for n, p in params.items()}
        loss = example_loss(model, leaves, batch, k, loss_fn)
        grads = torch.autograd.grad(loss, [leaves[n] for n in wrt])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def sam_point(params: dict, mean_grad: torch.Tensor, rho: float) -> dict:
    """``w + rho g / (||g|| + 1e-12)`` over every parameter (``mean_grad`` flat, in order)."""
    eps = rho * mean_grad / (mean_grad.norm() + 1e-12)
    out, i = {}, 0
    for n, p in params.items():
        out[n] = p + eps[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def summed_loss_hessian(model, params, batch, loss_fn, wrt) -> torch.Tensor:
    """Dense Hessian of the summed per-example loss of ``batch`` w.r.t. ``wrt`` (flat)."""
    shapes = [params[n].shape for n in wrt]
    sizes = [params[n].numel() for n in wrt]

    def total(flat: torch.Tensor) -> torch.Tensor:
        full = dict(params)
        for n, piece, shape in zip(wrt, flat.split(sizes), shapes):
            full[n] = piece.reshape(shape)
        return sum(example_loss(model, full, batch, k, loss_fn) for k in range(len(batch[-1])))

    flat = torch.cat([params[n].reshape(-1) for n in wrt])
    return torch.autograd.functional.hessian(total, flat)
