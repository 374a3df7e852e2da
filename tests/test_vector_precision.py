"""--vector-precision fp16: the key (models.py), the storage (tables.py), the guard (embedding.py) and every reader."""
import json
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from deltalake import DeltaTable

from pipelines.artifacts import ModelCard
from pipelines.cli import cli
from pipelines.embedding import round_trip_cosine
from pipelines.errors import ModelOptionError
from pipelines.fitting import fit_head
from pipelines.ingest import ingest
from pipelines.models import resolve_model, stored_precision_parts
from pipelines.prediction import predict
from pipelines.search import search
from warehouse import EwError, Warehouse
from warehouse.row_checks import check_rows
from warehouse.tables import float32_vectors

README = Path(__file__).resolve().parent.parent / "README.md"
# fp16 keeps 11 significant bits: a value comes back within 2^-11 of itself, relative.
RELATIVE_ERROR = 2.0**-11


@pytest.fixture(scope="module")
def both(tmp_path_factory, ingested, tiny_bert_dir, labelled_corpus):
    """A copy of the ingested (fp32) warehouse with the same corpus ingested again as fp16 vectors."""
    root = tmp_path_factory.mktemp("fp16") / "wh"
    shutil.copytree(ingested.root, root)
    wh = Warehouse.open(root)
    [fp32] = wh.models()
    result = ingest(wh, labelled_corpus, model=str(tiny_bert_dir), vector_precision="fp16")
    return wh, fp32.model, result.model


def vectors(wh, model, layer):
    """doc_hash -> float32 vector, read from the table files with pyarrow (no DuckDB)."""
    table = float32_vectors(wh.dataset("embeddings", wh.snapshot()).to_table(
        columns=["doc_hash", "embedding", "embedding_fp16"],
        filter=(pa.compute.field("model") == model) & (pa.compute.field("layer") == layer)))
    matrix = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, -1)
    return dict(zip(table.column("doc_hash").to_pylist(), matrix))


def test_fp16_is_another_key_and_fp32_keeps_the_key_it_had(tiny_bert_dir):
    assert stored_precision_parts(vector_precision="fp32") == {}  # fp32's fingerprint input is what it was
    fp32 = resolve_model(str(tiny_bert_dir))
    assert resolve_model(str(tiny_bert_dir), vector_precision="fp32").key == fp32.key
    fp16 = resolve_model(str(tiny_bert_dir), vector_precision="fp16")
    assert fp16.key != fp32.key and fp16.vector_precision == "fp16"
    with pytest.raises(ModelOptionError, match=r"vector_precision='bf16' is not supported; use 'fp32' or 'fp16'"):
        resolve_model(str(tiny_bert_dir), vector_precision="bf16")


def test_fp16_vectors_round_trip_within_fp16_rounding(both):
    wh, fp32, fp16 = both
    exact, stored = vectors(wh, fp32, 2), vectors(wh, fp16, 2)
    assert sorted(stored) == sorted(exact)
    x = np.stack([exact[k] for k in stored]).astype(np.float64)
    y = np.stack(list(stored.values())).astype(np.float64)
    assert np.all(np.abs(y - x) <= RELATIVE_ERROR * np.abs(x) + 1e-7)
    cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cosine.min() >= 0.9999


def test_each_model_fills_only_its_own_column(both):
    wh, fp32, fp16 = both
    rows = wh.query("select model, count(embedding_fp16) as fp16, count(*) as n from embeddings_stored "
                    "where embedding is null group by model").read_all().to_pylist()
    stored = wh.query(f"select count(*) from embeddings where model = '{fp16}'").read_all().column(0)[0].as_py()
    assert rows == [{"model": fp16, "fp16": stored, "n": stored}]
    assert {m.model: m.vector_precision for m in wh.models()} == {fp32: "fp32", fp16: "fp16"}
    assert check_rows(wh, wh.snapshot()) == []  # `ew verify --deep` finds nothing wrong


def test_the_fp16_model_takes_the_fp32_graph_without_exporting_again(both):
    wh, fp32, fp16 = both
    artifacts = {row.model: wh.root / row.artifact for row in wh.models()}
    exact, stored = ModelCard.load(artifacts[fp32]), ModelCard.load(artifacts[fp16])
    assert (exact.key, exact.vector_precision, stored.key, stored.vector_precision) == (fp32, "fp32", fp16, "fp16")
    assert stored.created_at == exact.created_at and stored.onnx_sha256 == exact.onnx_sha256  # copied, not re-exported
    assert (artifacts[fp16] / "model.onnx").read_bytes() == (artifacts[fp32] / "model.onnx").read_bytes()


