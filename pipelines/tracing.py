"""Tracing a Hugging Face encoder to ONNX, shared by the model export and the token-states export.

Load the torch model, wrap it so one positional call returns every layer's pooled vector (and,
for a states graph, one layer's hidden states), trace it, let onnxruntime fuse it, and keep the
first graph that agrees with torch through the real inference path. torch and transformers are
passed in by the caller (:func:`train_modules`), so importing this module needs neither.
"""
from __future__ import annotations

import importlib
import inspect
import json
import warnings
from collections.abc import Callable
from pathlib import Path

from pipelines.artifacts import INPUT_NAMES
from pipelines.errors import ExportError, MissingDependencyError
from pipelines.models import ModelSource

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
RAW_FILE = "raw.onnx"      # the traced graph
FUSED_FILE = "fused.onnx"  # the same after onnxruntime's transformer fusions, when they apply


def traced_candidates(torch, module, model_inputs, build: Path, input_names: list[str],
                      outputs: dict[str, dict], source: ModelSource) -> list[Path]:
    """Trace ``module`` into ``build`` and fuse it; the graphs to verify, the fused one first."""
    raw, fused = build / RAW_FILE, build / FUSED_FILE
    to_onnx(torch, module, model_inputs, raw, input_names, outputs)
    return [fused, raw] if fuse(raw, fused, source) else [raw]


def load_torch_model(source: ModelSource, torch, transformers):
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


def pooled_layers(torch, model, pooling: str, states_layer: int | None = None):
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


def to_onnx(torch, module, model_inputs, path: Path, input_names: list[str], outputs: dict[str, dict]) -> None:
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


def fuse(raw: Path, fused: Path, source: ModelSource) -> bool:
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


def keep_first_within_tolerance(
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


def train_modules():
    """(torch, transformers), or a MissingDependencyError naming the extra to install."""
    modules = []
    for name in ("torch", "transformers", "onnx"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise MissingDependencyError(name, "train", "exporting a model to ONNX") from error
    return modules[0], modules[1]
