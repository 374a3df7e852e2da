import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import pipelines.precision as precision
from pipelines.artifacts import LayerAgreement, ModelCard
from pipelines.cli import cli
from pipelines.errors import ExportError
from pipelines.export import export_model
from pipelines.ingest import ingest
from pipelines.models import EXPORT_FORMAT, TOKENIZER_FILES, resolve_model
from warehouse import Warehouse
from warehouse.keys import file_digest, fingerprint, model_key


def test_precisions_get_different_keys(tiny_bert_dir):
    keys = {p: resolve_model(str(tiny_bert_dir), precision=p).key for p in ("fp32", "bf16", "int8")}
    assert len(set(keys.values())) == 3


def test_fp32_key_is_the_key_every_warehouse_already_holds(tiny_bert_dir):
    # The fingerprint as it was before other precisions existed: fp32 vectors keep their key.
    before = fingerprint({
        "export_format": EXPORT_FORMAT,
        "weights": {f.name: file_digest(f) for f in sorted(tiny_bert_dir.glob("*.safetensors"))},
        "config": file_digest(tiny_bert_dir / "config.json"),
        "tokenizer": {f: file_digest(tiny_bert_dir / f) for f in TOKENIZER_FILES if (tiny_bert_dir / f).is_file()},
        "pooling": "mean",
        "max_length": 16,
        "precision": "fp32",
    })
    source = resolve_model(str(tiny_bert_dir), max_length=16)
    assert source.key == model_key(source.name, before)


def _corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"the {w} data tool"}) + "\n"
                            for i, w in enumerate(["game", "python", "library", "text", "model"])))
    return path


def test_int8_ingest_end_to_end(tmp_path, tiny_bert_dir):
    wh = Warehouse.open(tmp_path / "wh", create=True)
    result = ingest(wh, _corpus(tmp_path), model=str(tiny_bert_dir), precision="int8")
    fp32_key = resolve_model(str(tiny_bert_dir)).key
    assert result.model == resolve_model(str(tiny_bert_dir), precision="int8").key != fp32_key
    assert result.embedded == 5
    (row,) = wh.models()
    assert row.precision == "int8"
    card = ModelCard.load(wh.root / row.artifact)
    assert card.precision_guard == precision.PRECISION_GUARD
    assert [a.layer for a in card.agreement] == [0, 1, 2]
    assert all(precision.PRECISION_GUARD <= a.min_cosine <= a.mean_cosine <= 1 for a in card.agreement)
    graph = onnx.load(str(wh.root / row.artifact / "model.onnx"))
    assert "MatMulInteger" in {node.op_type for node in graph.graph.node}

    listing = CliRunner().invoke(cli, ["-w", str(wh.root), "models"])
    assert listing.exit_code == 0
    worst = card.worst_agreement
    assert (f" int8 (cosine to fp32, worst layer {worst.layer}: min {worst.min_cosine:.4f}, "
            f"mean {worst.mean_cosine:.4f}), fp32 vectors  from ") in listing.output
    [as_json] = json.loads(CliRunner().invoke(cli, ["-w", str(wh.root), "models", "--json"]).output)
    assert as_json["precision"] == "int8" and len(as_json["agreement"]) == 3

    again = ingest(wh, _corpus(tmp_path), model=str(tiny_bert_dir), precision="int8")
    assert (again.model, again.embedded, again.exported) == (result.model, 0, False)


def test_fp32_models_show_their_precision(tmp_path, ingested):
    listing = CliRunner().invoke(cli, ["-w", str(ingested.root), "models"])
    assert listing.exit_code == 0 and " fp32, fp32 vectors  from " in listing.output


def _perturbing_reduction(fp32_graph, out, precision_name):
    """A "reduced" graph whose weights are off by noise: the guard must catch it."""
    model = onnx.load(str(fp32_graph))
    rng = np.random.default_rng(0)
    for initializer in model.graph.initializer:
        values = onnx.numpy_helper.to_array(initializer)
        if values.dtype == np.float32 and values.ndim == 2:
            initializer.CopyFrom(onnx.numpy_helper.from_array(values + rng.normal(0, 0.05, values.shape).astype(np.float32),
                                                              initializer.name))
    onnx.save(model, str(out))