def test_verify_flags_vectors_stored_at_another_precision_than_their_model(both, tmp_path):
    wh, fp32, fp16 = both
    shutil.copytree(wh.root, tmp_path / "wh")
    copy = Warehouse.open(tmp_path / "wh")
    with copy.writer() as writer:  # an fp32 vector under the fp16 key, as a writer other than ew could leave
        writer.append_embeddings(pa.table({
            "doc_hash": ["0" * 64], "model": [fp16], "layer": pa.array([0], pa.int32()), "pooling": ["mean"],
            "embedding": pa.array([[0.5] * 32], pa.list_(pa.float32()))}))
        writer.commit("test", {})
    assert [(p.kind, p.what) for p in check_rows(copy, copy.snapshot())] == [
        ("vector-precision", f"1 vectors are stored as fp32, but model {fp16} stores fp16 vectors")]


def test_fp16_rows_match_the_embeddings_schema(both):
    wh, fp32, fp16 = both
    schema = json.loads((README.parent / "schemas" / "embeddings.schema.json").read_text())
    rows = DeltaTable(str(wh.root / "embeddings")).to_pyarrow_table(filters=[("model", "=", fp16)]).to_pylist()
    assert rows and all(row["embedding"] is None and len(row["embedding_fp16"]) == 64 for row in rows)
    for row in rows[:20]:  # JSON has no bytes: the schema describes the BLOB as hex
        jsonschema.validate({k: v.hex() if isinstance(v, bytes) else v for k, v in row.items() if v is not None}, schema)


def test_fp16_vectors_take_about_half_the_bytes(both):
    """The vector columns' compressed bytes (the tiny model is 32 wide: its doc_hash would dominate the files)."""
    wh, fp32, fp16 = both

    def vector_bytes(model):
        total = 0
        for path in (wh.root / "embeddings").glob(f"model={model}/layer=*/*.parquet"):
            metadata = pq.ParquetFile(path).metadata
            for group in range(metadata.num_row_groups):
                for column in range(metadata.num_columns):
                    chunk = metadata.row_group(group).column(column)
                    if chunk.path_in_schema.startswith("embedding"):
                        total += chunk.total_compressed_size
        return total

    assert vector_bytes(fp16) <= 0.55 * vector_bytes(fp32)


def test_ew_query_reads_fp16_vectors_as_float(both):
    wh, fp32, fp16 = both
    [row] = wh.query(
        f"select typeof(embedding) as kind, len(embedding) as width, octet_length(embedding_fp16) as bytes, "
        f"min(list_cosine_similarity(embedding, embedding)) over () as self from embeddings where model = '{fp16}' limit 1"
    ).read_all().to_pylist()
    assert row == {"kind": "FLOAT[]", "width": 32, "bytes": 64, "self": pytest.approx(1.0)}


@pytest.fixture(scope="module")
def fp16_head(both):
    wh, fp32, fp16 = both
    return fit_head(wh, label="section", model=fp16, epochs=3, name="fp16-head")


def test_fit_head_and_search_work_on_fp16(both, fp16_head):
    wh, fp32, fp16 = both
    assert fp16_head.model == fp16 and 0 <= fp16_head.accuracy <= 1 and fp16_head.test > 0
    doc = wh.query("select text, doc_hash from documents qualify count(*) over (partition by doc_hash) = 1 "
                   "order by id limit 1").read_all().to_pylist()[0]
    found = search(wh, doc["text"], model=fp16, k=2)
    assert found.rows[0].doc_hash == doc["doc_hash"] and found.rows[0].score == pytest.approx(1.0, abs=1e-3)


def test_export_gives_the_stored_fp16_vectors_as_float32(both):
    wh, fp32, fp16 = both
    table = wh.training_set(label="section", model=fp16, layer=2).read_all()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    exported = dict(zip(table.column("doc_hash").to_pylist(), table.column("embedding").to_pylist()))
    stored = vectors(wh, fp16, 2)
    assert all(np.array_equal(np.float32(value), stored[key]) for key, value in exported.items())


