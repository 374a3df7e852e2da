import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from warehouse import QueryError, QueryRefusedError, Warehouse
from warehouse.query import check_sql


@pytest.fixture
def wh(tmp_path):
    wh = Warehouse.open(tmp_path / "wh", create=True)
    with wh.writer() as w:
        w.upsert_documents(pa.table({"corpus": ["c", "c"], "id": ["1", "2"], "doc_hash": ["a", "b"], "text": ["x", "y"]}))
        w.append_embeddings(
            pa.table(
                {
                    "doc_hash": ["a", "b"],
                    "model": ["m-1", "m-1"],
                    "layer": pa.array([1, 1], pa.int32()),
                    "pooling": ["mean", "mean"],
                    "embedding": pa.array([[0.5, 1.5], [2.5, 3.5]], pa.list_(pa.float32())),
                }
            )
        )
        w.commit("ingest")
    return wh


def refused_statements(outside):
    return [
        f"select * from read_csv('{outside}/passwd.csv')",
        "select * from read_csv('/etc/passwd')",
        f"copy (select 1) to '{outside}/out.csv'",
        f"attach '{outside}/other.db' as other",
        f"export database '{outside}/export'",
        "install httpfs",
        "load httpfs",
        "set enable_external_access = true",
        "reset lock_configuration",
        "pragma enable_profiling",
        "create table t as select 1",
        "select 1; select 2",
        f"select * from glob('{outside}/*')",
        f"select * from read_parquet('{outside}/x.parquet')",
        "select * from read_csv('https://example.com/data.csv')",
    ]


def test_every_escape_is_refused_and_writes_nothing(wh, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd.csv").write_text("a,b\n1,2\n")
    runner = CliRunner()
    for sql in refused_statements(outside):
        target = tmp_path / "result.csv"
        result = runner.invoke(cli, ["-w", str(wh.root), "query", sql, "--output", str(target)])
        assert result.exit_code == 1, (sql, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (sql, result.stderr)
        assert sorted(os.listdir(outside)) == ["passwd.csv"], sql
        assert not target.exists(), sql
        assert not [name for name in os.listdir(tmp_path) if "ew-tmp" in name], sql


def test_check_sql_accepts_one_select():
    assert check_sql("with t as (select 1) select * from t")
    with pytest.raises(QueryRefusedError, match="exactly one"):
        check_sql("select 1; select 2")
    with pytest.raises(QueryRefusedError, match="empty"):
        check_sql("  ")


def test_syntax_error_is_a_query_error(wh):
    with pytest.raises(QueryError, match="parse"):
        wh.query("selec 1")


def test_results_stream_in_batches(wh):
    reader = wh.query("select * from range(100000) t(i)", batch_rows=1000).reader
    sizes = [batch.num_rows for batch in reader]
    assert sum(sizes) == 100000 and max(sizes) <= 100000 and len(sizes) > 1


def test_table_output_is_aligned(wh):
    result = CliRunner().invoke(cli, ["-w", str(wh.root), "query", "select id, doc_hash, embedding from documents join embeddings using (doc_hash) order by id"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["id", "doc_hash", "embedding"]
    assert lines[2].startswith("1   a         [0.5, 1.5]")
    assert lines[-1] == "(2 rows)"


def test_csv_json_parquet_outputs(wh, tmp_path):
    runner = CliRunner()
    base = ["-w", str(wh.root), "query", "select id, embedding from documents join embeddings using (doc_hash) order by id"]
    csv = runner.invoke(cli, base + ["--format", "csv"])
    assert csv.output.splitlines() == ['"id","embedding"', '"1","[0.5, 1.5]"', '"2","[2.5, 3.5]"']
    js = runner.invoke(cli, base + ["--format", "json"])
    assert [json.loads(line) for line in js.output.splitlines()] == [
        {"id": "1", "embedding": [0.5, 1.5]},
        {"id": "2", "embedding": [2.5, 3.5]},
    ]
    out = tmp_path / "r.parquet"
    done = runner.invoke(cli, base + ["--output", str(out)])
    assert done.exit_code == 0, done.output
    assert pq.read_table(out).column("id").to_pylist() == ["1", "2"]


def test_query_on_a_missing_warehouse(tmp_path):
    result = CliRunner().invoke(cli, ["-w", str(tmp_path / "none"), "query", "select 1"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no warehouse at")
