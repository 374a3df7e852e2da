"""What a head is, as stored: its :class:`HeadConfig`, its :class:`HeadCard` and its two files.

A head lives in a directory of two files:

- ``head.safetensors``: the float32 weights (no pickle, nothing executes on load);
- ``head.json``: the :class:`HeadCard`, which carries everything needed to use the weights
  again (``config``, ``classes``, the model key, layer and pooling whose vectors it reads) and
  what produced it (warehouse version, split, hyperparameters, metrics), with a digest that
  ties the weights to the fields that decide what a prediction means.

Both files appear at once (:func:`write_head_files`) and are read back with their digests
checked (:func:`read_head_files`); building and applying a head is :mod:`pipelines.heads`'s.
"""
from __future__ import annotations

import json
import operator
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from numbers import Real
from pathlib import Path

import numpy as np

from pipelines.errors import HeadError
from warehouse.catalog import HeadRow
from warehouse.keys import file_digest, fingerprint

FORMAT = 2  # 2: the card carries a digest over the weights, model, layer, classes and config
TOP_FORMAT = 3  # 3: a head trained with layers above K (tune "top" or "lora"); its digest covers `top` too
READABLE_FORMATS = (1, 2, 3)
TUNES = ("head", "top", "lora")  # head: a head on pooled vectors; top/lora: layers above K + head, on token states
WEIGHTS_FILE = "head.safetensors"
CARD_FILE = "head.json"
KINDS = ("mlp", "linear", "ensemble")
MEMBERS = ("mlp", "linear")  # an ensemble head: these two heads, trained apart, their probabilities averaged
ACTIVATIONS = ("gelu", "relu")


@dataclass(frozen=True)
class HeadConfig:
    # "mlp": input -> hidden -> activation -> dropout -> classes; "linear": multinomial logistic regression;
    # "ensemble": an mlp and a linear head of this config, trained apart, their probabilities averaged
    kind: str
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

    def member(self, kind: str) -> "HeadConfig":
        """The config of one member of an ensemble head."""
        return replace(self, kind=kind)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors a head of this config holds, by state-dict name."""
        if self.kind == "ensemble":
            return {f"{kind}.{name}": shape for kind in MEMBERS for name, shape in self.member(kind).weight_shapes().items()}
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


def check_weights(weights: dict[str, np.ndarray], config: HeadConfig, where: str) -> None:
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


@dataclass(frozen=True)
class HeadCard:
    """Everything a head carries: how to run it, what it reads, what it was trained on, how it did.

    Saved as ``head.json``; the ``heads`` catalog row and fit-head's result derive from it.
    """

    name: str
    config: HeadConfig
    classes: tuple[str, ...]        # label values by output index
    model: str                      # the model key whose vectors it reads
    layer: int
    pooling: str
    label: str                      # the documents field it predicts
    trained_on_version: int         # the warehouse version it was trained on
    model_source: str = ""
    corpus: str | None = None
    where: str | None = None
    split: dict = field(default_factory=dict)   # percentages, seed and the rule
    rows: dict = field(default_factory=dict)    # rows per split
    missing_label: int = 0
    no_vector: int = 0
    rare_classes: tuple[str, ...] = ()
    hyperparameters: dict = field(default_factory=dict)
    history: tuple[dict, ...] = ()
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    created_at: str = ""
    format: int = FORMAT
    weights_sha256: str = ""        # of head.safetensors; set by save_head
    digest: str = ""                # over the weights and every field that decides predictions; set by save_head
    # "head": reads pooled vectors of `layer`. "top"/"lora": reads layer-`from_layer` token states
    # (`layer` == `from_layer`), runs the encoder layers above it, pools, then the head.
    tune: str = "head"
    from_layer: int | None = None
    # tune top/lora only: base_weights_sha256, num_layers, rank, alpha, targets, trainable_parameters
    top: dict = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        """Trained parameters: the head's, plus the layers' or adapters' for tune top/lora."""
        return int(self.top.get("trainable_parameters", self.config.parameters))

    @property
    def accuracy(self) -> float:
        return float(self.metrics.get("accuracy", float("nan")))

    @property
    def macro_f1(self) -> float:
        return float(self.metrics.get("macro_f1", float("nan")))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(classes=list(self.classes), rare_classes=list(self.rare_classes), history=list(self.history),
                    parameters=self.parameters)
        return data

    @classmethod
    def from_dict(cls, data: dict, *, where: str) -> "HeadCard":
        """Validate a card read from ``where``; HeadError says what is wrong and what to do."""
        if data.get("format") not in READABLE_FORMATS:
            raise HeadError(f"{where} has format {data.get('format')!r}; this ew reads formats {READABLE_FORMATS}")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise HeadError(f"{where} lacks {', '.join(missing)}; the card was damaged: train the head again")
        config = _config(data["config"], where)
        classes = data["classes"]
        if not isinstance(classes, list) or not all(isinstance(label, str) for label in classes):
            raise HeadError(f"{where}: 'classes' must be a list of strings")
        if len(set(classes)) != len(classes):
            raise HeadError(f"{where}: 'classes' names a class twice; the card was changed: train the head again")
        if len(classes) != config.num_classes:
            raise HeadError(f"{where}: card lists {len(classes)} classes, the head has {config.num_classes} outputs")
        for name, kind in (("layer", int), ("trained_on_version", int), ("model", str), ("label", str), ("pooling", str)):
            if not isinstance(data[name], kind) or isinstance(data[name], bool):
                raise HeadError(f"{where}: {name!r} must be {'an integer' if kind is int else 'a string'}, got {data[name]!r}")
        _check_tune(data, where)
        if data["format"] >= 2 and not (data.get("weights_sha256") and data.get("digest")):
            raise HeadError(f"{where} lacks its digests (weights_sha256, digest); the card was damaged: train the head again")
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in known}
        values.update(config=config, classes=tuple(classes), rare_classes=tuple(data.get("rare_classes") or ()),
                      history=tuple(data.get("history") or ()))
        return cls(**values)

    def expected_digest(self, weights_sha256: str) -> str:
        """What ``digest`` must be: the weights and every field that decides what a prediction means."""
        fields_ = {"weights": weights_sha256, "config": asdict(self.config), "classes": list(self.classes),
                   "model": self.model, "layer": self.layer, "pooling": self.pooling, "label": self.label}
        if self.tune != "head":  # plain heads keep their format-2 digest
            fields_.update(tune=self.tune, from_layer=self.from_layer, top=self.top)
        return fingerprint(fields_)

    def row(self, *, artifact: str, created_at: datetime) -> HeadRow:
        """The ``heads`` catalog row of this head, stored at ``artifact`` (relative to the warehouse)."""
        return HeadRow(
            head=self.name, model=self.model, layer=self.layer, pooling=self.pooling, label=self.label,
            kind=self.config.kind if self.tune == "head" else f"{self.tune}+{self.config.kind}", classes=self.classes, accuracy=self.accuracy, macro_f1=self.macro_f1,
            train_rows=int(self.rows.get("train", 0)), val_rows=int(self.rows.get("val", 0)),
            test_rows=int(self.rows.get("test", 0)), trained_on_version=self.trained_on_version,
            artifact=artifact, card=json.dumps(self.to_dict(), sort_keys=True), created_at=created_at,
        )


