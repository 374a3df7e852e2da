"""Classifier heads on pooled embeddings: build (torch), save, load and apply (NumPy).

A head lives in a directory of two files:

- ``head.safetensors``: the float32 weights (no pickle, nothing executes on load);
- ``head.json``: the card, which carries everything needed to use the weights again
  (``config``, ``classes``, ``format``, ``parameters``) plus whatever the trainer adds
  (warehouse version, model key, split, seed, metrics).

torch is needed only to train (:func:`build_head`); :func:`load_head` and
:meth:`LoadedHead.predict_proba` run on NumPy alone.

>>> head = load_head(Path("heads/section"))          # doctest: +SKIP
>>> head.classes[head.predict_proba(x).argmax(1)[0]]  # doctest: +SKIP
'Methods'
"""
from __future__ import annotations

import json
import operator
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from warehouse.errors import HeadError, MissingDependencyError
from warehouse.keys import file_digest

if TYPE_CHECKING:
    import torch

FORMAT = 1
WEIGHTS_FILE = "head.safetensors"
CARD_FILE = "head.json"
KINDS = ("mlp", "linear")
ACTIVATIONS = ("gelu", "relu")


@dataclass(frozen=True)
class HeadConfig:
    kind: str  # "mlp": input -> hidden -> activation -> dropout -> classes; "linear": multinomial logistic regression
    input_dim: int  # D, the width of the pooled embedding
    num_classes: int  # C
    hidden: int = 64  # mlp only; D=384, C=60 gives 28,540 parameters
    dropout: float = 0.1  # mlp only, on the hidden layer; inactive at inference
    # mlp only. "gelu" is the tanh approximation, so NumPy inference needs no erf (no scipy).
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HeadError(f"unknown head kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise HeadError(f"unknown activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        for name in ("input_dim", "num_classes", "hidden"):
            value = getattr(self, name)
            try:
                number = operator.index(value)  # accepts NumPy integers, refuses 3.0 and "3"
            except TypeError:
                number = 0
            if isinstance(value, bool) or number < 1:
                raise HeadError(f"head {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(number))  # plain int, so asdict() stays JSON-ready
        if self.num_classes < 2:
            raise HeadError(f"a classifier head needs at least 2 classes, got {self.num_classes}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, Real) or not 0.0 <= self.dropout < 1.0:
            raise HeadError(f"dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors a head of this config holds, by state-dict name."""
        if self.kind == "linear":
            return {"out.weight": (self.num_classes, self.input_dim), "out.bias": (self.num_classes,)}
        return {
            "hidden.weight": (self.hidden, self.input_dim),
            "hidden.bias": (self.hidden,),
            "out.weight": (self.num_classes, self.hidden),
            "out.bias": (self.num_classes,),
        }

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.weight_shapes().values())


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


def _check_weights(weights: dict[str, np.ndarray], config: HeadConfig, where: str) -> None:
    expected = config.weight_shapes()
    if set(weights) != set(expected):
        raise HeadError(
            f"{where}: tensors {sorted(weights)} do not match a {config.kind} head ({sorted(expected)})"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise HeadError(
                f"{where}: tensor {name} has shape {tuple(weights[name].shape)}, the config says {shape} "
                f"(input_dim={config.input_dim}, num_classes={config.num_classes}, hidden={config.hidden})"
            )


def _check_classes(card: dict, config: HeadConfig, where: str) -> None:
    if "classes" not in card:
        return
    classes = card["classes"]
    if not isinstance(classes, (list, tuple)) or not all(isinstance(label, str) for label in classes):
        raise HeadError(f"{where}: card 'classes' must be a list of strings")
    if len(classes) != config.num_classes:
        raise HeadError(f"{where}: card lists {len(classes)} classes, the head has {config.num_classes} outputs")


def save_head(directory: Path, module: "torch.nn.Module", *, config: HeadConfig, card: dict) -> Path:
    """Write ``directory/head.safetensors`` and ``directory/head.json``; return ``directory``.

    The card gets ``config``, ``format``, ``parameters`` and ``weights_sha256`` added (these
    keys win over the caller's). Both files are written into a hidden temp sibling that is
    then renamed into place, so a head directory is either complete or absent.
    An existing directory is never overwritten.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    if directory.exists():
        raise HeadError(f"a head already exists at {directory}; pick another --name")
    weights = {
        name: tensor.detach().cpu().float().contiguous().numpy()
        for name, tensor in module.state_dict().items()
    }
    _check_weights(weights, config, f"head to save at {directory}")
    _check_classes(card, config, f"head to save at {directory}")
    full_card = {**card, "config": asdict(config), "format": FORMAT, "parameters": config.parameters}
    if "classes" in full_card:
        full_card["classes"] = list(full_card["classes"])
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": str(FORMAT)})
        full_card["weights_sha256"] = file_digest(staging / WEIGHTS_FILE)
        try:
            text = json.dumps(full_card, indent=2, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise HeadError(f"the card for {directory} is not JSON-serialisable: {exc}") from None
        (staging / CARD_FILE).write_text(text + "\n", encoding="utf-8")
        try:
            # Fails on Linux if `directory` appeared meanwhile and is non-empty.
            os.rename(staging, directory)
        except OSError:
            raise HeadError(f"a head already exists at {directory}; pick another --name") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


@dataclass(frozen=True, eq=False)
class LoadedHead:
    """A head read back from disk, applied with NumPy only."""

    config: HeadConfig
    card: dict
    weights: dict[str, np.ndarray]

    @property
    def classes(self) -> list[str]:
        """Label names by output index (``card["classes"]``; ``"0"``, ``"1"``... if absent)."""
        return list(self.card.get("classes") or [str(index) for index in range(self.config.num_classes)])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, C) float32 logits."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.config.input_dim:
            raise HeadError(
                f"this head takes embeddings of shape (N, {self.config.input_dim}), got {x.shape}; "
                "was it trained on another model's embeddings?"
            )
        w = self.weights
        if self.config.kind == "mlp":
            h = x @ w["hidden.weight"].T + w["hidden.bias"]  # (N, H)
            if self.config.activation == "gelu":
                h = 0.5 * h * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (h + np.float32(0.044715) * h**3)))
            else:
                h = np.maximum(h, np.float32(0.0))
            x = h
        return x @ w["out.weight"].T + w["out.bias"]  # (N, C)

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


def load_head(directory: Path) -> LoadedHead:
    """Read a head written by :func:`save_head`. Never unpickles or executes anything."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    card_path, weights_path = directory / CARD_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise HeadError(f"no head at {directory}: the directory does not exist; see the --name given to `ew fit-head`")
    for path in (card_path, weights_path):
        if not path.is_file():
            raise HeadError(f"head at {directory} is incomplete: {path.name} is missing; train it again")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadError(f"{card_path} is corrupt ({exc}); train the head again") from None
    if not isinstance(card, dict):
        raise HeadError(f"{card_path} is corrupt: expected a JSON object; train the head again")
    if card.get("format") != FORMAT:
        raise HeadError(f"{card_path} has format {card.get('format')!r}; this ew reads format {FORMAT}")
    raw_config = card.get("config")
    known = {field.name for field in fields(HeadConfig)}
    if not isinstance(raw_config, dict) or not {"kind", "input_dim", "num_classes"} <= set(raw_config) <= known:
        raise HeadError(f"{card_path}: 'config' must be an object with fields among {sorted(known)}")
    try:
        config = HeadConfig(**raw_config)
    except HeadError as exc:
        raise HeadError(f"{card_path}: {exc}") from None
    _check_classes(card, config, str(card_path))
    expected_digest = card.get("weights_sha256")
    if expected_digest is not None and file_digest(weights_path) != expected_digest:
        raise HeadError(f"{weights_path} does not match the digest in {CARD_FILE}; the file was changed or truncated")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise HeadError(f"{weights_path} is corrupt ({exc}); train the head again") from None
    _check_weights(weights, config, str(weights_path))
    for name, array in weights.items():
        if array.dtype != np.float32:
            raise HeadError(f"{weights_path}: tensor {name} is {array.dtype}, expected float32")
    return LoadedHead(config=config, card=card, weights=weights)
