import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines import embedding as embedding_module
from pipelines.ingest import ingest
from warehouse import EwError, Warehouse
from pipelines.errors import InputError, ModelNotFoundError


def write_corpus(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records(n, start=0, label="a"):
    return [{"id": f"doc{i}", "text": f"the package number {i} does thing {i % 7}", "topic": label} for i in range(start, start + n)]


def count(wh, sql):
    return wh.query(sql).read_all().column(0).to_pylist()[0]


@pytest.fixture
def wh(tmp_path):
    return Warehouse.open(tmp_path / "wh", create=True)


def test_first_ingest_exports_once_and_stores_every_layer(wh, tmp_path, tiny_bert_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", records(20))
    first = ingest(wh, corpus, model=str(tiny_bert_dir), chunk_size=8)
    assert first.exported and (first.read, first.new_documents, first.embedded, first.reused) == (20, 20, 20, 0)
    [model] = wh.query("select * from models").read_all().to_pylist()
    assert model["model"] == first.model and model["max_abs_diff"] < 1e-4
    layers = model["num_layers"] + 1
    assert count(wh, "select count(*) from embeddings") == 20 * layers
    assert count(wh, f"select count(distinct layer) from embeddings where model = '{first.model}'") == layers
    widths = wh.query("select distinct len(embedding) as w from embeddings").read_all().column("w").to_pylist()
    assert widths == [model["dim"]]
    assert first.version == wh.latest_version() and len(wh.log()) == 1 + 3  # register + 3 chunks


def test_reingest_embeds_nothing_and_growth_embeds_only_the_new(wh, tmp_path, tiny_bert_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", records(30))
    first = ingest(wh, corpus, model=str(tiny_bert_dir))
    version = wh.latest_version()
    again = ingest(wh, corpus, model=str(tiny_bert_dir))
    assert (again.exported, again.embedded, again.reused, again.new_documents) == (False, 0, 30, 0)
    assert wh.latest_version() == version  # nothing changed, no new version
    grown = write_corpus(tmp_path / "c.jsonl", records(33))
    more = ingest(wh, grown, model=first.model)
    assert (more.embedded, more.reused, more.new_documents) == (3, 30, 3)
    rows = count(wh, "select count(*) from embeddings")
    distinct = count(wh, "select count(*) from (select distinct doc_hash, model, layer, pooling from embeddings)")
    assert rows == distinct


def test_identical_texts_are_embedded_once(wh, tmp_path, tiny_bert_dir):
    docs = records(10) + [{"id": "copy", "text": records(1)[0]["text"], "topic": "b"}]
    result = ingest(wh, write_corpus(tmp_path / "c.jsonl", docs), model=str(tiny_bert_dir))
    assert (result.read, result.embedded, result.duplicates, result.new_documents) == (11, 10, 1, 11)


def test_a_changed_label_updates_the_row_and_embeds_nothing(wh, tmp_path, tiny_bert_dir):
    ingest(wh, write_corpus(tmp_path / "c.jsonl", records(5)), model=str(tiny_bert_dir))
    changed = records(5)
    changed[2]["topic"] = "fixed"
    changed[4]["topic"] = "fixed too"
    before = wh.latest_version()
    result = ingest(wh, write_corpus(tmp_path / "c.jsonl", changed), model=str(tiny_bert_dir), chunk_size=2)
    assert (result.embedded, result.updated_documents, result.new_documents) == (0, 2, 0)
    assert wh.latest_version() == before + 1  # the updates of every chunk are written together
    assert count(wh, "select topic from documents where id = 'doc2'") == "fixed"
    assert count(wh, "select count(*) from documents") == 5


def test_missing_layers_are_added_without_duplicating_others(wh, tmp_path, tiny_bert_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", records(6))
    last = ingest(wh, corpus, model=str(tiny_bert_dir), layers="last")
    assert count(wh, "select count(*) from embeddings") == 6
    every = ingest(wh, corpus, model=str(tiny_bert_dir))
    assert every.embedded == 6
    layers = len(every.layers)
    assert count(wh, "select count(*) from embeddings") == 6 * layers
    assert last.layers == (layers - 1,)


def test_a_bad_line_fails_before_its_chunk_commits(wh, tmp_path, tiny_bert_dir):
    lines = [json.dumps(r) for r in records(12)]
    lines[9] = '{"id": "broken", "text": '
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as caught:
        ingest(wh, corpus, model=str(tiny_bert_dir), chunk_size=4)
    assert caught.value.line == 10 and str(corpus) in str(caught.value) and "not valid JSON" in str(caught.value)
    assert "--on-error skip" in str(caught.value)
    assert count(wh, "select count(*) from documents") == 8  # two chunks of four committed, the third not


def test_skip_writes_rejects_with_reasons(wh, tmp_path, tiny_bert_dir):
    lines = [json.dumps(r) for r in records(4)] + ["[1]", '{"id": "x", "text": "  "}']
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    result = ingest(wh, corpus, model=str(tiny_bert_dir), on_error="skip", rejects_file=tmp_path / "rejects.jsonl")
    assert (result.read, result.rejected, result.embedded) == (6, 2, 4)
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["file"]) for r in rejects] == [(5, str(corpus)), (6, str(corpus))]
    assert "not an object" in rejects[0]["reason"] and "empty" in rejects[1]["reason"]


def test_long_texts_are_truncated_and_counted(wh, tmp_path, tiny_bert_dir):
    docs = [{"id": "long", "text": " ".join(["word"] * 200)}, {"id": "short", "text": "word"}]
    result = ingest(wh, write_corpus(tmp_path / "c.jsonl", docs), model=str(tiny_bert_dir), max_length=16)
    assert result.truncated == 1


def test_an_unknown_model_says_where_it_looked(wh, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", records(2))
    with pytest.raises(ModelNotFoundError, match="looked in"):
        ingest(wh, corpus, model="nobody/no-such-model")


def test_interrupted_ingest_keeps_committed_chunks_and_resumes(wh, tmp_path, tiny_bert_dir, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl", records(40))
    calls = {"n": 0}
    real = embedding_module.encode_texts

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding_module, "encode_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest(wh, corpus, model=str(tiny_bert_dir), chunk_size=10)
    monkeypatch.setattr(embedding_module, "encode_texts", real)
    assert count(wh, "select count(*) from documents") == 20
    resumed = ingest(wh, corpus, model=str(tiny_bert_dir), chunk_size=10)
    assert (resumed.embedded, resumed.reused) == (20, 20)


def test_kill_9_leaves_a_readable_warehouse_and_a_rerun_without_duplicates(wh, tmp_path, tiny_bert_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", records(3000))
    ingest(wh, write_corpus(tmp_path / "warm.jsonl", records(1)), model=str(tiny_bert_dir))  # export first
    command = [sys.executable, "-m", "pipelines.cli", "-w", str(wh.root), "ingest", str(corpus),
               "--model", str(tiny_bert_dir), "--chunk-size", "50", "--corpus", "c"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (wh.latest_version() or 0) < 4:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stored = count(wh, "select count(*) from documents where corpus = 'c'")
    assert 0 < stored < 3000
    again = ingest(wh, corpus, model=str(tiny_bert_dir), corpus="c")
    assert again.read == 3000
    assert count(wh, "select count(*) from documents where corpus = 'c'") == 3000
    rows = count(wh, "select count(*) from embeddings")
    distinct = count(wh, "select count(*) from (select distinct doc_hash, model, layer, pooling from embeddings)")
    assert rows == distinct


def test_bad_options_are_clear_errors(wh, tmp_path, tiny_bert_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", records(2))
    with pytest.raises(EwError, match="layer 9 does not exist"):
        ingest(wh, corpus, model=str(tiny_bert_dir), layers="9")
    with pytest.raises(EwError, match="--on-error"):
        ingest(wh, corpus, model=str(tiny_bert_dir), on_error="ignore")


def test_the_ingest_path_never_imports_torch(wh, tmp_path, tiny_bert_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", records(3))
    ingest(wh, corpus, model=str(tiny_bert_dir))  # exports (torch) in this process
    more = write_corpus(tmp_path / "d.jsonl", records(3, start=100))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipelines.ingest import ingest\n"
        f"r = ingest({str(wh.root)!r}, Path({str(more)!r}), model={str(tiny_bert_dir)!r})\n"
        "assert r.embedded == 3 and not r.exported, r\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_registered_key_keeps_its_settings(wh, tmp_path, tiny_bert_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", records(2))
    first = ingest(wh, corpus, model=str(tiny_bert_dir))
    with pytest.raises(EwError, match="was exported with pooling mean, not cls"):
        ingest(wh, corpus, model=first.model, pooling="cls")


def test_a_registered_model_works_without_its_weights(wh, tmp_path, tiny_bert_dir, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl", records(2))
    first = ingest(wh, corpus, model=str(tiny_bert_dir))
    import pipelines.registry

    def gone(name, **options):
        raise ModelNotFoundError(name, ["nowhere"])

    monkeypatch.setattr(pipelines.registry, "resolve_model", gone)
    again = ingest(wh, write_corpus(tmp_path / "d.jsonl", records(3)), model=tiny_bert_dir.name)
    assert (again.model, again.embedded, again.exported) == (first.model, 1, False)