_REQUIRED = ("name", "config", "classes", "model", "layer", "pooling", "label", "trained_on_version")


def _check_tune(data: dict, where: str) -> None:
    tune, layer, top = data.get("tune", "head"), data.get("from_layer"), data.get("top")
    if tune not in TUNES or (tune != "head") != (data["format"] >= TOP_FORMAT):
        raise HeadError(f"{where}: tune {tune!r} with format {data['format']} is unknown to this ew (tunes: {', '.join(TUNES)})")
    if tune != "head" and not (isinstance(layer, int) and layer == data["layer"] and isinstance(top, dict)
                               and top.get("base_weights_sha256")):
        raise HeadError(f"{where}: 'from_layer' must equal 'layer' and 'top' must record base_weights_sha256; "
                        "the card was changed: train the head again")


def _config(raw: object, where: str) -> HeadConfig:
    known = {f.name for f in fields(HeadConfig)}
    if not isinstance(raw, dict) or not {"kind", "input_dim", "num_classes"} <= set(raw) <= known:
        raise HeadError(f"{where}: 'config' must be an object with fields among {sorted(known)}")
    try:
        return HeadConfig(**raw)
    except HeadError as exc:
        raise HeadError(f"{where}: {exc}") from None


def write_head_files(directory: Path, weights: dict[str, np.ndarray], card: HeadCard) -> HeadCard:
    """:func:`save_head` for checked float32 ``weights``: both files appear at once, never over an existing head."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    if directory.exists():
        raise HeadError(f"a head already exists at {directory}; pick another --name")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    card_format = FORMAT if card.tune == "head" else TOP_FORMAT
    try:
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": str(card_format)})
        weights_sha256 = file_digest(staging / WEIGHTS_FILE)
        card = replace(card, format=card_format, weights_sha256=weights_sha256,
                       digest=card.expected_digest(weights_sha256))
        try:
            text = json.dumps(card.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)
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
    return card


def read_head_files(directory: Path) -> tuple[HeadCard, dict[str, np.ndarray]]:
    """(card, float32 weights) of a head directory, digests checked; the caller checks the tensor names."""
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
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HeadError(f"{card_path} is corrupt ({exc}); train the head again") from None
    if not isinstance(data, dict):
        raise HeadError(f"{card_path} is corrupt: expected a JSON object; train the head again")
    card = HeadCard.from_dict(data, where=str(card_path))
    actual = file_digest(weights_path)
    if card.weights_sha256 and actual != card.weights_sha256:
        raise HeadError(f"{weights_path} does not match the digest in {CARD_FILE}; the file was changed or truncated")
    if card.digest and card.digest != card.expected_digest(actual):
        raise HeadError(f"{card_path} does not match its digest: its model, layer, classes or config were changed; "
                        "train the head again")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise HeadError(f"{weights_path} is corrupt ({exc}); train the head again") from None
    for name, array in weights.items():
        if array.dtype != np.float32:
            raise HeadError(f"{weights_path}: tensor {name} is {array.dtype}, expected float32")
        if not np.all(np.isfinite(array)):
            raise HeadError(f"{weights_path}: tensor {name} holds NaN or infinite values; train the head again")
    return card, weights
