"""Export the token-states graph of a layer beside an exported model, on first need.

:func:`export_states` adds ``states-K.onnx`` to an artifact: the same pooled vectors as
``model.onnx`` plus layer K's hidden state of every token (``states``, float32
``[batch, sequence, dim]``), checked against torch and against ``model.onnx``; and a copy of the
encoder's own weights in ``torch/``, from which training builds the layers above K without the
original model installed. torch and transformers are imported only when an export runs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipelines.artifacts import (
    CARD_FILE, MODEL_FILE, OUTPUT_NAME, STATES_OUTPUT, TOKENIZER_FILE, TORCH_DIR, ModelCard, StatesCard, StatesGraph,
    states_file,
)
from pipelines.encoder import Encoder, usable_cores
from pipelines.errors import ExportError
from pipelines.models import ModelSource
from pipelines.tracing import (
    FUSED_FILE, SAMPLE_TEXTS, keep_first_within_tolerance, load_torch_model, pooled_layers, traced_candidates,
    train_modules,
)
from warehouse.errors import EwError
from warehouse.keys import file_digest


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
    torch, transformers = train_modules()

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
        _, model, input_names, model_inputs = load_torch_model(source, torch, transformers)
        wrapped = pooled_layers(torch, model, source.pooling, states_layer=layer)
        batch, inputs = model_inputs(SAMPLE_TEXTS)
        with torch.inference_mode():
            expected_pooled, expected_states = (t.numpy() for t in wrapped(*inputs))  # (B, L+1, D), (B, T, D)
        real = batch["attention_mask"].numpy().sum(axis=1)  # real tokens per sample text
        weights = _copy_weights(source, model, build / TORCH_DIR)
        candidates = traced_candidates(torch, wrapped, model_inputs, build, input_names,
                                       {OUTPUT_NAME: {0: "batch"}, STATES_OUTPUT: {0: "batch", 1: "sequence"}}, source)
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

    kept, max_abs_diff = keep_first_within_tolerance(candidates, max_diff, tolerance, source)
    graph = StatesGraph(
        layer=layer, max_abs_diff=max_abs_diff, pooled_vs_model=pooled_vs_model[-1], tolerance=tolerance,
        fused=kept.name == FUSED_FILE, export_seconds=round(time.perf_counter() - started, 3),
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
