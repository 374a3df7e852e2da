"""Export a Hugging Face encoder to one ONNX graph that returns every layer's pooled vector.

The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has
them), int64 ``[batch, sequence]``, and returns ``pooled``: float32 ``[batch, num_layers + 1, dim]``,
layer 0 being the embedding output. The export is checked against torch before it is kept.

:func:`export_states` adds, on first need, ``states-K.onnx`` to an artifact: the same pooled
vectors plus layer K's hidden state of every token (``states``, float32 ``[batch, sequence, dim]``),
checked against torch and against ``model.onnx``; and a copy of the encoder's own weights in
``torch/``, from which training builds the layers above K without the original model installed.

torch and transformers are imported only when an export runs: inference never needs them.

>>> report = export_model(resolve_model("minilm"), Path("artifacts/minilm"))   # doctest: +SKIP
>>> report.max_abs_diff < report.tolerance                                     # doctest: +SKIP
True
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipelines.artifacts import (
    CARD_FILE, INPUT_NAMES, MODEL_FILE, OUTPUT_NAME, STATES_OUTPUT, TOKENIZER_FILE, TORCH_DIR, ModelCard, StatesCard,
    StatesGraph, states_file,
)
from pipelines.encoder import Encoder, usable_cores
from pipelines.models import EXPORT_FORMAT, ModelSource
from warehouse.errors import EwError, first_line
from warehouse.keys import file_digest
from pipelines.errors import ExportError, MissingDependencyError

OPSET = 17
# Different lengths in one padded batch, one long enough to reach max_length: padding,
# masking and every position embedding are all exercised by the check.
SAMPLE_TEXTS = (
    "A short one.",
    "Real-time strategy game of ancient warfare, free and open source.",
    "",
    "Library for reading and writing Delta Lake tables; command-line tools and Python bindings included.",
    "Naïve café résumé — unicode, punctuation!? and numbers 12345 mixed in.",
    " ".join(["The embedding warehouse runs the encoder once per document and keeps every layer."] * 60),
)


@dataclass(frozen=True)
class ExportReport:
    key: str
    path: Path  # the artifact directory
    max_abs_diff: float  # largest |onnxruntime - torch| over every layer of the sample batch
    tolerance: float
    seconds: float  # how long the export took (when reused: the original export's time)
    onnx_bytes: int
    reused: bool = False  # the artifact already existed and was not rebuilt


def export_model(source: ModelSource, dest: Path, *, tolerance: float = 1e-4) -> ExportReport:
    """Write the artifact directory ``dest`` (model.onnx, tokenizer.json, model.json) for ``source``.

    The directory appears complete or not at all: it is built next to ``dest`` and renamed into
    place. If ``dest`` already holds this model, it is reused as is.
    """
    dest = Path(dest)
    if (dest / CARD_FILE).is_file():
        return _reuse(source, dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists but holds no {CARD_FILE}: remove it or choose another destination")
    if not tolerance >= 0:
        raise ExportError(f"tolerance must be a number >= 0, got {tolerance!r}")
    torch, transformers = _train_modules()

    started = time.perf_counter()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    except OSError as error:
        raise ExportError(f"cannot write next to {dest}: {error}") from error
    try:
        card = _build(source, build, tolerance=tolerance, torch=torch, transformers=transformers, started=started)
        if dest.is_dir():
            dest.rmdir()  # an empty directory, checked above
        os.rename(build, dest)
    except OSError as error:
        shutil.rmtree(build, ignore_errors=True)
        if (dest / CARD_FILE).is_file():  # another process exported the same model meanwhile
            return _reuse(source, dest)
        raise ExportError(f"could not write {dest}: {error}") from error
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return _report(card, dest, reused=False)


def _build(source: ModelSource, build: Path, *, tolerance: float, torch, transformers, started: float) -> ModelCard:
    try:
        tokenizer, model, input_names, model_inputs = _load_torch_model(source, torch, transformers)
        _save_backend_tokenizer(tokenizer, build / TOKENIZER_FILE)
        pooled_layers = _pooled_layers(torch, model, source.pooling)

        batch, inputs = model_inputs(SAMPLE_TEXTS)
        with torch.inference_mode():
            expected = pooled_layers(*inputs).numpy()  # (B, num_layers + 1, dim)
        if expected.shape[1:] != (source.num_layers + 1, source.dim):
            raise ExportError(
                f"{source.name} returned {expected.shape[1] - 1} layers of {expected.shape[2]} dims, "
                f"but its config says {source.num_layers} of {source.dim}"
            )
        _check_tokenizer(build / TOKENIZER_FILE, batch, source)

        raw = build / "raw.onnx"
        _to_onnx(torch, pooled_layers, model_inputs, raw, input_names, {OUTPUT_NAME: {0: "batch"}})
        fused = build / "fused.onnx"
        candidates = [fused, raw] if _fuse(raw, fused, source) else [raw]
    except EwError:
        raise
    except Exception as error:  # torch/transformers/onnx failures: report them as an export failure
        raise ExportError(
            f"exporting {source.name} ({source.path}) to ONNX failed: {first_line(error)}; check that the directory "
            "holds a complete Hugging Face encoder (weights in safetensors are safest)"
        ) from error

    card = _card(source, input_names, pad_token_id=tokenizer.pad_token_id, torch=torch, transformers=transformers)

    def encode_samples(candidate: Path) -> float:
        os.replace(candidate, build / MODEL_FILE)
        card.save(build)
        encoder = Encoder.load(build, threads=usable_cores())
        vectors = encoder.encode(list(SAMPLE_TEXTS), batch_size=len(SAMPLE_TEXTS)).vectors  # one padded batch
        return float(np.abs(vectors - expected).max())

    kept, max_abs_diff = _keep_first_within_tolerance(candidates, encode_samples, tolerance, source)
    for leftover in (raw, fused):
        leftover.unlink(missing_ok=True)
    card = dataclasses.replace(
        card,
        max_abs_diff=max_abs_diff,
        tolerance=tolerance,
        # Whether onnxruntime's transformer fusions (attention, layer norm, gelu) are in the stored graph.
        fused=kept == fused,
        export_seconds=round(time.perf_counter() - started, 3),
        onnx_sha256=file_digest(build / MODEL_FILE),
        tokenizer_sha256=file_digest(build / TOKENIZER_FILE),
    )
    card.save(build)
    return card


def export_states(source: ModelSource, artifact: Path, *, layer: int, tolerance: float = 1e-4) -> StatesGraph:
    """Add ``states-<layer>.onnx`` and the ``torch/`` weights to the artifact of ``source``; reuse them when there.

    The graph is verified through :meth:`Encoder.encode_states` on the sample texts: its pooled
    vectors and its states of every real token (padding excluded) against torch, and its pooled
    vectors against ``model.onnx``'s, all within ``tolerance``; otherwise ExportError and the
    artifact stays as it was. Files appear whole (built beside, renamed into place);
    ``states.json`` is written last, so a graph it does not list is never trusted.

    >>> export_states(resolve_model("minilm"), artifact, layer=4).max_abs_diff   # doctest: +SKIP
    3.1e-06
    """
    artifact = Path(artifact)
    card = ModelCard.load(artifact)
    if card.key != source.key:
        raise ExportError(f"{artifact} holds model {card.key!r}, not {source.key!r}: token states need the same model")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= card.num_layers:
        raise ExportError(f"token states: layer {layer!r} does not exist; {card.key} has layers 0..{card.num_layers}")
    if not tolerance >= 0:
        raise ExportError(f"tolerance must be a number >= 0, got {tolerance!r}")
    states_card = StatesCard.load(artifact)
    if states_card is not None and layer in states_card.graphs and (artifact / states_file(layer)).is_file():
        return states_card.graphs[layer]
    torch, transformers = _train_modules()

    started = time.perf_counter()
    build = Path(tempfile.mkdtemp(prefix=f".states-{layer}.", suffix=".partial", dir=artifact))
    try:
        graph, weights = _build_states(source, artifact, build, layer=layer, tolerance=tolerance, torch=torch,
                                       transformers=transformers, started=started)
        if not (artifact / TORCH_DIR).is_dir():
            os.rename(build / TORCH_DIR, artifact / TORCH_DIR)
        os.replace(build / graph.file, artifact / graph.file)
        known = states_card.graphs if states_card is not None else {}
        StatesCard(weights=weights, graphs={**known, layer: graph}).save(artifact)
    except OSError as error:
        raise ExportError(f"could not write the token-state graph into {artifact}: {error}") from error
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return graph


def _build_states(source: ModelSource, artifact: Path, build: Path, *, layer: int, tolerance: float, torch,
                  transformers, started: float) -> tuple[StatesGraph, dict[str, str]]:
    """Export, fuse and verify states-<layer>.onnx in ``build``, and copy the weights to ``build/torch``."""
    try:
        _, model, input_names, model_inputs = _load_torch_model(source, torch, transformers)
        wrapped = _pooled_layers(torch, model, source.pooling, states_layer=layer)
        batch, inputs = model_inputs(SAMPLE_TEXTS)
        with torch.inference_mode():
            expected_pooled, expected_states = (t.numpy() for t in wrapped(*inputs))  # (B, L+1, D), (B, T, D)
        real = batch["attention_mask"].numpy().sum(axis=1)  # real tokens per sample text
        weights = _copy_weights(source, model, build / TORCH_DIR)
        raw = build / "raw.onnx"
        _to_onnx(torch, wrapped, model_inputs, raw, input_names,
                 {OUTPUT_NAME: {0: "batch"}, STATES_OUTPUT: {0: "batch", 1: "sequence"}})
        fused = build / "fused.onnx"
        candidates = [fused, raw] if _fuse(raw, fused, source) else [raw]
    except EwError:
        raise
    except Exception as error:  # torch/transformers/onnx failures: report them as an export failure
        raise ExportError(f"exporting layer {layer} token states of {source.name} to ONNX failed: {error}") from error

    # The real inference path, on a view of the artifact whose states graph is the candidate.
    for name in (CARD_FILE, TOKENIZER_FILE, MODEL_FILE):
        (build / name).symlink_to(artifact / name)
    samples = list(SAMPLE_TEXTS)
    model_vectors = Encoder.load(artifact, threads=usable_cores()).encode(samples, batch_size=len(samples)).vectors
    pooled_vs_model: list[float] = []

    def max_diff(candidate: Path) -> float:
        os.replace(candidate, build / states_file(layer))
        encoded = Encoder.load(build, threads=usable_cores()).encode_states(samples, layer=layer, batch_size=len(samples))
        pooled_vs_model.append(float(np.abs(encoded.vectors - model_vectors).max()))
        diffs = [np.abs(encoded.vectors - expected_pooled).max(), pooled_vs_model[-1]]
        for states, expected, n in zip(encoded.states, expected_states, real):
            if states.shape != (n, source.dim):
                raise ExportError(f"{states_file(layer)} returned {states.shape} states for a text of {n} tokens")
            diffs.append(np.abs(states - expected[:n]).max())
        return float(max(diffs))

    kept, max_abs_diff = _keep_first_within_tolerance(candidates, max_diff, tolerance, source)
    graph = StatesGraph(
        layer=layer, max_abs_diff=max_abs_diff, pooled_vs_model=pooled_vs_model[-1], tolerance=tolerance,
        fused=kept == fused, export_seconds=round(time.perf_counter() - started, 3),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return graph, weights


def _copy_weights(source: ModelSource, model, dest: Path) -> dict[str, str]:
    """config.json + model.safetensors of the encoder into ``dest``; their SHA-256 by file name.

    The source's own files when it has a single model.safetensors (byte for byte what the model
    key fingerprints); otherwise the loaded model saved as safetensors.
    """
    dest.mkdir()
    if (source.path / "model.safetensors").is_file():
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(source.path / name, dest / name)
    else:
        model.save_pretrained(str(dest), safe_serialization=True, max_shard_size="1000GB")
    return {path.name: file_digest(path) for path in sorted(dest.iterdir()) if path.is_file()}


def _load_torch_model(source: ModelSource, torch, transformers):
    """(tokenizer, eval model, its graph input names, texts -> (batch, positional inputs)) of ``source``."""
    transformers.logging.disable_progress_bar()  # a progress bar per export is noise in the CLI
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.path), use_fast=True)
    if not tokenizer.is_fast:
        raise ExportError(f"{source.name} has no fast tokenizer: ew tokenizes with the `tokenizers` library")
    # Eager attention exports as plain MatMul/Softmax, the pattern onnxruntime's optimizer fuses.
    model = transformers.AutoModel.from_pretrained(str(source.path), attn_implementation="eager", dtype=torch.float32)
    model.eval()
    input_names = [n for n in INPUT_NAMES if n in inspect.signature(model.forward).parameters]

    def model_inputs(texts):
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=source.max_length, return_tensors="pt")
        return batch, tuple(batch[n] if n in batch else torch.zeros_like(batch["input_ids"]) for n in input_names)

    return tokenizer, model, input_names, model_inputs


def _to_onnx(torch, module, model_inputs, path: Path, input_names: list[str], outputs: dict[str, dict]) -> None:
    """Trace ``module`` to ``path``; ``outputs`` maps each output name to its dynamic axes."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in transformers
        # Traced on a smaller batch than the checks, so the checks prove the axes are dynamic.
        torch.onnx.export(
            module,
            model_inputs(SAMPLE_TEXTS[:2])[1],
            str(path),
            input_names=input_names,
            output_names=list(outputs),
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in input_names}, **outputs},
            opset_version=OPSET,
            do_constant_folding=True,
            # The legacy exporter needs no onnxscript and is several times faster than dynamo here.
            dynamo=False,
        )


