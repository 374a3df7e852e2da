import json

import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from pipelines.search import search
from warehouse.errors import EwError


def run(*args, warehouse):
    return CliRunner().invoke(cli, ["-w", str(warehouse.root)] + [str(a) for a in args])


def stored(warehouse, where="true"):
    return warehouse.query(
        f"select corpus, id, text, doc_hash, section from documents where {where} "
        "qualify count(*) over (partition by doc_hash) = 1 order by id limit 1"
    ).read_all().to_pylist()[0]


def test_a_stored_text_finds_itself_first(ingested):
    doc = stored(ingested)
    found = search(ingested, doc["text"], k=3)
    assert found.version == ingested.snapshot().version
    assert [r.rank for r in found.rows] == [1, 2, 3]
    first = found.rows[0]
    assert (first.corpus, first.id, first.doc_hash) == (doc["corpus"], doc["id"], doc["doc_hash"])
    assert first.score == pytest.approx(1.0, abs=1e-4)
    assert [r.score for r in found.rows] == sorted((r.score for r in found.rows), reverse=True)


def test_where_and_corpus_narrow_the_candidates(ingested):
    doc = stored(ingested, "section = 'perl'")
    found = search(ingested, doc["text"], k=5, where="section <> 'perl'", corpus="debian")
    hashes = {r.doc_hash for r in found.rows}
    sections = ingested.query(
        "select distinct section from documents where doc_hash in ({})".format(",".join(f"'{h}'" for h in hashes))
    ).read_all().column("section").to_pylist()
    assert len(found.rows) == 5 and doc["doc_hash"] not in hashes and "perl" not in sections
    assert search(ingested, doc["text"], corpus="elsewhere").rows == ()


def test_every_layer_and_an_older_version(ingested):
    doc = stored(ingested)
    for layer in (0, 1, 2):
        assert search(ingested, doc["text"], layer=layer, k=1).rows[0].doc_hash == doc["doc_hash"]
    with pytest.raises(EwError, match="layer 2 at warehouse version 0 \\(stored layers: none\\)"):
        search(ingested, doc["text"], k=1, version=0)  # version 0 only registered the model


def test_cli_table_and_json(ingested):
    doc = stored(ingested)
    result = run("search", doc["text"], "-k", 2, warehouse=ingested)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["rank", "score", "corpus", "id", "text"]
    assert lines[2].split()[:4] == ["1", "1", doc["corpus"], doc["id"]]
    assert lines[-1] == "(2 rows)"
    result = run("search", doc["text"], "-k", 2, "--json", warehouse=ingested)
    rows = json.loads(result.stdout)
    assert [json.loads(line) for line in run("search", doc["text"], "-k", 2, "--nl", warehouse=ingested).stdout.splitlines()] == rows
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["doc_hash"] == doc["doc_hash"]
    assert rows[0]["text"] == doc["text"]


@pytest.mark.parametrize("args, error", [
    (["--layer", "5"], "Error: --layer 5 does not exist; model {model} has layers 0..2"),
    (["--model", "nope"], None),
    (["--where", "no_such_field = 1"], None),
    (["-k", "0"], None),
])
def test_cli_errors_are_one_line(ingested, args, error):
    result = run("search", "a library", *args, warehouse=ingested)
    model = ingested.models()[0].model
    assert result.exit_code in (1, 2)
    if error is not None:
        assert result.output.strip() == error.format(model=model)
    if result.exit_code == 1:
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_an_empty_text_says_what_to_pass(ingested):
    with pytest.raises(EwError, match="the search text is empty"):
        search(ingested, "  ")


def test_a_layer_without_vectors_names_the_stored_ones(tmp_path, tiny_bert_dir, labelled_corpus):
    from pipelines.ingest import ingest
    from warehouse import Warehouse

    wh = Warehouse.open(tmp_path / "wh", create=True)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(labelled_corpus.read_text().splitlines(keepends=True)[:5]))
    ingest(wh, corpus, model=str(tiny_bert_dir), layers="last")
    with pytest.raises(EwError, match=r"no vectors of model .* layer 1 at warehouse version 1 \(stored layers: 2\); "
                                      r"pass one of them with --layer, or ingest with --layers 1"):
        search(wh, "a library", layer=1)
