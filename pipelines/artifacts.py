"""The exported model artifact: a directory of ``model.onnx``, ``tokenizer.json`` and ``model.json``.

Once token states are asked for, it also holds ``states-K.onnx`` per cached layer K (outputs
``pooled`` and ``states``), ``torch/config.json`` + ``torch/model.safetensors`` (the encoder's own
weights, from which training builds the layers above K) and ``states.json`` (:class:`StatesCard`).

``model.json`` is the :class:`ModelCard`: everything needed to run the graph again (inputs,
pooling, max_length, widths) and everything that produced it (source, fingerprint, library
versions, how far the ONNX output is from torch's). It is read, validated and written here only.

>>> card = ModelCard.load(Path("ew-warehouse/artifacts/models/all-minilm-l6-v2-3f1c0b9e2d4a"))  # doctest: +SKIP
>>> card.key, card.dim, card.num_layers                                                        # doctest: +SKIP
('all-minilm-l6-v2-3f1c0b9e2d4a', 384, 6)
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

from warehouse.catalog import ModelRow

from .errors import ArtifactError

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "model.json"
OUTPUT_NAME = "pooled"
STATES_OUTPUT = "states"          # float32 (B, T, D): layer K's hidden state of every token
STATES_CARD_FILE = "states.json"
TORCH_DIR = "torch"               # config.json + model.safetensors, loadable by transformers.AutoModel
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")  # the graph takes a subset, in this order
_POSITIVE = ("max_length", "dim", "num_layers")


@dataclass(frozen=True)
class LayerAgreement:
    """How close one layer's pooled vectors of a reduced-precision graph are to fp32's, on the export's sample texts."""

    layer: int
    min_cosine: float
    mean_cosine: float


@dataclass(frozen=True)
class ModelCard:
    key: str                         # model_key(name, fingerprint): the `model` column of embeddings
    pooling: str                     # "mean" | "cls"
    max_length: int                  # tokens; longer texts are truncated
    dim: int                         # D, the hidden size
    num_layers: int                  # L; the graph returns layers 0..L
    input_names: tuple[str, ...]     # the graph's inputs, a subset of INPUT_NAMES in that order
    name: str = ""                   # HF id or directory name
    source: str = ""                 # where the weights came from, for humans
    fingerprint: str = ""            # SHA-256 over everything that changes the vectors
    export_format: int = 1
    precision: str = "fp32"
    vector_precision: str = "fp32"   # how ew stores the pooled vectors: "fp32" or "fp16" (part of the key)
    output_name: str = OUTPUT_NAME
    pad_token_id: int = 0
    max_abs_diff: float | None = None  # largest |onnxruntime - torch| over every layer of the sample batch
    tolerance: float | None = None
    fused: bool = False              # onnxruntime's transformer fusions are in the stored graph
    export_seconds: float = 0.0
    versions: dict = field(default_factory=dict)  # torch, transformers, onnx, onnxruntime that exported it
    created_at: str = ""
    onnx_sha256: str = ""            # of model.onnx, tokenizer.json; set at export ("" in cards older than them)
    tokenizer_sha256: str = ""
    # int8/bf16 only: each layer's cosine to the fp32 graph, and the guard (min cosine) it passed at export.
    agreement: tuple[LayerAgreement, ...] = ()
    precision_guard: float | None = None

    @property
    def worst_agreement(self) -> LayerAgreement | None:
        """The layer furthest from fp32 (None for an fp32 model)."""
        return min(self.agreement, key=lambda a: a.min_cosine) if self.agreement else None

    @classmethod
    def load(cls, directory: Path) -> "ModelCard":
        """Read and validate ``directory/model.json``; ArtifactError says what is wrong."""
        path = Path(directory) / CARD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ArtifactError(directory, f"{CARD_FILE} cannot be read as JSON ({error})") from None
        if not isinstance(data, dict):
            raise ArtifactError(directory, f"{CARD_FILE} is not a JSON object")
        return cls.from_dict(data, where=directory)

    @classmethod
    def from_dict(cls, data: dict, *, where: Path | str = "model card") -> "ModelCard":
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ArtifactError(where, f"{CARD_FILE} lacks {', '.join(missing)}")
        wrong = [name for name in _POSITIVE if not isinstance(data[name], int) or isinstance(data[name], bool) or data[name] < 1]
        if wrong or not isinstance(data["input_names"], list) or not isinstance(data["key"], str):
            raise ArtifactError(where, f"{CARD_FILE} has invalid {', '.join(wrong) or 'input_names or key'}")
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in known}
        values["input_names"] = tuple(values["input_names"])
        values["pad_token_id"] = int(values.get("pad_token_id") or 0)
        try:
            values["agreement"] = tuple(LayerAgreement(**layer) for layer in values.get("agreement") or ())
        except TypeError:
            raise ArtifactError(where, f"{CARD_FILE} has an invalid agreement") from None
        return cls(**values)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_names"] = list(self.input_names)
        data["agreement"] = [asdict(layer) for layer in self.agreement]
        return data

    def save(self, directory: Path) -> Path:
        """Write ``directory/model.json`` whole (a temp file renamed into place)."""
        return _write_json(Path(directory) / CARD_FILE, self.to_dict())

    def file_digests(self) -> dict[str, str]:
        """The SHA-256 each file of the artifact must have, by file name ("" where the card has none)."""
        return {MODEL_FILE: self.onnx_sha256, TOKENIZER_FILE: self.tokenizer_sha256}

    def row(self, *, artifact: str, created_at: datetime) -> ModelRow:
        """The ``models`` catalog row of this model, stored at ``artifact`` (relative to the warehouse)."""
        return ModelRow(
            model=self.key, name=self.name, source=self.source, fingerprint=self.fingerprint, dim=self.dim,
            num_layers=self.num_layers, max_length=self.max_length, pooling=self.pooling, precision=self.precision,
            max_abs_diff=self.max_abs_diff, artifact=artifact, created_at=created_at,
            vector_precision=self.vector_precision,
        )


