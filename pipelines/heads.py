"""Classifier heads on pooled embeddings: build (torch), save, load and apply (NumPy).

What a head is on disk (its config, card and files) is :mod:`pipelines.head_card`'s.

torch is needed only to train (:func:`build_head`); :func:`load_head` and
:meth:`LoadedHead.predict_proba` run on NumPy alone.

>>> head = load_head(Path("heads/section"))          # doctest: +SKIP
>>> head.classes[head.predict_proba(x).argmax(1)[0]]  # doctest: +SKIP
'Methods'
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import HeadError, MissingDependencyError

# The config, card and files are re-exported: a head is used through this module.
from .head_card import (
    CARD_FILE, FORMAT, KINDS, MEMBERS, TOP_FORMAT, TUNES, WEIGHTS_FILE, HeadCard, HeadConfig, check_weights,
    read_head_files, write_head_files,
)

__all__ = [
    "CARD_FILE", "FORMAT", "KINDS", "MEMBERS", "TOP_FORMAT", "TUNES", "WEIGHTS_FILE", "HeadCard", "HeadConfig",
    "LoadedHead", "build_head", "fold_standardization", "load_head", "read_head_files", "require_torch", "save_head",
    "standardized_head", "write_head_files",
]

if TYPE_CHECKING:
    import torch

def require_torch() -> Any:
    """Import torch, or say which extra to install."""
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "train", "training a head") from None
    return torch


def build_head(config: HeadConfig) -> "torch.nn.Module":
    """A freshly initialised head: logits (B, C) from embeddings (B, D).

    Layers are named (``hidden``, ``out``) so the state dict matches
    :meth:`HeadConfig.weight_shapes` and the NumPy forward in :class:`LoadedHead`.
    """
    torch = require_torch()
    nn = torch.nn
    if config.kind == "ensemble":
        return _ensemble_class(torch)(OrderedDict((kind, build_head(config.member(kind))) for kind in MEMBERS))
    if config.kind == "linear":
        layers = [("out", nn.Linear(config.input_dim, config.num_classes))]  # (B, D) -> (B, C)
    else:
        activation = nn.GELU(approximate="tanh") if config.activation == "gelu" else nn.ReLU()
        layers = [
            ("hidden", nn.Linear(config.input_dim, config.hidden)),  # (B, D) -> (B, H)
            ("activation", activation),
            ("dropout", nn.Dropout(config.dropout)),
            ("out", nn.Linear(config.hidden, config.num_classes)),  # (B, H) -> (B, C)
        ]
    return nn.Sequential(OrderedDict(layers))


def _ensemble_class(torch: Any) -> type:
    class Ensemble(torch.nn.ModuleDict):
        """Log of the members' mean probabilities: softmax of it is their average, argmax the ensemble's vote."""

        def forward(self, x):  # (B, D) -> (B, C)
            logs = torch.stack([torch.log_softmax(member(x), dim=1) for member in self.values()])  # (M, B, C)
            return torch.logsumexp(logs, dim=0) - math.log(len(self))

    return Ensemble


def standardized_head(config: HeadConfig, mean: np.ndarray, std: np.ndarray) -> "torch.nn.Module":
    """A fresh head behind a fixed ``(x - mean) / std`` (both (D,)): trains as on standardized inputs.

    Built under the same seed it starts from the same weights as :func:`build_head` (the
    scaling draws no random numbers). :func:`fold_standardization` turns it back into a plain head.
    """
    torch = require_torch()
    mean, std = (np.asarray(v, dtype=np.float32).reshape(-1) for v in (mean, std))
    if mean.shape != (config.input_dim,) or std.shape != (config.input_dim,) or not np.all(std > 0):
        raise HeadError(f"standardization needs a mean and a positive std of {config.input_dim} values each, "
                        f"got shapes {mean.shape} and {std.shape}")

    class Standardize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean.copy()))
            self.register_buffer("std", torch.from_numpy(std.copy()))

        def forward(self, x):  # (B, D) -> (B, D)
            return (x - self.mean) / self.std

    return torch.nn.Sequential(OrderedDict([("standardize", Standardize()), ("head", build_head(config))]))


def fold_standardization(module: "torch.nn.Module") -> "torch.nn.Module":
    """The plain head of a :func:`standardized_head`, its first layer rewritten to read raw inputs.

    W (x - m) / s + b == (W / s) x + (b - (W / s) m): the same logits up to float32 rounding, so the
    saved head needs no extra tensor, every ew that reads heads runs it, and NumPy needs nothing new.
    """
    torch = require_torch()
    head, scale = module.head, module.standardize
    first = head.hidden if hasattr(head, "hidden") else head.out
    with torch.no_grad():
        weight = first.weight.double() / scale.std.double()  # (H, D) / (D,)
        first.bias.copy_(first.bias.double() - weight @ scale.mean.double())
        first.weight.copy_(weight)
    return head


def save_head(directory: Path, module: "torch.nn.Module", card: HeadCard) -> HeadCard:
    """Write ``directory/head.safetensors`` and ``directory/head.json``; return the card as saved.

    The saved card gets ``weights_sha256`` and ``digest``. Both files are written into a hidden
    temp sibling that is then renamed into place, so a head directory is either complete or
    absent. An existing directory is never overwritten.
    """
    weights = {
        name: tensor.detach().cpu().float().contiguous().numpy()
        for name, tensor in module.state_dict().items()
    }
    check_weights(weights, card.config, f"head to save at {directory}")
    return write_head_files(directory, weights, card)


@dataclass(frozen=True, eq=False)
class LoadedHead:
    """A head read back from disk, applied with NumPy only."""

    card: HeadCard
    weights: dict[str, np.ndarray]

    @property
    def config(self) -> HeadConfig:
        return self.card.config

    @property
    def classes(self) -> list[str]:
        """Label names by output index."""
        return list(self.card.classes)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, C) float32 logits."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.config.input_dim:
            raise HeadError(
                f"this head takes embeddings of shape (N, {self.config.input_dim}), got {x.shape}; "
                "was it trained on another model's embeddings?"
            )
        if self.config.kind == "ensemble":
            logs = []
            for kind in MEMBERS:
                z = _forward(self.config.member(kind), self.weights, x, prefix=f"{kind}.")
                z = z - z.max(axis=1, keepdims=True)
                logs.append(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))  # log-softmax (N, C)
            top = np.maximum(logs[0], logs[1])
            return (top + np.log(np.exp(logs[0] - top) + np.exp(logs[1] - top)) - np.float32(math.log(2))).astype(np.float32)
        return _forward(self.config, self.weights, x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, C) float32 softmax probabilities."""
        z = self.logits(x)
        z = z - z.max(axis=1, keepdims=True)  # stable softmax
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N,) int64 class indices."""
        return self.logits(x).argmax(axis=1).astype(np.int64)


def _forward(config: HeadConfig, weights: dict[str, np.ndarray], x: np.ndarray, *, prefix: str = "") -> np.ndarray:
    """(N, D) -> (N, C) logits of a plain mlp or linear head (``prefix``: an ensemble member's tensors)."""
    w = {name[len(prefix):]: array for name, array in weights.items() if name.startswith(prefix)}
    if config.kind == "mlp":
        h = x @ w["hidden.weight"].T + w["hidden.bias"]  # (N, H)
        if config.activation == "gelu":
            h = 0.5 * h * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (h + np.float32(0.044715) * h**3)))
        else:
            h = np.maximum(h, np.float32(0.0))
        x = h
    return x @ w["out.weight"].T + w["out.bias"]  # (N, C)


def load_head(directory: Path) -> LoadedHead:
    """Read a head written by :func:`save_head`. Never unpickles or executes anything."""
    card, weights = read_head_files(directory)
    if card.tune != "head":
        raise HeadError(f"{directory} holds a head trained with --tune {card.tune} from layer {card.from_layer}: "
                        "it reads token states, not pooled vectors; load it with pipelines.recycling.load_top_head")
    check_weights(weights, card.config, str(Path(directory) / WEIGHTS_FILE))
    return LoadedHead(card=card, weights=weights)


