"""Reduced-precision encoder graphs (``--precision int8|bf16``) and the guard that keeps them honest.

An int8 or bf16 artifact is made from the verified fp32 graph at export; every layer's pooled
vectors of the reduced graph are then compared with fp32's on sample texts, and the export is
refused when any layer's minimum cosine falls below the guard. The measured agreement is kept
in the model card (:class:`pipelines.artifacts.LayerAgreement`) and shown by ``ew models``.

onnx and onnxruntime's quantization tools are imported only when a graph is reduced.

>>> bf16_unavailable()          # doctest: +SKIP
'this CPU has no bf16 instructions (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo)'
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from .artifacts import LayerAgreement
from .errors import ExportError, ModelOptionError
from .tracing import SAMPLE_TEXTS

# Refuse a reduced graph whose vectors, on any layer and any sample text, are further than this
# (cosine) from fp32's: 0.995 keeps nearest-neighbour rankings and head accuracy close to fp32's.
PRECISION_GUARD = 0.995
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
# Compared with fp32 beside the export's SAMPLE_TEXTS (which hold the extremes: an empty text,
# one past max_length): ordinary one-line descriptions, where most of a corpus lies.
AGREEMENT_TEXTS = (
    "Command-line JSON processor, like sed for JSON data.",
    "Python bindings for the GTK graphical user interface toolkit.",
    "Fast, scalable, distributed revision control system.",
    "Shared library for reading and writing PNG images.",
    "Documentation and examples for the Perl DBI database interface.",
    "Lightweight web server with a small memory footprint.",
    "Fonts covering Latin, Greek and Cyrillic scripts.",
    "Utilities to monitor hard disk health through SMART.",
    "Scientific plotting package with a Matlab-like interface.",
    "Transitional dummy package; it can be safely removed.",
)


def agreement_texts() -> tuple[str, ...]:
    """The texts the guard measures: the export's samples and a few ordinary descriptions, blank ones left
    out because ingest rejects them (their vectors, from [CLS] [SEP] alone, are the first to drift)."""
    return tuple(text for text in SAMPLE_TEXTS if text.strip()) + AGREEMENT_TEXTS


def reduce_precision(fp32_graph: Path, out: Path, precision: str) -> None:
    """Write ``out``, the ``precision`` version of the verified fp32 graph ``fp32_graph``."""
    if precision == "int8":
        _quantize_int8(fp32_graph, out)
    elif precision == "bf16":
        _convert_bf16(fp32_graph, out)
    else:
        raise ValueError(f"no reduced graph for precision {precision!r}")


def check_available(precision: str, *, model: str) -> None:
    """Raise ModelOptionError when this machine cannot run ``precision`` graphs (only bf16 can be missing)."""
    if precision == "bf16":
        reason = bf16_unavailable()
        if reason is not None:
            raise ModelOptionError(model, "precision", precision, f"--precision int8 (or fp32): {reason}")


def bf16_unavailable() -> str | None:
    """Why bf16 graphs cannot run here, or None when they can: the CPU needs the instructions and
    onnxruntime's CPU provider a bf16 MatMul kernel (it had none up to 1.32, on AMX CPUs too)."""
    flags = cpu_flags()
    if not any(flag in flags for flag in BF16_FLAGS):
        return f"this CPU has no bf16 instructions (neither {' nor '.join(BF16_FLAGS)} in {CPUINFO})"
    if not onnxruntime_runs_bf16():
        import onnxruntime

        return (f"the CPU has bf16 instructions but onnxruntime {onnxruntime.__version__}'s CPU provider has no bf16 "
                "MatMul kernel")
    return None


def cpu_flags() -> frozenset[str]:
    """The first CPU's flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def onnxruntime_runs_bf16() -> bool:
    """Whether onnxruntime loads and runs the pattern :func:`_convert_bf16` writes (Cast, MatMul, Cast)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        _bf16_matmul("x", "weight", "y"),
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (result,) = session.run(None, {"x": np.ones((2, 4), np.float32)})
    except Exception:  # NOT_IMPLEMENTED: no bf16 kernel
        return False
    return bool(np.allclose(result, 1.0))


def agreement(reduced: np.ndarray, reference: np.ndarray) -> tuple[LayerAgreement, ...]:
    """Per layer, the min and mean cosine between each text's ``reduced`` and ``reference`` vectors.

    Both are (N, num_layers + 1, dim).
    """
    dot = (reduced * reference).sum(axis=-1, dtype=np.float64)  # (N, L+1)
    norms = np.linalg.norm(reduced, axis=-1) * np.linalg.norm(reference, axis=-1)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)
    return tuple(
        LayerAgreement(layer=layer, min_cosine=round(float(cosine[:, layer].min()), 6),
                       mean_cosine=round(float(cosine[:, layer].mean()), 6))
        for layer in range(cosine.shape[1])
    )