def test_predict_stored_documents_and_a_file_with_an_fp16_head(both, fp16_head, labelled_corpus, tmp_path):
    wh, fp32, fp16 = both
    stored = predict(wh, fp16_head.head, where="section = 'perl'", output=tmp_path / "stored.parquet")
    assert stored.rows == pq.read_table(tmp_path / "stored.parquet").num_rows > 0 and stored.embedded == 0
    corpus = tmp_path / "some.jsonl"
    corpus.write_text("".join(labelled_corpus.read_text().splitlines(keepends=True)[:5]))
    from_file = predict(wh, fp16_head.head, corpus_file=corpus, output=tmp_path / "file.parquet")
    table = pq.read_table(tmp_path / "file.parquet")
    assert (from_file.rows, from_file.embedded) == (5, 0)
    by_hash = dict(zip(pq.read_table(tmp_path / "stored.parquet").column("doc_hash").to_pylist(),
                       pq.read_table(tmp_path / "stored.parquet").column("probability").to_pylist()))
    for key, probability in zip(table.column("doc_hash").to_pylist(), table.column("probability").to_pylist()):
        if key in by_hash:  # the same vector scores the same, read either way
            assert probability == pytest.approx(by_hash[key])


def test_a_registered_fp16_model_keeps_its_precision(both, labelled_corpus):
    wh, fp32, fp16 = both
    again = ingest(wh, labelled_corpus, model=fp16)
    assert (again.vector_precision, again.embedded) == ("fp16", 0)
    with pytest.raises(EwError, match=f"model {fp16} was exported with vector_precision fp16, not fp32"):
        ingest(wh, labelled_corpus, model=fp16, vector_precision="fp32")


def test_the_guard_measures_the_round_trip():
    vectors = np.random.default_rng(0).standard_normal((4, 3, 16)).astype(np.float32)
    assert 0.99999 < round_trip_cosine(vectors, "fp16") < 1.0
    assert round_trip_cosine(vectors, "fp32") == 1.0
    vectors[1, 2, 5] = 1e5  # beyond fp16's range: inf
    assert round_trip_cosine(vectors, "fp16") == -1.0


def test_the_cli_refuses_below_the_guard(both, tmp_path, monkeypatch):
    wh, fp32, fp16 = both
    monkeypatch.setattr("pipelines.embedding.VECTOR_MIN_COSINE", 1.0)  # no fp16 round trip is exact
    corpus = tmp_path / "new.jsonl"
    corpus.write_text('{"id": "n1", "text": "a new python tool"}\n{"id": "n2", "text": "the data library"}\n')
    before = wh.latest_version()
    result = CliRunner().invoke(cli, ["-w", str(wh.root), "ingest", str(corpus), "--model", fp16])
    assert result.exit_code == 1
    assert re.fullmatch(
        rf"Error: storing the vectors of {fp16} as fp16 changes them too much: the least cosine to fp32 over 2 "
        r"sample documents is 0\.9999\d*, below the guard 1\.0 \(its values may exceed fp16's range\); "
        r"ingest with --vector-precision fp32\n", result.stderr), result.stderr
    assert wh.latest_version() == before  # nothing written


def test_the_cli_says_how_the_vectors_are_stored(both):
    wh, fp32, fp16 = both
    result = CliRunner().invoke(cli, ["-w", str(wh.root), "models"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines() if ", fp16 vectors" in line] == [fp16]


def test_the_readme_recipe_reads_fp16_vectors(both):
    """The README's Python block under "Reading fp16 vectors" runs as written, on this warehouse."""
    wh, fp32, fp16 = both
    text = README.read_text(encoding="utf-8")
    block = re.search(r"Reading fp16 vectors.*?```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(block.replace("ew-warehouse", str(wh.root)).replace("KEY", fp16).replace("LAYER", "2"), scope)
    exact = vectors(wh, fp32, 2)
    for name, keys in (("x_numpy", scope["doc_hashes"]), ("x_polars", scope["vectors"]["doc_hash"].to_list())):
        x = scope[name]
        assert x.dtype == np.float32 and x.shape == (len(exact), 32)
        y = np.stack([exact[k] for k in keys])
        assert np.all(np.abs(x - y) <= RELATIVE_ERROR * np.abs(y) + 1e-7), name
