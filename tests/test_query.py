import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from warehouse import QueryError, QueryRefusedError, Warehouse
from warehouse.query import check_sql, memory_cap, sql_error_message

ROOT = Path(__file__).resolve().parent.parent
# Runs for hours, in constant memory: only an interrupt or a timeout ends it.
ENDLESS = "select sum(a.range * b.range) from range(1000000000000) a, range(3) b"


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
    rows = [{"id": "1", "embedding": [0.5, 1.5]}, {"id": "2", "embedding": [2.5, 3.5]}]
    js = runner.invoke(cli, base + ["--format", "json"])
    assert json.loads(js.stdout) == rows
    nl = runner.invoke(cli, base + ["--nl"])
    assert [json.loads(line) for line in nl.stdout.splitlines()] == rows
    out = tmp_path / "r.parquet"
    done = runner.invoke(cli, base + ["--output", str(out)])
    assert done.exit_code == 0, done.output
    assert pq.read_table(out).column("id").to_pylist() == ["1", "2"]


def test_query_on_a_missing_warehouse(tmp_path):
    result = CliRunner().invoke(cli, ["-w", str(tmp_path / "none"), "query", "select 1"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no warehouse at")


def test_duckdb_hints_survive(wh):
    runner = CliRunner()
    table = runner.invoke(cli, ["-w", str(wh.root), "query", "select * from document"])
    assert table.exit_code == 1
    assert table.stderr == (
        'Error: the query failed: Catalog Error: Table with name document does not exist! Did you mean "documents"?\n'
    )
    column = runner.invoke(cli, ["-w", str(wh.root), "query", "select idd from documents"])
    assert column.exit_code == 1
    assert column.stderr == (
        'Error: the query failed: Binder Error: Referenced column "idd" not found in FROM clause! '
        'Candidate bindings: "id"\n'
    )


def test_sql_error_message_keeps_one_line_without_the_caret():
    with pytest.raises(duckdb.ParserException) as raised:
        duckdb.extract_statements("select 1,\n  2 frm x")
    assert sql_error_message(raised.value) == 'Parser Error: syntax error at or near "x" (line 2)'


ORDINARY = [
    "select layer, count(*) from embeddings group by all",  # the README's examples
    "select section, count(*) as n from documents group by all order by n desc limit 3",
    "select model, layer, count(*) from embeddings group by all order by all",
    "select d.id, list_cosine_similarity(e.embedding, e.embedding) from documents d join embeddings e using (doc_hash) limit 3",
    "select array_cosine_similarity(embedding::float[32], embedding::float[32]) from embeddings limit 3",
    "select array_dot_product(array_value(1.0, 2.0)::double[2], array_value(3.0, 4.0)::double[2])",
    "select section, avg(length(text)), max(id), string_agg(id, ',') from documents group by section",
    "select id, row_number() over (partition by section order by id) from documents",
    "select unnest(embedding) from embeddings limit 3",
    "with t as (select section, count(*) n from documents group by all) select max(n) from t",
    "select * from (values (1, 'a'), (2, 'b')) v(n, s)",
    "pivot documents on section using count(*)",
    "pivot (select section, corpus from documents) on section using count(*) group by corpus",
    "select * from (pivot documents on section in ('python', 'perl') using count(*))",
    "unpivot (select id, section from documents) on id, section into name k value v",
    "describe documents",
    "summarize select layer from embeddings",
    "show tables",
    "select column_name from information_schema.columns where table_name = 'documents'",
    "select count(*) from documents where text not like '%read_csv(%'",  # a name inside a string
    'select id as query, id as "current_setting" from documents limit 1',  # names that are not calls
    "select 1;",
]


@pytest.mark.parametrize("sql", ORDINARY)
def test_ordinary_queries_run(ingested, sql):
    assert ingested.query(sql).read_all().num_rows > 0


def test_a_string_function_past_the_memory_cap_stops_with_one_error(wh):
    """The red team's repeat() of 2 GB peaked at 4 GB; 3 GB needs a 4 GB block, past the 2 GB cap."""
    limits = resource.getrlimit(resource.RLIMIT_DATA)
    result = CliRunner().invoke(cli, ["-w", str(wh.root), "query", "select length(repeat('x', 3000000000))"])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the query ran out of memory"), result.stderr
    assert resource.getrlimit(resource.RLIMIT_DATA) == limits


def test_memory_cap_is_lifted_after_the_block():
    limits = resource.getrlimit(resource.RLIMIT_DATA)
    with memory_cap(1 << 30):
        assert resource.getrlimit(resource.RLIMIT_DATA)[0] != resource.RLIM_INFINITY
    assert resource.getrlimit(resource.RLIMIT_DATA) == limits


def test_ctrl_c_stops_the_query_and_writes_nothing(wh, tmp_path):
    target = tmp_path / "result.csv"
    script = (
        "import sys; from pipelines.cli import main; sys.stderr.write('ready\\n'); sys.stderr.flush(); "
        "sys.argv = ['ew'] + sys.argv[1:]; main()"
    )
    command = [sys.executable, "-c", script, "-w", str(wh.root), "query", ENDLESS, "--output", str(target)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr.readline() == "ready\n"
        time.sleep(0.5)  # into DuckDB (an earlier Ctrl-C is handled the same way)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.splitlines() == [f"Interrupted: the query was stopped; {target} was not written."]
    assert stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["wh"]


def test_timeout_stops_the_query(wh):
    result = CliRunner().invoke(cli, ["-w", str(wh.root), "query", ENDLESS, "--timeout", "0.2"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: the query did not finish within 0.2 s and was stopped; give it more time with --timeout, "
        "or ask for less (a WHERE clause, a LIMIT, fewer joins)\n"
    )
    with pytest.raises(QueryError, match="did not finish within 0.1 s"):
        wh.query(ENDLESS, timeout=0.1)


def test_a_result_read_in_part_can_be_closed(wh):
    with wh.query("select * from range(1000000000000)", batch_rows=10) as result:
        assert result.reader.read_next_batch().num_rows == 10
    # leaving the block stopped DuckDB: nothing left running


def test_log_is_a_view_pinned_like_the_tables(wh):
    with wh.writer() as w:
        w.upsert_documents(pa.table({"corpus": ["c"], "id": ["3"], "doc_hash": ["c"], "text": ["z"]}))
        w.commit("ingest", {"corpus": "c"})
    sql = "select version, operation, detail::json ->> 'corpus' as corpus, pins['documents'] as documents, pins['heads'] as heads from log"
    assert wh.query(sql).read_all().to_pylist() == [
        {"version": 0, "operation": "ingest", "corpus": None, "documents": 0, "heads": -1},
        {"version": 1, "operation": "ingest", "corpus": "c", "documents": 1, "heads": -1},
    ]
    assert wh.query("select max(version) as v from log", version=0).read_all().to_pylist() == [{"v": 0}]
    shown = CliRunner().invoke(cli, ["-w", str(wh.root), "query", "select version, pins from log", "--version", "0"])
    assert shown.stdout.splitlines()[2] == "0        {documents=0, embeddings=0, models=-1, …"


def test_a_reader_that_stops_early_ends_the_query_quietly(wh):
    # `ew query ... | head -1`: no BrokenPipeError traceback, exit code 0, as other Unix tools
    command = [sys.executable, "-m", "pipelines.cli", "-w", str(wh.root), "query", "select * from range(1000000)"]
    ew = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=ew.stdout, stdout=subprocess.PIPE)
    ew.stdout.close()  # head alone holds the pipe: when it exits, ew's next write fails
    first, _ = head.communicate(timeout=60)
    stderr = ew.stderr.read()
    assert (ew.wait(timeout=60), first, stderr) == (0, b"range\n", b"")
