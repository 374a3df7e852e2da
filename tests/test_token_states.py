"""The token-state cache: the states graph (export), Encoder.encode_states, the token_states table and ingest."""
import json
import shutil

import numpy as np
import pytest

from pipelines.artifacts import StatesCard, states_file
from pipelines.encoder import Encoder
from pipelines.errors import ExportError
from pipelines.export import export_states
from pipelines.models import resolve_model
from warehouse import EwError

TEXTS = ["the game", "a python library for text and data files in the warehouse", "", "model layer tool " * 9]


def _torch_hidden(model_dir, texts, *, layer, max_length):
    """Layer ``layer``'s hidden states and the attention mask, straight from transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states[layer]  # (B, T, D)
    return hidden.numpy(), batch["attention_mask"].numpy()


@pytest.fixture(scope="module")
def states_artifact(tmp_path_factory, tiny_artifact, tiny_bert_dir):
    """A copy of tiny_artifact (max_length 16) with the layer-1 states graph."""
    artifact = tmp_path_factory.mktemp("states") / "tiny"
    shutil.copytree(tiny_artifact, artifact)
    export_states(resolve_model(str(tiny_bert_dir), max_length=16), artifact, layer=1)
    return artifact


def test_export_adds_the_states_graph_and_the_torch_weights(states_artifact, tiny_bert_dir):
    assert sorted(p.name for p in states_artifact.iterdir()) == [
        "model.json", "model.onnx", "states-1.onnx", "states.json", "tokenizer.json", "torch"]
    card = StatesCard.load(states_artifact)
    graph = card.graphs[1]
    assert graph.max_abs_diff <= graph.tolerance == 1e-4 and graph.pooled_vs_model <= graph.tolerance
    assert sorted(card.weights) == ["config.json", "model.safetensors"]
    for name in card.weights:  # the source's own bytes
        assert (states_artifact / "torch" / name).read_bytes() == (tiny_bert_dir / name).read_bytes()


def test_a_second_export_of_the_layer_is_reused(states_artifact, tiny_bert_dir):
    before = (states_artifact / "states-1.onnx").stat().st_mtime_ns
    again = export_states(resolve_model(str(tiny_bert_dir), max_length=16), states_artifact, layer=1)
    assert again == StatesCard.load(states_artifact).graphs[1]
    assert (states_artifact / "states-1.onnx").stat().st_mtime_ns == before


def test_states_match_torch_on_real_tokens(states_artifact, tiny_bert_dir):
    encoded = Encoder.load(states_artifact).encode_states(TEXTS, layer=1, batch_size=3)
    hidden, mask = _torch_hidden(tiny_bert_dir, TEXTS, layer=1, max_length=16)
    for states, expected, row_mask in zip(encoded.states, hidden, mask):
        n = int(row_mask.sum())
        assert states.shape == (n, 32) and states.dtype == np.float32
        np.testing.assert_allclose(states, expected[:n], atol=1e-4)
    assert encoded.truncated.tolist() == [False, False, False, True]


def test_states_graph_pooled_equals_the_plain_graph(states_artifact):
    encoder = Encoder.load(states_artifact)
    plain = encoder.encode(TEXTS, batch_size=2).vectors
    both = encoder.encode_states(TEXTS, layer=1, batch_size=2).vectors
    np.testing.assert_allclose(both, plain, atol=1e-5)
    cosine = (both * plain).sum(-1) / np.linalg.norm(both, axis=-1) / np.linalg.norm(plain, axis=-1)
    assert cosine.min() >= 0.99999


def test_fp16_states_are_within_a_stated_tolerance_of_fp32(states_artifact):
    encoder = Encoder.load(states_artifact)
    full = encoder.encode_states(TEXTS, layer=1).states
    half = encoder.encode_states(TEXTS, layer=1, dtype=np.float16).states
    for exact, rounded in zip(full, half):
        assert rounded.dtype == np.float16
        # float16 keeps 11 significant bits: a relative error of at most 2**-11 per value.
        np.testing.assert_allclose(rounded.astype(np.float32), exact, rtol=2**-11, atol=1e-7)


def test_a_layer_not_exported_is_a_clear_error(states_artifact):
    with pytest.raises(EwError, match=r"no token-state graph for layer 2 \(states-2.onnx\).*--token-states 2"):
        Encoder.load(states_artifact).encode_states(TEXTS, layer=2)


def test_a_layer_beyond_the_model_is_refused(states_artifact, tiny_bert_dir):
    with pytest.raises(ExportError, match=r"layer 3 does not exist; .* has layers 0..2"):
        export_states(resolve_model(str(tiny_bert_dir), max_length=16), states_artifact, layer=3)


def test_a_graph_beyond_the_tolerance_is_refused_and_nothing_changes(states_artifact, tiny_bert_dir, tmp_path, monkeypatch):
    from pipelines import encoder as encoder_module

    artifact = tmp_path / "tiny"
    shutil.copytree(states_artifact, artifact)
    before = sorted(p.name for p in artifact.iterdir())
    real = encoder_module.Encoder.encode_states

    def perturbed(self, *args, **kwargs):
        encoded = real(self, *args, **kwargs)
        return encoder_module.EncodedStates(encoded.vectors, encoded.truncated, [s + 1e-3 for s in encoded.states])

    monkeypatch.setattr(encoder_module.Encoder, "encode_states", perturbed)
    with pytest.raises(ExportError, match="tolerance 0.0001"):
        export_states(resolve_model(str(tiny_bert_dir), max_length=16), artifact, layer=2)
    assert sorted(p.name for p in artifact.iterdir()) == before
    assert 2 not in StatesCard.load(artifact).graphs