def _keep_first_within_tolerance(
    candidates: list[Path], max_diff: Callable[[Path], float], tolerance: float, source: ModelSource
) -> tuple[Path, float]:
    """Try each graph through the real inference path (``max_diff`` installs it and measures it) until one agrees with torch."""
    diffs = []
    for candidate in candidates:
        diffs.append(max_diff(candidate))
        if diffs[-1] <= tolerance:
            return candidate, diffs[-1]
    raise ExportError(
        f"the ONNX export of {source.name} disagrees with torch: max abs diff {min(diffs):.3g} "
        f"over all layers exceeds the tolerance {tolerance:g}; pass a larger tolerance only if that is acceptable"
    )


def _pooled_layers(torch, model, pooling: str, states_layer: int | None = None):
    """Wrap ``model`` so that one positional call returns (B, num_layers + 1, dim) pooled vectors,
    and with ``states_layer`` also that layer's hidden states (B, T, dim).

    Positional, because the legacy exporter passes inputs positionally and BertModel.forward's
    positional order is not (input_ids, attention_mask, token_type_ids).
    """

    class PooledLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
            hidden = torch.stack(out.hidden_states, dim=1)  # (B, L+1, T, D)
            if pooling == "cls":
                pooled = hidden[:, :, 0]
            else:
                # Exactly sentence-transformers' mean pooling: masked sum / clamped token count.
                mask = attention_mask.to(hidden.dtype)[:, None, :, None]  # (B, 1, T, 1)
                pooled = (hidden * mask).sum(dim=2) / torch.clamp(mask.sum(dim=2), min=1e-9)
            if states_layer is None:
                return pooled
            return pooled, out.hidden_states[states_layer]  # (B, T, D), padding included

    return PooledLayers().eval()


