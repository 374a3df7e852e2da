"""Export a Hugging Face encoder to one ONNX graph that returns every layer's pooled vector.

The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has
them), int64 ``[batch, sequence]``, and returns ``pooled``: float32 ``[batch, num_layers + 1, dim]``,
layer 0 being the embedding output. The export is checked against torch before it is kept.

:func:`export_states` (:mod:`pipelines.states_export`) adds a layer's token-states graph to such
an artifact on first need; both trace through :mod:`pipelines.tracing`.

torch and transformers are imported only when an export runs: inference never needs them.

>>> report = export_model(resolve_model("minilm"), Path("artifacts/minilm"))   # doctest: +SKIP
>>> report.max_abs_diff < report.tolerance                                     # doctest: +SKIP
True
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipelines.artifacts import CARD_FILE, MODEL_FILE, OUTPUT_NAME, TOKENIZER_FILE, ModelCard
from pipelines.encoder import Encoder, usable_cores
from pipelines.errors import ExportError
from pipelines.models import EXPORT_FORMAT, ModelSource
from pipelines.precision import (
    PRECISION_GUARD, agreement, agreement_texts, check_available, check_guard, check_guard_value, reduce_precision,
)
from pipelines.tracing import (
    FUSED_FILE, RAW_FILE, SAMPLE_TEXTS, keep_first_within_tolerance, load_torch_model, pooled_layers,
    traced_candidates, train_modules,
)
from warehouse.errors import EwError, first_line
from warehouse.keys import file_digest

FP32_FILE = "fp32.onnx"  # the verified fp32 graph while a reduced precision is made from it



@dataclass(frozen=True)
class ExportReport:
    key: str
    path: Path  # the artifact directory
    max_abs_diff: float  # largest |onnxruntime - torch| over every layer of the sample batch
    tolerance: float
    seconds: float  # how long the export took (when reused: the original export's time)
    onnx_bytes: int
    reused: bool = False  # the artifact already existed and was not rebuilt


def export_model(
    source: ModelSource, dest: Path, *, tolerance: float = 1e-4, precision_guard: float = PRECISION_GUARD
) -> ExportReport:
    """Write the artifact directory ``dest`` (model.onnx, tokenizer.json, model.json) for ``source``.

    An int8 or bf16 ``source`` is first exported and verified in fp32, then reduced; it is kept
    only if every layer's vectors keep a min cosine of ``precision_guard`` to fp32's on sample texts.

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
    precision_guard = check_guard_value(precision_guard)
    check_available(source.precision, model=source.name)
    torch, transformers = train_modules()

    started = time.perf_counter()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    except OSError as error:
        raise ExportError(f"cannot write next to {dest}: {error}") from error
    try:
        card = _build(source, build, tolerance=tolerance, precision_guard=precision_guard, torch=torch,
                      transformers=transformers, started=started)
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


def _build(source: ModelSource, build: Path, *, tolerance: float, precision_guard: float, torch, transformers,
           started: float) -> ModelCard:
    try:
        tokenizer, model, input_names, model_inputs = load_torch_model(source, torch, transformers)
        _save_backend_tokenizer(tokenizer, build / TOKENIZER_FILE)
        wrapped = pooled_layers(torch, model, source.pooling)

        batch, inputs = model_inputs(SAMPLE_TEXTS)
        with torch.inference_mode():
            expected = wrapped(*inputs).numpy()  # (B, num_layers + 1, dim)
        if expected.shape[1:] != (source.num_layers + 1, source.dim):
            raise ExportError(
                f"{source.name} returned {expected.shape[1] - 1} layers of {expected.shape[2]} dims, "
                f"but its config says {source.num_layers} of {source.dim}"
            )
        _check_tokenizer(build / TOKENIZER_FILE, batch, source)

        outputs = {OUTPUT_NAME: {0: "batch"}}
        candidates = traced_candidates(torch, wrapped, model_inputs, build, input_names, outputs, source)
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

    kept, max_abs_diff = keep_first_within_tolerance(candidates, encode_samples, tolerance, source)
    for leftover in (RAW_FILE, FUSED_FILE):
        (build / leftover).unlink(missing_ok=True)
    if source.precision != "fp32":
        card = _reduce(source, build, card, guard=precision_guard)
    card = dataclasses.replace(
        card,
        max_abs_diff=max_abs_diff,
        tolerance=tolerance,
        # Whether onnxruntime's transformer fusions (attention, layer norm, gelu) are in the stored graph.
        fused=kept.name == FUSED_FILE,
        export_seconds=round(time.perf_counter() - started, 3),
        onnx_sha256=file_digest(build / MODEL_FILE),
        tokenizer_sha256=file_digest(build / TOKENIZER_FILE),
    )
    card.save(build)
    return card


def _reduce(source: ModelSource, build: Path, card: ModelCard, *, guard: float) -> ModelCard:
    """Replace the verified fp32 graph in ``build`` by its ``source.precision`` version, measured layer by layer
    against it on :func:`agreement_texts` and refused below ``guard``."""
    texts = list(agreement_texts())
    reference = Encoder.load(build, threads=usable_cores()).encode(texts).vectors  # (N, L+1, D), the real batching
    fp32_graph = build / FP32_FILE
    os.replace(build / MODEL_FILE, fp32_graph)
    try:
        reduce_precision(fp32_graph, build / MODEL_FILE, source.precision)
        reduced = Encoder.load(build, threads=usable_cores()).encode(texts).vectors
    except Exception as error:  # onnx/onnxruntime failures, an unloadable graph: an export failure
        raise ExportError(
            f"reducing {source.name} to {source.precision} failed: {first_line(error)}; use --precision fp32"
        ) from error
    finally:
        fp32_graph.unlink(missing_ok=True)
    measured = agreement(reduced, reference)
    check_guard(measured, guard, model=source.name, precision=source.precision, texts=len(texts))
    return dataclasses.replace(card, agreement=measured, precision_guard=guard)


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
        vector_precision=source.vector_precision,
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


