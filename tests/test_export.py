import json
import shutil
import sys

import numpy as np
import onnx
import pytest

from pipelines.export import export_model
from pipelines.models import resolve_model
from pipelines.errors import ExportError, MissingDependencyError


def _torch_pooled(model_dir, texts, *, pooling, max_length):
    """Reference vectors computed straight from transformers, independent of the export code."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = torch.stack(model(**batch, output_hidden_states=True).hidden_states, dim=1)  # (B, L+1, T, D)
    if pooling == "cls":
        return hidden[:, :, 0].numpy()
    mask = batch["attention_mask"][:, None, :, None].float()
    return ((hidden * mask).sum(2) / mask.sum(2).clamp(min=1e-9)).numpy()


def test_card_describes_the_export(tiny_artifact, tiny_bert_dir):
    source = resolve_model(str(tiny_bert_dir), max_length=16)
    card = json.loads((tiny_artifact / "model.json").read_text())
    assert {k: card[k] for k in ("key", "name", "fingerprint", "pooling", "max_length", "precision", "dim", "num_layers")} == {
        "key": source.key, "name": source.name, "fingerprint": source.fingerprint, "pooling": "mean",
        "max_length": 16, "precision": "fp32", "dim": 32, "num_layers": 2,
    }
    assert card["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert card["output_name"] == "pooled"
    assert card["max_abs_diff"] <= card["tolerance"] == 1e-4
    assert set(card["versions"]) >= {"torch", "transformers", "onnx"}
    assert card["created_at"].endswith("+00:00")
    assert sorted(p.name for p in tiny_artifact.iterdir()) == ["model.json", "model.onnx", "tokenizer.json"]


def test_graph_has_dynamic_inputs_and_one_pooled_output(tiny_artifact):
    graph = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {n: ["batch", "sequence"] for n in ("input_ids", "attention_mask", "token_type_ids")}
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    (output,) = graph.output
    assert output.name == "pooled" and output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_tokenizer_file_has_no_truncation_or_padding(tiny_artifact):
    saved = json.loads((tiny_artifact / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_onnx_matches_torch_on_every_layer(tiny_bert_dir, tmp_path, pooling):
    from pipelines.encoder import Encoder

    report = export_model(resolve_model(str(tiny_bert_dir), pooling=pooling, max_length=16), tmp_path / "artifact")
    assert report.max_abs_diff <= report.tolerance and report.onnx_bytes > 0 and not report.reused
    texts = ["the game", "a python library for text and data files in the warehouse", ""]
    expected = _torch_pooled(tiny_bert_dir, texts, pooling=pooling, max_length=16)
    got = Encoder.load(report.path).encode(texts).vectors
    assert got.shape == (3, 3, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_existing_artifact_is_reused_not_rebuilt(tiny_artifact, tiny_bert_dir):
    before = (tiny_artifact / "model.onnx").stat().st_mtime_ns
    report = export_model(resolve_model(str(tiny_bert_dir), max_length=16), tiny_artifact)
    assert report.reused and report.path == tiny_artifact
    assert (tiny_artifact / "model.onnx").stat().st_mtime_ns == before


def test_existing_artifact_of_another_model_is_refused(tiny_artifact, tiny_bert_dir):
    with pytest.raises(ExportError, match="already holds"):
        export_model(resolve_model(str(tiny_bert_dir), max_length=8), tiny_artifact)


def test_zero_tolerance_fails_and_leaves_nothing(tiny_bert_dir, tmp_path):
    # onnxruntime's fused kernels and torch round differently, so no real export is exact.
    dest = tmp_path / "artifact"
    with pytest.raises(ExportError, match=r"max abs diff .* exceeds the tolerance 0"):
        export_model(resolve_model(str(tiny_bert_dir)), dest, tolerance=0.0)
    assert list(tmp_path.iterdir()) == []  # neither dest nor the temporary build directory


def test_perturbed_verification_fails(tiny_bert_dir, tmp_path, monkeypatch):
    from pipelines import encoder

    in_lanes = encoder.Encoder._in_lanes

    def perturbed(self, run, batches):  # every batch's outputs, off by 1e-3
        return ((rows, [out + 1e-3 for out in outs]) for rows, outs in in_lanes(self, run, batches))

    monkeypatch.setattr(encoder.Encoder, "_in_lanes", perturbed)
    with pytest.raises(ExportError, match="tolerance 0.0001"):
        export_model(resolve_model(str(tiny_bert_dir)), tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


def test_missing_torch_names_the_extra(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'ew\[train\]'"):
        export_model(resolve_model(str(tiny_bert_dir)), tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


def test_source_with_only_vocab_txt_gets_the_same_tokenizer(tiny_bert_dir, tiny_artifact, tmp_path):
    from pipelines.encoder import Encoder

    vocab_only = tmp_path / "vocab-only"
    shutil.copytree(tiny_bert_dir, vocab_only)
    (vocab_only / "tokenizer.json").unlink()
    (vocab_only / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64})
    )
    report = export_model(resolve_model(str(vocab_only), max_length=16), tmp_path / "artifact")
    texts = ["The Game, of python-tools!", "data files"]
    np.testing.assert_allclose(
        Encoder.load(report.path).encode(texts).vectors, Encoder.load(tiny_artifact).encode(texts).vectors, atol=1e-5
    )


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Payload.marker}",))


def test_a_malicious_pickle_is_refused_in_one_line_and_never_runs(tiny_bert_dir, tmp_path):
    import pickle
    import shutil

    from pipelines.models import resolve_model

    model = tmp_path / "evil"
    shutil.copytree(tiny_bert_dir, model)
    (model / "model.safetensors").unlink()
    _Payload.marker = tmp_path / "pwned"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Payload()}))
    with pytest.raises(ExportError) as raised:
        export_model(resolve_model(str(model)), tmp_path / "out")
    assert "\n" not in str(raised.value) and "to ONNX failed" in str(raised.value)
    assert not _Payload.marker.exists() and not (tmp_path / "out").exists()