def states_file(layer: int) -> str:
    """The file name of the graph that returns layer ``layer``'s token states."""
    return f"states-{layer}.onnx"


@dataclass(frozen=True)
class StatesGraph:
    """One verified ``states-K.onnx``: how far it is from torch and from ``model.onnx``."""

    layer: int
    max_abs_diff: float      # largest |onnxruntime - torch| over pooled vectors and real tokens' states
    pooled_vs_model: float   # largest |pooled - model.onnx's pooled|: vectors of either graph mix
    tolerance: float
    fused: bool
    export_seconds: float
    created_at: str

    @property
    def file(self) -> str:
        return states_file(self.layer)


@dataclass(frozen=True)
class StatesCard:
    """``states.json``: the token-state graphs of an artifact and the torch weights copied beside them.

    >>> StatesCard.load(artifact).weights   # doctest: +SKIP
    {'config.json': '5b1f...', 'model.safetensors': '53aa...'}
    """

    weights: dict[str, str]                 # file in torch/ -> SHA-256 of its bytes
    graphs: dict[int, StatesGraph] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> "StatesCard | None":
        """The card of ``directory``, or None when no token states were ever exported there."""
        path = Path(directory) / STATES_CARD_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            graphs = {int(layer): StatesGraph(**graph) for layer, graph in data["graphs"].items()}
            return cls(weights=dict(data["weights"]), graphs=graphs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ArtifactError(directory, f"{STATES_CARD_FILE} cannot be read ({error})") from None

    def save(self, directory: Path) -> Path:
        data = {"weights": self.weights, "graphs": {str(k): asdict(g) for k, g in sorted(self.graphs.items())}}
        return _write_json(Path(directory) / STATES_CARD_FILE, data)


def _write_json(path: Path, data: dict) -> Path:
    """Write ``path`` whole: a temp file beside it, renamed into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
