import json

from click.testing import CliRunner

from pipelines.cli import cli
from warehouse.summary import summarize


def run(*args, warehouse):
    return CliRunner().invoke(cli, ["-w", str(warehouse.root)] + [str(a) for a in args])


def scalar(warehouse, sql):
    return warehouse.query(sql).read_all().column(0)[0].as_py()


def test_counts_match_queries(ingested):
    info = summarize(ingested)
    assert (info.version, info.latest_version, info.versions) == (ingested.snapshot().version,) * 2 + (len(ingested.log()),)
    [corpus] = info.corpora
    assert corpus.corpus == "debian"
    assert corpus.documents == scalar(ingested, "select count(*) from documents")
    assert corpus.texts == scalar(ingested, "select count(distinct doc_hash) from documents")
    assert corpus.labelled["section"] == scalar(ingested, "select count(section) from documents")
    assert [(v.layer, v.vectors) for v in info.vectors] == [
        tuple(row.values()) for row in
        ingested.query("select layer, count(*) from embeddings group by layer order by layer").read_all().to_pylist()
    ]
    assert all(v.bytes > 0 for v in info.vectors)
    assert info.token_states == ()
    assert info.tables["token_states"].files == 0 and info.tables["token_states"].delta_version == -1
    assert info.bytes == sum(t.bytes for t in info.tables.values()) > 0


def test_bytes_and_files_come_from_the_pinned_delta_version(ingested):
    info = summarize(ingested)
    delta = ingested.delta_table("embeddings", ingested.snapshot())
    assert info.tables["embeddings"].files == len(delta.file_uris())
    assert sum(v.bytes for v in info.vectors) == info.tables["embeddings"].bytes
    older = summarize(ingested, version=0)
    assert older.vectors == () and older.corpora == () and older.tables["embeddings"].files == 0


def test_token_states_are_counted(states_ingested):
    [states] = summarize(states_ingested).token_states
    assert (states.layer, states.precision, states.documents) == (1, "fp16", scalar(
        states_ingested, "select count(*) from token_states"))
    assert states.bytes > 0


def test_cli_text_and_json(ingested):
    result = run("info", warehouse=ingested)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    info = summarize(ingested)
    assert lines[0].startswith(f"warehouse {ingested.root}: version {info.version} of {info.version} ({info.versions} versions)")
    assert lines[1].split() == ["corpus", "documents", "texts", "labelled", "fields"]
    assert lines[2].split()[:3] == ["debian", f"{info.corpora[0].documents:,}", f"{info.corpora[0].texts:,}"]
    assert sum(line.split()[0] == info.vectors[0].model for line in lines) == len(info.vectors)
    data = json.loads(run("info", "--json", warehouse=ingested).output)
    assert data["corpora"][0]["documents"] == info.corpora[0].documents
    assert data["tables"]["embeddings"]["files"] == info.tables["embeddings"].files


def test_cli_unknown_version(ingested):
    result = run("info", "--version", 99, warehouse=ingested)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_an_empty_warehouse(tmp_path):
    from warehouse import Warehouse

    wh = Warehouse.open(tmp_path / "wh", create=True)
    info = summarize(wh)
    assert (info.version, info.latest_version, info.versions, info.committed_at) == (-1, -1, 0, None)
    assert info.corpora == () and info.vectors == () and info.bytes == 0
    result = run("info", warehouse=wh)
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == f"warehouse {wh.root}: version -1 of -1 (0 versions), committed never; 0 B in all"
