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


# -- ingest --------------------------------------------------------------------------------------
def write_corpus(path, n, start=0):
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"the data tool {i} of the warehouse {i % 3}"}) + "\n"
                            for i in range(start, start + n)))
    return path


def rows(wh, sql):
    return wh.query(sql).read_all().to_pylist()


@pytest.fixture
def wh(tmp_path):
    from warehouse import Warehouse

    return Warehouse.open(tmp_path / "wh", create=True)


def test_ingest_caches_states_once_in_the_chunks_version(wh, tmp_path, tiny_bert_dir):
    from pipelines.ingest import ingest

    corpus = write_corpus(tmp_path / "c.jsonl", 10)
    first = ingest(wh, corpus, model=str(tiny_bert_dir), token_states=1, chunk_size=4)
    assert (first.embedded, first.states_cached, first.token_states, first.state_precision) == (10, 10, 1, "fp16")
    [stats] = rows(wh, "select count(*) as n, count(distinct doc_hash) as docs, sum(octet_length(states)) as bytes, "
                       "sum(n_tokens * dim * 2) as expected from token_states where layer = 1 and precision = 'fp16'")
    assert stats["n"] == stats["docs"] == 10 and stats["bytes"] == stats["expected"] == first.states_bytes
    assert first.states_bytes_per_document == first.states_bytes / 10
    # Every chunk's version holds its vectors and states together.
    for version in range(1, wh.latest_version() + 1):
        [counts] = wh.query("select (select count(distinct doc_hash) from embeddings) as vectors, "
                            "(select count(*) from token_states) as states", version=version).read_all().to_pylist()
        assert counts["vectors"] == counts["states"]
    version = wh.latest_version()
    again = ingest(wh, corpus, model=str(tiny_bert_dir), token_states=1)
    assert (again.embedded, again.states_cached, again.states_bytes, again.reused) == (0, 0, 0, 10)
    assert wh.latest_version() == version  # nothing cached, no new version


def test_documents_with_vectors_only_get_their_states(wh, tmp_path, tiny_bert_dir, monkeypatch):
    from pipelines import embedding
    from pipelines.ingest import ingest

    corpus = write_corpus(tmp_path / "c.jsonl", 6)
    ingest(wh, corpus, model=str(tiny_bert_dir))
    vectors = rows(wh, "select count(*) as n from embeddings")[0]["n"]
    plain, real = [], embedding.encode_texts
    monkeypatch.setattr(embedding, "encode_texts", lambda *a, **k: plain.append(1) or real(*a, **k))
    grown = write_corpus(tmp_path / "c.jsonl", 8)
    result = ingest(wh, grown, model=str(tiny_bert_dir), token_states=2, state_precision="fp32")
    assert (result.embedded, result.reused, result.states_cached) == (2, 6, 8)
    assert plain == []  # every text went through the states graph once, none through the plain one
    assert rows(wh, "select count(*) as n from embeddings")[0]["n"] == vectors + 2 * 3
    assert rows(wh, "select distinct precision, layer from token_states") == [{"precision": "fp32", "layer": 2}]