def _fuse(raw: Path, fused: Path, source: ModelSource) -> bool:
    """Apply onnxruntime's BERT fusions; False when they do not apply (verification decides if they are kept)."""
    from onnxruntime.transformers.optimizer import optimize_model

    config = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
    try:
        # opt_level=0: only graph fusions are stored; onnxruntime adds its machine-specific ones at load.
        optimized = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=int(config.get("num_attention_heads", 0)),
            hidden_size=source.dim,
            opt_level=0,
        )
        optimized.save_model_to_file(str(fused), use_external_data_format=False)
    except Exception:  # an architecture the optimizer does not know: the plain graph is still correct
        return False
    return True


def _save_backend_tokenizer(tokenizer, path: Path) -> None:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: leave transformers' object alone
    backend.no_truncation()  # the encoder sets max_length from the card and pads per batch
    backend.no_padding()
    backend.save(str(path))


def _check_tokenizer(path: Path, batch, source: ModelSource) -> None:
    """The `tokenizers` file must give the ids transformers gave, or the verification compares different inputs."""
    from tokenizers import Tokenizer

    standalone = Tokenizer.from_file(str(path))
    standalone.enable_truncation(source.max_length)
    for text, ids, mask in zip(SAMPLE_TEXTS, batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        expected = [i for i, m in zip(ids, mask) if m]
        if standalone.encode(text).ids != expected:
            raise ExportError(f"{source.name}: tokenizer.json tokenizes {text[:40]!r} differently from transformers")


def _card(source: ModelSource, input_names: list[str], *, pad_token_id, torch, transformers) -> ModelCard:
    import onnx
    import onnxruntime

    return ModelCard(
        key=source.key,
        name=source.name,
        source=source.source,
        fingerprint=source.fingerprint,
        export_format=EXPORT_FORMAT,
        pooling=source.pooling,
        max_length=source.max_length,
        precision=source.precision,
        dim=source.dim,
        num_layers=source.num_layers,
        input_names=tuple(input_names),
        output_name=OUTPUT_NAME,
        pad_token_id=int(pad_token_id or 0),
        versions={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _reuse(source: ModelSource, dest: Path) -> ExportReport:
    card = ModelCard.load(dest)
    if card.key != source.key:
        raise ExportError(
            f"{dest} already holds model {card.key!r}, not {source.key!r}: choose another destination"
        )
    return _report(card, dest, reused=True)


def _report(card: ModelCard, dest: Path, *, reused: bool) -> ExportReport:
    model_file = dest / MODEL_FILE
    return ExportReport(
        key=card.key,
        path=dest,
        max_abs_diff=float("nan") if card.max_abs_diff is None else card.max_abs_diff,
        tolerance=float("nan") if card.tolerance is None else card.tolerance,
        seconds=card.export_seconds,
        onnx_bytes=model_file.stat().st_size if model_file.is_file() else 0,
        reused=reused,
    )


def _train_modules():
    """(torch, transformers), or a MissingDependencyError naming the extra to install."""
    modules = []
    for name in ("torch", "transformers", "onnx"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise MissingDependencyError(name, "train", "exporting a model to ONNX") from error
    return modules[0], modules[1]
