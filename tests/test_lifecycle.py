"""compact, vacuum and rm: fewer files and less disk, the same rows, and never a kept version broken."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from pipelines.head_catalog import remove_head
from pipelines.ingest import ingest
from pipelines.integrity import verify
from warehouse import EwError, VersionVacuumedError, Warehouse, WarehouseLockedError
from warehouse.lifecycle import compact, parse_age, remove_corpus, vacuum
from warehouse.tables import DOCUMENTS

ROOT = Path(__file__).parents[1]
DOCUMENT_ROWS = "select corpus, id, doc_hash, section from documents order by corpus, id"
VECTOR_SUMS = "select model, layer, count(*) as n, sum(list_sum(embedding)) as total from embeddings group by all order by all"


def parquet_files(wh: Warehouse, table: str) -> list[str]:
    return [path for path, _ in wh.storage.iter_files(table) if path.endswith(".parquet") and "_delta_log" not in path]


def rows(wh: Warehouse, sql: str, version: int | None = None) -> list[dict]:
    return wh.query(sql, version=version).read_all().to_pylist()


def correct_labels(wh: Warehouse, corpus_file: Path, tmp_path: Path, tiny_bert_dir: Path, *, changed: int = 3) -> int:
    """Ingest the corpus again with ``changed`` sections corrected: the documents partition is rewritten."""
    records = [json.loads(line) for line in corpus_file.read_text(encoding="utf-8").splitlines()]
    for record in records[:changed]:
        record["section"] = "corrected"
    again = tmp_path / corpus_file.name
    again.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return ingest(wh, again, model=str(tiny_bert_dir)).version


def test_compact_writes_fewer_files_as_one_version_and_every_query_reads_the_same(warehouse_copy):
    wh = warehouse_copy
    before_version = wh.latest_version()
    documents, vectors = rows(wh, DOCUMENT_ROWS), rows(wh, VECTOR_SUMS)
    files = {table: len(parquet_files(wh, table)) for table in ("documents", "embeddings")}

    plan = compact(wh, dry_run=True)
    assert plan.version is None and wh.latest_version() == before_version  # a dry run writes nothing
    assert {t.table for t in plan.tables} == {"documents", "embeddings"} and plan.files_after < plan.files_before

    done = compact(wh)
    assert done.version == before_version + 1 and wh.log()[-1].operation == "compact"
    assert [(t.table, t.files_after) for t in done.tables] == [(t.table, t.files_after) for t in plan.tables]
    assert wh.log()[-1].detail["tables"]["documents"]["files_after"] == 1
    assert rows(wh, DOCUMENT_ROWS) == documents and rows(wh, VECTOR_SUMS) == vectors
    # Readers of older versions keep their files: compaction only adds remove and add actions.
    assert rows(wh, DOCUMENT_ROWS, before_version) == documents
    assert {table: len(parquet_files(wh, table)) for table in files} == {t: n + 1 if t == "documents" else n + 3
                                                                         for t, n in files.items()}
    assert compact(wh).version is None  # nothing left to compact: no new version
    assert verify(wh, deep=True).ok


def test_vacuum_after_label_corrections_leaves_each_document_once_on_disk(warehouse_copy, labelled_corpus,
                                                                          tiny_bert_dir, tmp_path):
    wh = warehouse_copy
    first = wh.latest_version()
    corrected = correct_labels(wh, labelled_corpus, tmp_path, tiny_bert_dir)
    glob = f"select count(*) from read_parquet('{wh.root}/documents/**/*.parquet')"
    assert duckdb.sql(glob).fetchall()[0][0] == 2 * 240  # what a plain-Parquet reader sees before

    plan = vacuum(wh, keep_versions=1)
    assert (plan.dry_run, plan.version, plan.oldest_version) == (True, None, corrected)
    assert plan.tables["documents"][0] == 3 and "embeddings" not in plan.tables
    assert duckdb.sql(glob).fetchall()[0][0] == 2 * 240  # a dry run deletes nothing

    done = vacuum(wh, keep_versions=1, dry_run=False)
    assert (done.version, done.oldest_version, done.files, done.bytes) == (corrected + 1, corrected, plan.files, plan.bytes)
    assert duckdb.sql(glob).fetchall()[0][0] == 240
    assert rows(wh, "select count(*) as n from documents where section = 'corrected'") == [{"n": 3}]
    assert rows(wh, "select count(*) as n from documents", corrected) == [{"n": 240}]
    with pytest.raises(VersionVacuumedError) as error:
        wh.snapshot(first)
    assert str(error.value) == (f"version {first} is no longer readable: `ew vacuum` deleted its files; the oldest "
                                f"readable version is {corrected} (versions run {corrected}..{corrected + 1}); see `ew log`")
    assert vacuum(wh, keep_versions=1, dry_run=False).files == 0  # the vacuum version does not count as one to keep
    assert wh.latest_version() == corrected + 1
    assert verify(wh, deep=True).ok


def test_vacuum_keeps_every_file_a_kept_version_needs_even_for_a_reader_reading_meanwhile(warehouse_copy, labelled_corpus,
                                                                                        tiny_bert_dir, tmp_path):
    wh = warehouse_copy
    kept = correct_labels(wh, labelled_corpus, tmp_path, tiny_bert_dir)
    expected = rows(wh, DOCUMENT_ROWS, kept)
    compact(wh)
    dataset = wh.dataset(DOCUMENTS, wh.snapshot(kept))  # a reader holding version `kept` open while vacuum runs
    done = vacuum(wh, keep_versions=2, dry_run=False)
    assert done.oldest_version == kept and done.files > 0
    read = dataset.to_table(columns=["corpus", "id", "doc_hash", "section"]).sort_by([("corpus", "ascending"), ("id", "ascending")])
    assert read.to_pylist() == expected and rows(wh, DOCUMENT_ROWS, kept) == expected
    assert rows(wh, DOCUMENT_ROWS) == expected


def test_vacuum_older_than_keeps_the_version_that_was_latest_then(warehouse_copy):
    wh = warehouse_copy
    compact(wh)
    assert vacuum(wh, older_than=timedelta(days=7)).oldest_version == 0  # everything is younger than a week
    assert vacuum(wh, older_than=timedelta(0)).oldest_version == wh.latest_version()
    assert parse_age("7d") == timedelta(days=7) and parse_age("12h") == timedelta(hours=12)
    with pytest.raises(EwError, match="not a number followed by"):
        parse_age("soon")
    with pytest.raises(EwError, match="say which versions to keep"):
        vacuum(wh)


def test_vacuum_deletes_artifacts_of_removed_heads_and_leaves_fresh_ones(fitted_copy):
    wh = fitted_copy
    (head,) = wh.heads()
    remove_head(wh, head.head)
    assert vacuum(wh, keep_versions=1).artifacts == ()  # changed within the hour: maybe a fit-head about to register it
    plan = vacuum(wh, keep_versions=1, artifact_grace=timedelta(0))
    assert plan.artifacts == (head.artifact,) and plan.artifact_bytes > 0
    vacuum(wh, keep_versions=1, artifact_grace=timedelta(0), dry_run=False)
    assert not (wh.root / head.artifact).exists() and all((wh.root / m.artifact).is_dir() for m in wh.models())
    assert verify(wh, deep=True).ok


def test_remove_corpus_is_one_version_and_keeps_the_vectors(warehouse_copy):
    wh = warehouse_copy
    before = wh.latest_version()
    vectors = rows(wh, "select count(*) as n from embeddings")
    removed = remove_corpus(wh, "debian")
    assert (removed.documents, removed.version) == (240, before + 1) and wh.log()[-1].operation == "remove-corpus"
    assert rows(wh, "select count(*) as n from documents") == [{"n": 0}]
    assert rows(wh, "select count(*) as n from documents", before) == [{"n": 240}]
    assert rows(wh, "select count(*) as n from embeddings") == vectors
    with pytest.raises(EwError) as error:
        remove_corpus(wh, "debian")
    assert str(error.value).startswith("no corpus named 'debian' (corpora: none yet)")
    vacuum(wh, keep_versions=1, dry_run=False)
    assert parquet_files(wh, "documents") == [] and not (wh.root / "documents" / "corpus=debian").exists()
    assert verify(wh, deep=True).ok


def test_compact_and_vacuum_take_the_write_lock_without_waiting(warehouse_copy):
    wh = warehouse_copy
    with wh.storage.lock():
        with pytest.raises(WarehouseLockedError):
            compact(wh)
        with pytest.raises(WarehouseLockedError):
            vacuum(wh, keep_versions=1, dry_run=False)
        with pytest.raises(WarehouseLockedError):
            remove_corpus(wh, "debian")
        assert compact(wh, dry_run=True).version is None  # dry runs only read


# A `kill -9` at a write: the process exits at once after the Nth Delta commit (a table's compaction
# or the log row) or file deletion, as a power cut would leave it.
KILLED_AFTER = textwrap.dedent(
    """
    import os, sys
    import deltalake.table, warehouse.storage, warehouse.writer

    target, calls = int(sys.argv[1]), [0]

    def dying(real):
        def write(*args, **kwargs):
            result = real(*args, **kwargs)
            calls[0] += 1
            if calls[0] == target:
                os._exit(137)
            return result
        return write

    deltalake.table.TableOptimizer.compact = dying(deltalake.table.TableOptimizer.compact)
    warehouse.writer.write_deltalake = dying(warehouse.writer.write_deltalake)
    warehouse.storage.LocalStorage.delete = dying(warehouse.storage.LocalStorage.delete)
    from pipelines.cli import cli
    cli(sys.argv[2:], prog_name="ew", standalone_mode=False)
    print("writes", calls[0])
    """
)


def killed_runs(base: Path, tmp_path: Path, targets: list[int], *args: str) -> dict[int, Path]:
    """Run `ew ARGS` on a copy of ``base`` per target, killed after that many writes, all at once."""
    runs = {}
    for target in targets:
        root = shutil.copytree(base, tmp_path / f"killed-{target}")
        runs[target] = (root, subprocess.Popen([sys.executable, "-c", KILLED_AFTER, str(target), "-w", str(root), *args],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    for target, (root, process) in runs.items():
        _, stderr = process.communicate()
        assert process.returncode == 137, stderr
    return {target: root for target, (root, _) in runs.items()}


def test_compact_killed_after_any_commit_loses_nothing_and_a_rerun_finishes(warehouse_copy, tmp_path):
    documents, vectors = rows(warehouse_copy, DOCUMENT_ROWS), rows(warehouse_copy, VECTOR_SUMS)
    # documents and embeddings have small files: three commits (two tables, then the log).
    for target, root in killed_runs(warehouse_copy.root, tmp_path, [1, 2, 3], "compact").items():
        wh = Warehouse.open(root)
        assert (wh.log()[-1].operation == "compact") == (target == 3)
        crashed = verify(wh, deep=True)  # sound, but for table commits the next writer adopts
        assert {p.kind for p in crashed.problems} <= {"ahead"}, [p.line() for p in crashed.problems]
        assert rows(wh, DOCUMENT_ROWS) == documents and rows(wh, VECTOR_SUMS) == vectors
        compact(wh)  # the rerun: adopts what was compacted, compacts the rest
        assert compact(wh, dry_run=True).tables == (), target
        assert rows(wh, DOCUMENT_ROWS) == documents and rows(wh, VECTOR_SUMS) == vectors
        assert verify(wh, deep=True).ok, target


def test_vacuum_killed_between_deletions_leaves_every_kept_version_whole(warehouse_copy, labelled_corpus, tiny_bert_dir,
                                                                        tmp_path):
    wh = warehouse_copy
    correct_labels(wh, labelled_corpus, tmp_path, tiny_bert_dir)
    compact(wh)
    documents, vectors = rows(wh, DOCUMENT_ROWS), rows(wh, VECTOR_SUMS)
    garbage = vacuum(wh, keep_versions=1).files
    assert garbage > 4
    # 1: after the vacuum version, before any deletion; 2, 4: after one and three deletions.
    for target, root in killed_runs(wh.root, tmp_path, [1, 2, 4], "vacuum", "--keep-versions", "1", "--yes").items():
        killed = Warehouse.open(root)
        assert verify(killed, deep=True).ok, target
        assert rows(killed, DOCUMENT_ROWS) == documents and rows(killed, VECTOR_SUMS) == vectors
        assert vacuum(killed, keep_versions=1).files == garbage - (target - 1)
        rerun = vacuum(killed, keep_versions=1, dry_run=False)
        assert rerun.version is None and rerun.oldest_version == wh.latest_version()  # recorded by the killed run
        assert vacuum(killed, keep_versions=1).files == 0 and verify(killed, deep=True).ok
        assert rows(killed, DOCUMENT_ROWS) == documents



def test_an_ingest_and_compactions_at_once_lose_nothing(warehouse_copy, tiny_bert_dir, tmp_path):
    wh = warehouse_copy
    corpus = tmp_path / "more.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"m{i}", "text": f"more text number {i}"}) + "\n" for i in range(60)))
    stop, outcomes = threading.Event(), []

    def compact_again_and_again():
        while not stop.is_set():
            try:
                outcomes.append(compact(Warehouse.open(wh.root)).version)
            except WarehouseLockedError:  # the ingest holds the lock: the compaction is not waited for
                outcomes.append("refused")
            time.sleep(0.02)

    compacting = threading.Thread(target=compact_again_and_again)
    compacting.start()
    try:
        for _ in range(200):  # an ingest that finds the lock taken is run again, as a user would
            try:
                ingest(Warehouse.open(wh.root), corpus, model=str(tiny_bert_dir), chunk_size=15)
                break
            except WarehouseLockedError:
                time.sleep(0.02)
    finally:
        stop.set()
        compacting.join()
    assert outcomes
    compact(wh)
    assert rows(wh, "select count(*) as n from documents where corpus = 'more'") == [{"n": 60}]
    assert rows(wh, "select count(*) as n, count(distinct id) as ids from documents") == [{"n": 300, "ids": 300}]
    assert rows(wh, "select count(*) as n from embeddings") == rows(wh, "select count(*) as n from (select distinct doc_hash, model, layer, pooling from embeddings)")
    assert verify(wh, deep=True).ok


def run(*args, warehouse: Warehouse):
    from click.testing import CliRunner

    from pipelines.cli import cli

    return CliRunner().invoke(cli, ["-w", str(warehouse.root)] + [str(a) for a in args])


def test_the_commands_say_what_they_do_and_what_a_vacuumed_version_says(fitted_copy):
    wh = fitted_copy
    dry = run("compact", "--dry-run", warehouse=wh)
    assert dry.exit_code == 0 and "documents: would rewrite 1 partitions, 3 files -> 1" in dry.output
    first = wh.latest_version()
    done = run("compact", warehouse=wh)
    assert done.exit_code == 0 and f"warehouse version {first + 1};" in done.output
    assert run("compact", warehouse=wh).output == "nothing to compact: no partition has more than one small file\n"

    neither = run("vacuum", warehouse=wh)
    assert (neither.exit_code, neither.stderr) == (
        1, "Error: say which versions to keep with one of --keep-versions N or --older-than AGE (e.g. 7d)\n")
    bad_age = run("vacuum", "--older-than", "soon", warehouse=wh)
    assert bad_age.exit_code == 2 and "'soon' is not a number followed by s, m, h, d or w" in bad_age.stderr
    plan = run("vacuum", "--keep-versions", "1", warehouse=wh)
    assert plan.exit_code == 0 and plan.output.splitlines()[-1].endswith(
        f"versions before {first + 1} would no longer be readable. Run again with --yes to delete them.")
    vacuumed = run("vacuum", "--keep-versions", "1", "--yes", warehouse=wh)
    assert vacuumed.exit_code == 0 and vacuumed.output.splitlines()[-1].endswith(
        f"the oldest readable version is {first + 1} (recorded by version {first + 2})")
    old = run("query", "select count(*) from documents", "--version", first, warehouse=wh)
    assert (old.exit_code, old.stderr) == (1, f"Error: version {first} is no longer readable: `ew vacuum` deleted its "
                                              f"files; the oldest readable version is {first + 1} (versions run "
                                              f"{first + 1}..{first + 2}); see `ew log`\n")

    (head,) = wh.heads()
    removed = run("rm", "head", head.head, warehouse=wh)
    assert removed.exit_code == 0 and removed.output.startswith(f"removed head {head.head} (warehouse version {first + 3};")
    corpus = run("rm", "corpus", "debian", warehouse=wh)
    assert corpus.output == (f"removed corpus debian: 240 documents (warehouse version {first + 4}; its files stay for "
                             "readers of older versions until `ew vacuum`)\n")
    missing = run("rm", "corpus", "debian", warehouse=wh)
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: no corpus named 'debian' (corpora: none yet)")