def test_guard_refuses_an_export_that_disagrees(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.setattr("pipelines.export.reduce_precision", _perturbing_reduction)
    with pytest.raises(ExportError, match=r"the int8 graph of tiny-bert\w* disagrees with fp32: layer \d's vectors have "
                                          r"a min cosine of -?[01]\.\d{4} .* below the guard 0\.995; use --precision fp32"):
        export_model(resolve_model(str(tiny_bert_dir), max_length=16, precision="int8"), tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no partial build left behind


def test_guard_message_names_layer_measure_threshold_and_fix():
    measured = (LayerAgreement(0, 1.0, 1.0), LayerAgreement(1, 0.981234, 0.99), LayerAgreement(2, 0.99, 0.995))
    with pytest.raises(ExportError) as refused:
        precision.check_guard(measured, 0.995, model="minilm", precision="int8", texts=15)
    assert str(refused.value) == (
        "the int8 graph of minilm disagrees with fp32: layer 1's vectors have a min cosine of 0.9812 (mean 0.9900) "
        "to fp32's over 15 sample texts, below the guard 0.995; use --precision fp32, or lower the guard "
        "(--precision-guard) only if that is acceptable"
    )
    precision.check_guard(measured, 0.98, model="minilm", precision="int8", texts=15)  # passes


def test_guard_is_settable_on_ingest(tmp_path, tiny_bert_dir):
    result = CliRunner().invoke(cli, ["-w", str(tmp_path / "wh"), "ingest", str(_corpus(tmp_path)), "--model",
                                      str(tiny_bert_dir), "--precision", "int8", "--precision-guard", "1.5"])
    assert result.exit_code == 2 and "--precision-guard" in result.output


def test_bf16_on_a_cpu_without_it_is_a_clear_error(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    result = CliRunner().invoke(cli, ["-w", str(tmp_path / "wh"), "ingest", str(_corpus(tmp_path)), "--model",
                                      str(tiny_bert_dir), "--precision", "bf16"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: model {tiny_bert_dir.name!r}: precision='bf16' is not supported; use --precision int8 (or fp32): "
        "this CPU has no bf16 instructions (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo)\n"
    )


def test_bf16_on_a_bf16_cpu_needs_onnxruntime_kernels_too(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(precision, "onnxruntime_runs_bf16", lambda: False)
    with pytest.raises(Exception, match=r"has bf16 instructions but onnxruntime \S+'s CPU provider has no bf16 MatMul"):
        export_model(resolve_model(str(tiny_bert_dir), max_length=16, precision="bf16"), tmp_path / "bf16")


def test_bf16_where_supported_builds_bf16_matmuls(tmp_path, tiny_artifact, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(precision, "onnxruntime_runs_bf16", lambda: True)
    precision.check_available("bf16", model="m")  # no error
    precision.reduce_precision(tiny_artifact / "model.onnx", tmp_path / "bf16.onnx", "bf16")
    graph = onnx.load(str(tmp_path / "bf16.onnx")).graph
    casts = [n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.BFLOAT16]
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert matmuls and len(casts) == 2 * len(matmuls)
    onnx.checker.check_model(onnx.load(str(tmp_path / "bf16.onnx")))


def test_int8_rule_keeps_embeddings_and_the_feed_forward_in_fp32(tiny_artifact):
    graph = onnx.load(str(tiny_artifact / "model.onnx"))
    excluded = precision.int8_excluded_nodes(graph)
    kinds = {node.name: node.op_type for node in graph.graph.node}
    assert sum(kinds[name] == "MatMul" for name in excluded) == 4  # up- and down-projection, 2 layers
    assert any(kinds[name] in precision.EMBEDDING_OPS for name in excluded)
