"""The token-state cache: the states graph (states_export.py), Encoder.encode_states, the token_states table, ingest."""
import json
import shutil

import numpy as np
import pytest

from pipelines.artifacts import StatesCard
from pipelines.encoder import Encoder
from pipelines.errors import ExportError
from pipelines.states_export import export_states
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


def test_the_table_reads_with_the_documented_recipes(states_ingested, tiny_bert_dir):
    import polars as pl
    from deltalake import DeltaTable

    from pipelines.registry import open_model
    from warehouse.tables import states_matrix

    # ew query (DuckDB): filter in SQL, decode the BLOBs of the Arrow result with NumPy.
    queried = states_ingested.query(
        "select d.text, s.* from token_states s join (select distinct doc_hash, text from documents) d using (doc_hash) "
        "order by doc_hash").read_all().to_pylist()
    assert len(queried) == 40
    decoded = {row["doc_hash"]: np.frombuffer(row["states"], "<f2").reshape(row["n_tokens"], row["dim"]) for row in queried}
    # pyarrow and Polars straight from the Delta table, without ew.
    table = DeltaTable(str(states_ingested.root / "token_states")).to_pyarrow_table()
    for row in table.to_pylist():
        np.testing.assert_array_equal(states_matrix(row), decoded[row["doc_hash"]])
    for row in pl.read_delta(str(states_ingested.root / "token_states")).iter_rows(named=True):
        np.testing.assert_array_equal(np.frombuffer(row["states"], "<f2").reshape(row["n_tokens"], row["dim"]),
                                      decoded[row["doc_hash"]])

    # fp16 against the fp32 encoder output and against torch, within fp16's rounding.
    model = open_model(states_ingested, queried[0]["model"])
    texts = [row["text"] for row in queried[:8]]
    exact = Encoder.load(model.artifact).encode_states(texts, layer=1).states
    hidden, mask = _torch_hidden(tiny_bert_dir, texts, layer=1, max_length=model.card.max_length)
    for row, fp32, reference, row_mask in zip(queried, exact, hidden, mask):
        cached = decoded[row["doc_hash"]].astype(np.float32)
        np.testing.assert_allclose(cached, fp32, rtol=2**-11, atol=1e-7)
        np.testing.assert_allclose(cached, reference[: int(row_mask.sum())], rtol=2**-11, atol=1e-4)


def test_ew_query_sees_the_table(states_ingested):
    from click.testing import CliRunner

    from pipelines.cli import cli

    sql = "select layer, precision, count(*) as docs, sum(octet_length(states)) = sum(n_tokens * dim * 2) as sized from token_states group by all"
    result = CliRunner().invoke(cli, ["-w", str(states_ingested.root), "query", sql, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"layer": 1, "precision": "fp16", "docs": 40, "sized": True}]


def test_the_torch_weights_rebuild_the_layers_above_k(states_ingested):
    """What training needs: the artifact's torch/ weights carry cached layer-1 states to the last layer."""
    import torch
    from transformers import AutoModel

    from pipelines.registry import open_model
    from warehouse.tables import states_matrix

    [row] = states_ingested.query("select s.*, d.text from token_states s join documents d using (doc_hash) limit 1").read_all().to_pylist()
    model = open_model(states_ingested, row["model"])
    top = AutoModel.from_pretrained(str(model.artifact / "torch"), attn_implementation="eager").eval()
    hidden = torch.from_numpy(states_matrix(row).astype(np.float32))[None]  # (1, T, D), no padding
    with torch.inference_mode():
        for layer in top.encoder.layer[1:]:
            output = layer(hidden)
            hidden = output[0] if isinstance(output, tuple) else output
    pooled_last = Encoder.load(model.artifact).encode([row["text"]]).vectors[0, -1]
    np.testing.assert_allclose(hidden[0].mean(0).numpy(), pooled_last, atol=1e-2)  # fp16 cache: ~1e-3 apart


def test_ingest_summary_on_the_command_line(tmp_path, tiny_bert_dir):
    from click.testing import CliRunner

    from pipelines.cli import cli

    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    invoke = lambda *args: CliRunner().invoke(cli, ["-w", str(tmp_path / "wh"), "ingest", str(corpus), "--model",
                                                    str(tiny_bert_dir), *args])
    summary = json.loads(invoke("--token-states", "2", "--json").stdout)
    assert (summary["token_states"], summary["state_precision"], summary["states_cached"]) == (2, "fp16", 5)
    assert summary["states_bytes_per_document"] == round(summary["states_bytes"] / 5, 1) > 0
    human = invoke("--token-states", "2")
    assert human.exit_code == 0, human.output
    assert human.stdout.splitlines()[-1] == "token states of layer 2 (fp16): cached 0 documents, 0.0 KB per document (mean), 0.0 MB in all"
    beyond = invoke("--token-states", "3")
    assert beyond.exit_code == 1
    assert beyond.stderr == "Error: --token-states: layer 3 does not exist; this model has layers 0..2\n"
    assert invoke("--token-states", "1", "--state-precision", "fp8").exit_code == 2


def test_a_rerun_with_states_never_imports_torch(wh, tmp_path, tiny_bert_dir):
    import subprocess
    import sys

    from pipelines.ingest import ingest

    ingest(wh, write_corpus(tmp_path / "c.jsonl", 3), model=str(tiny_bert_dir), token_states=1)  # exports (torch)
    more = write_corpus(tmp_path / "d.jsonl", 3, start=100)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipelines.ingest import ingest\n"
        f"r = ingest({str(wh.root)!r}, Path({str(more)!r}), model={str(tiny_bert_dir)!r}, token_states=1)\n"
        "assert r.states_cached == 3 and not r.exported, r\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_states_of_a_model_whose_weights_are_gone_say_what_to_do(wh, tmp_path, tiny_bert_dir, monkeypatch):
    import pipelines.registry
    from pipelines.errors import ModelNotFoundError
    from pipelines.ingest import ingest

    first = ingest(wh, write_corpus(tmp_path / "c.jsonl", 2), model=str(tiny_bert_dir))

    def gone(name, **options):
        raise ModelNotFoundError(name, ["nowhere"])

    monkeypatch.setattr(pipelines.registry, "resolve_model", gone)
    with pytest.raises(EwError, match=rf"caching layer 1 token states of {first.model} .* were not found "
                                      rf"\(tried {first.model}, tiny-bert\d*\); pass --model with the model"):
        ingest(wh, tmp_path / "c.jsonl", model=first.model, token_states=1)
