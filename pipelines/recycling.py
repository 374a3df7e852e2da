"""Embedding recycling: train the encoder layers above K (fully or with LoRA) plus a head on cached layer-K token states.

The model is :mod:`pipelines.top`'s; the loop is :func:`pipelines.training.train_module`, fed
batches of ``((states (B, T, D) float32, mask (B, T)), y (B,))`` padded to the batch's longest
document. A trained head stores only what training changed (``top``: the layers' tensors and
the head; ``lora``: the adapters and the head) in ``head.safetensors``; its ``head.json`` card
names the base weights by digest, and loading rebuilds the base from the weights directory,
running no code.

>>> result = train_top(Path("artifact/torch"), top=TopConfig(from_layer=4, tune="lora"), train_batches=...,
...                    val_batches=..., steps_per_epoch=100, num_classes=12, config=TrainConfig(lr=1e-3))  # doctest: +SKIP
>>> card = save_top_head(Path("heads/section"), result, card, weights_dir=Path("artifact/torch"))         # doctest: +SKIP
>>> load_top_head(Path("heads/section"), weights_dir=Path("artifact/torch")).predict_proba(states, mask)  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import HeadError
from pipelines.head_card import HeadCard, HeadConfig, read_head_files, write_head_files
from pipelines.heads import require_torch
from pipelines.top import (
    WEIGHTS_FILE, TopConfig, base_config, build_top, trainable_parameters, trained_tensors,
)
from pipelines.training import Batches, EpochStats, TrainConfig, train_module
from warehouse.keys import file_digest

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TopTrainResult:
    module: Any  # the TopModel in eval mode, holding the best epoch's trained tensors
    top: TopConfig
    head: HeadConfig
    history: tuple[EpochStats, ...]
    best_epoch: int  # 1-based
    trainable_parameters: int  # layers (top) or adapters (lora), plus the head
    seconds: float


def train_top(
    weights_dir: Path,
    *,
    top: TopConfig,
    train_batches: Callable[[int], Batches],
    val_batches: Callable[[], Batches],
    steps_per_epoch: int,
    num_classes: int,
    config: TrainConfig,
    class_weights: np.ndarray | None = None,
    layer_lr: float | None = None,
    lower: "torch.nn.Module | None" = None,
) -> TopTrainResult:
    """Train the layers above ``top.from_layer`` of the model in ``weights_dir`` and a head.

    Batches are ``((states, mask), y)``. ``layer_lr`` (tune top only) is the peak rate of the
    transformer layers; the head and LoRA adapters use ``config.lr``. With ``lower`` (a module
    from :func:`build_lower`), batches are ``((input_ids, attention_mask, token_type_ids), y)``
    and the lower layers are recomputed every step: what the cache saves, for comparisons.
    Same seed and same batches give the same weights.
    """
    head = HeadConfig(kind=config.kind, input_dim=int(base_config(weights_dir).hidden_size),
                      num_classes=num_classes, hidden=config.hidden, dropout=config.dropout,
                      activation=config.activation)

    def build() -> "torch.nn.Module":
        model = build_top(weights_dir, top, head)
        return model if lower is None else from_text(lower, model)

    def groups(module: "torch.nn.Module") -> list[dict]:
        layers = [p for n, p in module.named_parameters() if p.requires_grad and ".encoder.layer." in f".{n}"]
        rest = [p for n, p in module.named_parameters() if p.requires_grad and ".encoder.layer." not in f".{n}"]
        return [{"params": rest}] + ([{"params": layers, "lr": layer_lr}] if layers else [])

    result = train_module(build, train_batches=train_batches, val_batches=val_batches,
                          steps_per_epoch=steps_per_epoch, num_classes=num_classes, config=config,
                          class_weights=class_weights, param_groups=groups if layer_lr else None)
    module = result.module if lower is None else result.module.top
    return TopTrainResult(module=module, top=top, head=head, history=result.history, best_epoch=result.best_epoch,
                          trainable_parameters=trainable_parameters(module), seconds=result.seconds)


def from_text(lower: "torch.nn.Module", top: "torch.nn.Module", *, probabilities: bool = False) -> "torch.nn.Module":
    """lower + top as one module: (input_ids, attention_mask, token_type_ids) (B, T) -> logits or probabilities (B, C)."""
    torch = require_torch()

    class FromText(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lower, self.top = lower, top

        def train(self, mode: bool = True):
            super().train(mode)
            self.lower.eval()  # frozen below K: no dropout there, so the random draws match training on the cache
            return self

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            states = self.lower(input_ids, attention_mask, token_type_ids)  # (B, T, D)
            logits = self.top(states, attention_mask)  # (B, C)
            return torch.softmax(logits, dim=-1) if probabilities else logits

    return FromText()


def top_card(card: HeadCard, result: TopTrainResult, *, weights_dir: Path) -> HeadCard:
    """``card`` with the fields that say what was trained above which layer of which base weights."""
    top = result.top
    details = {"base_weights_sha256": file_digest(Path(weights_dir) / WEIGHTS_FILE),
               "num_layers": int(result.module.num_layers), "trainable_parameters": result.trainable_parameters}
    if top.tune == "lora":
        details.update(rank=top.rank, alpha=float(top.alpha), targets=list(top.targets))
    return replace(card, config=result.head, tune=top.tune, from_layer=top.from_layer, layer=top.from_layer,
                   pooling=top.pooling, top=details)


def save_top_head(directory: Path, result: TopTrainResult, card: HeadCard, *, weights_dir: Path) -> HeadCard:
    """Write only the trained tensors and the card (see :func:`top_card`); returns the card as saved."""
    return write_head_files(directory, trained_tensors(result.module), top_card(card, result, weights_dir=weights_dir))


@dataclass(frozen=True, eq=False)
class TopHead:
    """A head trained above layer K, read back: the base's layers with the trained tensors in place."""

    card: HeadCard
    module: Any  # TopModel, eval mode

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    def predict_proba(self, states: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, T, D) layer-K states, (B, T) mask -> (B, C) float32 probabilities."""
        torch = require_torch()
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.asarray(states, dtype=np.float32)), torch.from_numpy(np.asarray(mask)))
            return torch.softmax(logits, dim=-1).numpy()


def top_config_of(card: HeadCard) -> TopConfig:
    if card.tune == "head":
        return TopConfig(from_layer=card.layer, tune="head", pooling=card.pooling)
    return TopConfig(from_layer=card.from_layer, tune=card.tune, pooling=card.pooling, rank=card.top.get("rank", 4),
                     alpha=card.top.get("alpha", 8.0), targets=tuple(card.top.get("targets", ("query", "value"))))


def load_top_head(directory: Path, *, weights_dir: Path) -> TopHead:
    """Rebuild a head from ``weights_dir``'s base and its stored tensors; never unpickles or executes anything.

    A plain head (tune "head") loads too, as pooling + head above its layer, so export treats every head alike.
    """
    card, weights = read_head_files(directory)
    return TopHead(card=card, module=torch_module(card, weights, weights_dir=Path(weights_dir), where=str(directory)))


def torch_module(card: HeadCard, weights: dict[str, np.ndarray], *, weights_dir: Path, where: str) -> "torch.nn.Module":
    """Any head's card and stored tensors as a torch module reading layer-``card.layer`` states (B, T, D), (B, T) -> logits (B, C)."""
    torch = require_torch()
    if card.tune == "head":
        weights = {f"head.{name}": array for name, array in weights.items()}
    else:
        actual = file_digest(weights_dir / WEIGHTS_FILE)
        if actual != card.top.get("base_weights_sha256"):
            raise HeadError(f"head {where} was trained on other base weights than {weights_dir / WEIGHTS_FILE} "
                            "(digests differ); use the model artifact it was trained with, or train it again")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        module = build_top(weights_dir, top_config_of(card), card.config)
    expected = {name: tuple(p.shape) for name, p in module.named_parameters() if p.requires_grad}
    if set(weights) != set(expected):
        raise HeadError(f"head {where}: stored tensors do not match a {card.tune} head above layer {card.layer} "
                        f"(extra {sorted(set(weights) - set(expected))[:3]}, missing {sorted(set(expected) - set(weights))[:3]}); "
                        "train it again")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise HeadError(f"head {where}: tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    module.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()}, strict=False)
    return module.requires_grad_(False).eval()


def pad_states(documents: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (n_tokens, D) states -> (B, T, D) float32 zero-padded to the longest, (B, T) int64 mask."""
    if not documents:
        raise HeadError("no documents to pad")
    width = max(len(doc) for doc in documents)
    states = np.zeros((len(documents), width, documents[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(documents), width), dtype=np.int64)
    for row, doc in enumerate(documents):
        states[row, : len(doc)] = doc
        mask[row, : len(doc)] = 1
    return states, mask

