"""Crash safety: a writer killed at any commit boundary loses nothing and hides nothing.

Every Delta write of an ingest (embeddings, documents, log) is a point where a process can
die: just before the write, or just after it. For each point a real `ew ingest` runs in a
subprocess that exits at once there (os._exit, as kill -9 or a power cut would leave it);
then the warehouse must read at its last committed version, and a rerun must end with every
document visible exactly once, every vector stored exactly once.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.ingest import ingest
from pipelines.integrity import verify
from warehouse import Warehouse

DOCUMENTS = 16
CHUNK = 10  # two chunks: 10 + 6 documents

CRASHING_INGEST = textwrap.dedent(
    """
    import os, sys
    import warehouse.writer as store

    target, when = int(sys.argv[1]), sys.argv[2]
    real, calls = store.write_deltalake, [0]

    def write_then_maybe_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == target and when == "before":
            os._exit(137)
        real(*args, **kwargs)
        if calls[0] == target and when == "after":
            os._exit(137)

    store.write_deltalake = write_then_maybe_die
    from pipelines.cli import cli
    try:
        cli(sys.argv[3:], prog_name="ew", standalone_mode=False)
    finally:
        print("writes", calls[0])
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bert_dir):
    """A warehouse that holds the tiny model already (the export is not what is under test)."""
    root = tmp_path_factory.mktemp("crash") / "base"
    warm = root.parent / "warm.jsonl"
    warm.write_text(json.dumps({"id": "warm", "text": "warm up"}) + "\n")
    ingest(Warehouse.open(root, create=True), warm, model=str(tiny_bert_dir), corpus="warm")
    corpus = root.parent / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document number {i} says {i % 5}", "topic": f"t{i % 3}"}) + "\n"
                              for i in range(DOCUMENTS)))
    return root, corpus


def run_ingest(root: Path, corpus: Path, model: Path, *, target: int = 0, when: str = "never") -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", CRASHING_INGEST, str(target), when, "-w", str(root), "ingest", str(corpus),
               "--model", str(model), "--chunk-size", str(CHUNK), "--corpus", "c", "--json"]
    return subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1])


def counts(wh: Warehouse) -> dict:
    sql = """select (select count(*) from documents where corpus = 'c') as documents,
                    (select count(distinct id) from documents where corpus = 'c') as ids,
                    (select count(*) from embeddings e join (select distinct doc_hash from documents where corpus = 'c') d
                       using (doc_hash)) as vectors,
                    (select count(*) from (select distinct doc_hash, model, layer, pooling from embeddings)) as distinct_keys,
                    (select count(*) from embeddings) as all_vectors"""
    return wh.query(sql).read_all().to_pylist()[0]


def test_a_crash_at_any_commit_boundary_loses_nothing_and_hides_nothing(exported, tiny_bert_dir, tmp_path):
    base, corpus = exported
    clean = run_ingest(shutil.copytree(base, tmp_path / "clean"), corpus, tiny_bert_dir)
    assert clean.returncode == 0, clean.stderr
    writes = int(clean.stdout.split("writes")[-1])
    assert writes == 2 * 3  # per chunk: embeddings, documents, log
    layers = json.loads(clean.stdout.splitlines()[0])["layers"]
    expected = {"documents": DOCUMENTS, "ids": DOCUMENTS, "vectors": DOCUMENTS * len(layers)}

    tried = survived = 0
    for target in range(1, writes + 1):
        for when in ("before", "after"):
            tried += 1
            root = shutil.copytree(base, tmp_path / f"{target}-{when}")
            crashed = run_ingest(root, corpus, tiny_bert_dir, target=target, when=when)
            assert crashed.returncode == 137, crashed.stderr
            wh = Warehouse.open(root)
            crashed_report = verify(wh, deep=True)  # sound, but for commits the next writer adopts
            assert {p.kind for p in crashed_report.problems} <= {"ahead"}, [p.line() for p in crashed_report.problems]
            before = counts(wh)  # readable at its last committed version, whatever was written after it
            assert before["documents"] in (0, CHUNK, DOCUMENTS) and before["documents"] == before["ids"]
            summary = ingest(wh, corpus, model=str(tiny_bert_dir), chunk_size=CHUNK, corpus="c").to_dict()
            after = counts(wh)
            assert {k: after[k] for k in expected} == expected, (target, when)
            assert after["distinct_keys"] == after["all_vectors"], (target, when)  # no key stored twice
            # Every text is accounted for once: encoded by the rerun, or stored and visible before it.
            assert summary["embedded"] + summary["reused"] == DOCUMENTS, (target, when, summary)
            assert summary["embedded"] <= DOCUMENTS - before["documents"], (target, when, summary)
            report = verify(wh, deep=True)
            assert report.ok, [p.line() for p in report.problems]
            survived += 1
    assert (tried, survived) == (2 * writes, 2 * writes)
