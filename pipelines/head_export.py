"""Export a trained head, whatever its kind, to one ONNX graph from token ids to class probabilities.

The graph is the base encoder up to the layer the head reads (embeddings + ``encoder.layer[:K]``),
then, for heads trained with ``--tune top|lora``, their layers above K, then pooling, the head and
a softmax. It takes the inputs ew's own model graph takes (``input_ids``, ``attention_mask`` and,
for BERT, ``token_type_ids``; int64 ``[batch, sequence]``) and returns ``probabilities``, float32
``[batch, classes]``; the class names are in the graph's metadata (``classes``, a JSON list). The
tokenizer is copied beside the graph, so a head can be served without ew. The graph is checked
against torch on sample texts before it is kept.

>>> export_head(Path("heads/section"), Path("serve/section.onnx"), artifact_dir=Path("artifact"))  # doctest: +SKIP
HeadExportReport(path=..., max_abs_diff=3e-07, ...)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.artifacts import TOKENIZER_FILE, TORCH_DIR, ModelCard
from pipelines.errors import ExportError, HeadError
from warehouse.errors import EwError
from warehouse.output import new_file_permissions
from pipelines.tracing import OPSET, SAMPLE_TEXTS
from pipelines.head_card import read_head_files
from pipelines.recycling import torch_module, from_text
from pipelines.top import build_lower

OUTPUT_NAME = "probabilities"


def export_registered_head(warehouse, name: str, *, output: Path, tolerance: float = 1e-4) -> "HeadExportReport":
    """`ew export-head NAME --output FILE`: :func:`export_head` for a head of the warehouse's catalog.

    The base weights come from the model artifact's ``torch/`` copy (made when token states
    are first cached) or, for a plain head on a model without it, from the model's own
    directory, found as at export (it must be the same weights: the model key says so).
    """
    from .head_catalog import find_head
    from .models import resolve_model
    from .registry import model_row

    row = find_head(warehouse, name)
    artifact = warehouse.artifact_path(model_row(warehouse, row.model).artifact)
    weights = artifact / TORCH_DIR
    if not weights.is_dir():
        card = ModelCard.load(artifact)
        try:
            source = resolve_model(card.name, pooling=card.pooling, max_length=card.max_length)
        except EwError:
            source = None
        if source is None or source.key != card.key:
            raise ExportError(
                f"exporting head {name!r} needs the weights of {card.key} ({card.name}), which are not on this machine "
                f"and not in {weights}; install the model, or cache its token states once "
                f"(`ew ingest FILE --model DIR --token-states {card.num_layers}`), which copies them there"
            )
        weights = source.path
    return export_head(warehouse.artifact_path(row.artifact), output, artifact_dir=artifact, weights_dir=weights,
                       tolerance=tolerance)


@dataclass(frozen=True)
class HeadExportReport:
    path: Path  # the ONNX graph
    tokenizer: Path  # tokenizer.json, beside it
    classes: tuple[str, ...]
    max_abs_diff: float  # largest |onnxruntime - torch| probability over the sample texts
    tolerance: float
    onnx_bytes: int


def export_head(
    head_dir: Path, output: Path, *, artifact_dir: Path, weights_dir: Path | None = None, tolerance: float = 1e-4
) -> HeadExportReport:
    """Write ``output`` (ONNX) and ``tokenizer.json`` beside it for the head in ``head_dir``.

    ``artifact_dir`` is the model artifact the head's model key names (its card gives the
    inputs, max_length and tokenizer); ``weights_dir`` defaults to ``artifact_dir/torch``.
    ``output`` must not exist; an existing ``tokenizer.json`` beside it must be the same file.
    """
    output, artifact_dir = Path(output), Path(artifact_dir)
    weights_dir = Path(weights_dir) if weights_dir is not None else artifact_dir / TORCH_DIR
    card, weights = read_head_files(head_dir)
    model = ModelCard.load(artifact_dir)
    if model.key != card.model:
        raise HeadError(f"head {card.name!r} reads model {card.model!r}, but {artifact_dir} holds {model.key!r}; "
                        "pass the artifact of the head's model")
    tokenizer_out = output.parent / TOKENIZER_FILE
    if output.exists():
        raise ExportError(f"{output} already exists; remove it or choose another --output")
    if tokenizer_out.exists() and tokenizer_out.read_bytes() != (artifact_dir / TOKENIZER_FILE).read_bytes():
        raise ExportError(f"{tokenizer_out} exists and is another tokenizer; choose another folder for --output")
    import torch

    top = torch_module(card, weights, weights_dir=weights_dir, where=str(head_dir))
    classifier = from_text(build_lower(weights_dir, card.layer), top, probabilities=True).eval()
    feeds = _sample_feeds(artifact_dir, model)
    with torch.inference_mode():
        expected = classifier(*(torch.from_numpy(feeds[n]) for n in model.input_names)).numpy()  # (B, C)

    output.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    os.fchmod(handle, new_file_permissions(output))  # mkstemp makes 0600; a served model is read by others
    os.close(handle)
    try:
        _trace(torch, classifier, feeds, model.input_names, Path(staging))
        _add_metadata(Path(staging), {"classes": json.dumps(list(card.classes)), "head": card.name,
                                      "model": card.model, "max_length": str(model.max_length)})
        max_abs_diff = _check(Path(staging), feeds, model.input_names, expected, tolerance, card.name)
        if not tokenizer_out.exists():
            shutil.copyfile(artifact_dir / TOKENIZER_FILE, tokenizer_out)
        os.link(staging, output)  # fails if output appeared meanwhile: never overwrite
    except FileExistsError:
        raise ExportError(f"{output} already exists; remove it or choose another --output") from None
    finally:
        Path(staging).unlink(missing_ok=True)
    return HeadExportReport(path=output, tokenizer=tokenizer_out, classes=card.classes, max_abs_diff=max_abs_diff,
                            tolerance=tolerance, onnx_bytes=output.stat().st_size)


def _sample_feeds(artifact_dir: Path, model: ModelCard) -> dict[str, np.ndarray]:
    """SAMPLE_TEXTS as one padded batch, tokenized as ew's encoder does (int64 (B, T) each)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(artifact_dir / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.enable_truncation(model.max_length)
    encodings = tokenizer.encode_batch(list(SAMPLE_TEXTS))
    width = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), width), model.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        ids[row, :n], mask[row, :n], types[row, :n] = encoding.ids, 1, encoding.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _trace(torch, classifier, feeds: dict[str, np.ndarray], input_names: tuple[str, ...], path: Path) -> None:
    # Traced on two texts; the check runs all of them, which proves batch and sequence axes are dynamic.
    sample = tuple(torch.from_numpy(feeds[n][:2, : int(feeds["attention_mask"][:2].sum(1).max())]) for n in input_names)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow in transformers
            torch.onnx.export(
                classifier, sample, str(path), input_names=list(input_names), output_names=[OUTPUT_NAME],
                dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in input_names}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True,
                dynamo=False,  # as pipelines.export: no onnxscript needed, and faster
            )
    except Exception as error:  # torch/onnx failures are an export failure, not a traceback
        raise ExportError(f"exporting the head to ONNX failed: {error}") from error


def _add_metadata(path: Path, values: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    for key, value in values.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def _check(path: Path, feeds, input_names, expected: np.ndarray, tolerance: float, name: str) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run([OUTPUT_NAME], {n: feeds[n] for n in input_names})
    max_abs_diff = float(np.abs(actual - expected).max())
    if not max_abs_diff <= tolerance:
        raise ExportError(f"the ONNX export of head {name!r} disagrees with torch: max abs diff {max_abs_diff:.3g} "
                          f"exceeds the tolerance {tolerance:g}")
    return max_abs_diff