def check_guard(measured: Sequence[LayerAgreement], guard: float, *, model: str, precision: str, texts: int) -> None:
    """Refuse (ExportError) a reduced graph whose worst layer falls below ``guard``."""
    worst = min(measured, key=lambda a: a.min_cosine)
    if worst.min_cosine < guard:
        raise ExportError(
            f"the {precision} graph of {model} disagrees with fp32: layer {worst.layer}'s vectors have a min cosine of "
            f"{worst.min_cosine:.4f} (mean {worst.mean_cosine:.4f}) to fp32's over {texts} sample texts, below the "
            f"guard {guard:g}; use --precision fp32, or lower the guard (--precision-guard) only if that is acceptable"
        )


def check_guard_value(guard: float) -> float:
    if isinstance(guard, bool) or not isinstance(guard, (int, float)) or not 0 < guard <= 1:
        raise ExportError(f"--precision-guard must be a cosine in (0, 1], got {guard!r}")
    return float(guard)


# -- int8 ------------------------------------------------------------------------------------------
# The rule, measured on all-MiniLM-L6-v2 (fused graph, per-channel int8 weights, per-tensor uint8
# activations) against fp32, min cosine of the last layer (the worst) over 45 texts (the export's
# samples + 40 Debian descriptions) / over agreement_texts(), and CPU time on 250 Debian docs
# (1 thread, AVX-512 VNNI):
#   everything quantized                               0.9896 /   -    1.43x faster
#   embeddings fp32                                    0.9904 /   -
#   + FFN down-projection fp32 (every layer)           0.9952 / 0.9935  (fails the 0.995 guard)
#   + first and/or last layer fp32                     0.9935 /   -     (errors start early, grow late)
#   embeddings and both FFN MatMuls fp32 (the rule)    0.9967 / 0.9977  1.19x faster
# Per layer (agreement_texts, the rule): min 1.0, .9999, .9997, .9993, .9990, .9990, .9977.
# One node at a time, the FFN MatMuls cost the most (GELU's outliers and the wide inner activations
# share one per-tensor scale), the attention projections least; quantize_dynamic's scales are
# per batch, so a text's int8 vector also depends slightly on its batch mates.
# What else was tried (onnxruntime 1.32, 1,000 Debian docs, 2 threads, min cosine of layer 6):
#   everything quantized, dynamic: 1.6-1.7x fp32's docs/s but 0.990; the rule: 1.12-1.2x. Profiled,
#     the all-int8 graph still spends 27% in SkipLayerNormalization and BiasGelu (fp32), and
#     QAttention's softmax and score products stay fp32: no int8 graph reaches 2x here.
#   static QDQ (symbolic shape inference, MinMax calibration on 400 texts, per-channel weights):
#     0.87x fp32 (the CPU provider runs the Q/DQ pairs instead of fusing them) and 0.879.
#   SmoothQuant (alpha 0.5) on both FFN MatMuls, then dynamic int8: 0.959, worse, since the
#     per-output-channel weight scales absorb the input-channel factors badly.


EMBEDDING_OPS = ("EmbedLayerNormalization", "Gather")


def _quantize_int8(fp32_graph: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_graph))
    quantize_dynamic(
        model,
        out,
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=int8_excluded_nodes(model),
        # The fused graph's contrib ops (Attention, SkipLayerNormalization) defeat shape inference.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def int8_excluded_nodes(model) -> list[str]:
    """The nodes the rule above keeps in fp32: embedding lookups, and every MatMul whose stored weight
    is not square (the feed-forward up- and down-projections); attention projections are quantized."""
    shapes = {initializer.name: tuple(initializer.dims) for initializer in model.graph.initializer}
    excluded = []
    for node in model.graph.node:
        weight = shapes.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if node.op_type in EMBEDDING_OPS or (weight is not None and len(weight) == 2 and weight[0] != weight[1]):
            excluded.append(node.name)
    return excluded


# -- bf16 ------------------------------------------------------------------------------------------


def _convert_bf16(fp32_graph: Path, out: Path) -> None:
    """Every MatMul by a stored weight runs in bf16 (inputs cast in, result cast back to fp32); the rest,
    fused attention and layer norms included, stays fp32, as onnxruntime has no bf16 kernels for them.

    Not verified on a machine where it runs: up to onnxruntime 1.32, :func:`onnxruntime_runs_bf16`
    is False even on AMX-bf16 CPUs, so :func:`check_available` refuses bf16 before this is reached.
    """
    import onnx

    model = onnx.load(str(fp32_graph))
    weights = {initializer.name for initializer in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            nodes.extend(_bf16_matmul(node.input[0], node.input[1], node.output[0]))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))


def _bf16_matmul(activation: str, weight: str, output: str) -> list:
    """``output = activation @ weight`` computed in bf16: the pattern the probe and the conversion share."""
    from onnx import TensorProto, helper

    return [
        helper.make_node("Cast", [activation], [f"{output}/bf16_in"], to=TensorProto.BFLOAT16),
        helper.make_node("Cast", [weight], [f"{output}/bf16_weight"], to=TensorProto.BFLOAT16),
        helper.make_node("MatMul", [f"{output}/bf16_in", f"{output}/bf16_weight"], [f"{output}/bf16_out"]),
        helper.make_node("Cast", [f"{output}/bf16_out"], [output], to=TensorProto.FLOAT),
    ]
