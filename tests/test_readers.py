"""The README's recipes for reading the tables without ew, run against a warehouse ew wrote."""
import duckdb
import polars as pl
import pyarrow.dataset as ds
from deltalake import DeltaTable


def test_polars_reads_the_tables(ingested):
    root = ingested.root
    last = ingested.query("select max(layer) from embeddings").read_all().column(0)[0].as_py()
    vectors = pl.scan_delta(str(root / "embeddings")).filter((pl.col("layer") == last) & (pl.col("pooling") == "mean")).collect()
    labels = pl.read_delta(str(root / "documents")).select("doc_hash", "section")
    train = vectors.join(labels, on="doc_hash")
    expected = ingested.query(
        f"select count(*) from embeddings e join documents d using (doc_hash) where layer = {last}"
    ).read_all().column(0)[0].as_py()
    assert train.height == expected > 0
    assert train["embedding"].list.len().unique().to_list() == [32]


def test_pyarrow_and_pandas_read_the_tables(ingested):
    dataset = DeltaTable(str(ingested.root / "embeddings")).to_pyarrow_dataset()
    table = dataset.to_table(filter=(ds.field("layer") == 0), columns=["doc_hash", "embedding"])
    assert table.num_rows == ingested.query("select count(*) from embeddings where layer = 0").read_all().column(0)[0].as_py()
    documents = DeltaTable(str(ingested.root / "documents")).to_pandas()
    assert set(documents.columns) >= {"corpus", "id", "doc_hash", "text", "section"}


def test_duckdb_reads_the_tables(ingested):
    embeddings = DeltaTable(str(ingested.root / "embeddings")).to_pyarrow_dataset()
    con = duckdb.connect()
    con.register("embeddings", embeddings)
    theirs = con.sql("select model, layer, count(*) from embeddings group by all order by all").fetchall()
    ours = ingested.query("select model, layer, count(*) from embeddings group by all order by all").read_all()
    assert theirs == [tuple(row.values()) for row in ours.to_pylist()]


def test_an_old_delta_version_is_readable_directly(ingested):
    [first, *_] = ingested.log()
    table = DeltaTable(str(ingested.root / "models"), version=0)
    assert table.to_pyarrow_table().num_rows == 1 and first.operation == "register-model"
