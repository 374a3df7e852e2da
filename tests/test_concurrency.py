"""Several writers and readers at once: no lost commit or head, no key stored twice, every version readable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pipelines.head_catalog import list_heads, open_head

ROOT = Path(__file__).parents[1]

# Retries only while another writer holds the lock, as a user (or a scheduler) would.
INGEST_UNTIL_DONE = textwrap.dedent(
    """
    import subprocess, sys, time
    command = [sys.executable, "-m", "pipelines.cli"] + sys.argv[1:]
    for attempt in range(400):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0 or "another ew process" not in done.stderr:
            sys.stdout.write(done.stdout); sys.stderr.write(done.stderr); sys.exit(done.returncode)
        time.sleep(0.1)
    sys.exit("gave up waiting for the lock")
    """
)

# Reads every version again and again; any count that changes for a pinned version is an error.
PINNED_READER = textwrap.dedent(
    """
    import json, sys, time
    from warehouse import Warehouse
    wh = Warehouse.open(sys.argv[1])
    seen, deadline = {}, time.time() + float(sys.argv[2])
    while time.time() < deadline:
        for entry in wh.log():
            counts = wh.query("select (select count(*) from documents), (select count(*) from embeddings), "
                              "(select count(*) from heads)", version=entry.version).read_all().to_pylist()[0]
            if seen.setdefault(entry.version, counts) != counts:
                sys.exit(f"version {entry.version} changed: {seen[entry.version]} then {counts}")
    print(json.dumps({"versions_read": len(seen)}))
    """
)


def corpus(path: Path, name: str, n: int) -> Path:
    # Texts 0..9 are shared by every corpus: their vectors must be stored once.
    path.write_text("".join(json.dumps({"id": f"{name}-{i}", "text": f"shared or own text {i if i < 10 else name + str(i)}"}) + "\n"
                            for i in range(n)))
    return path


def test_ingests_fit_heads_and_pinned_readers_at_once(warehouse_copy, tiny_bert_dir, tmp_path):
    wh = warehouse_copy
    start = [sys.executable, "-c"]
    ingests = [
        subprocess.Popen(start + [INGEST_UNTIL_DONE, "-w", str(wh.root), "ingest", str(corpus(tmp_path / f"{name}.jsonl", name, 40)),
                                  "--model", str(tiny_bert_dir), "--chunk-size", "15", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for name in ("alpha", "beta", "gamma")
    ]
    heads = [
        subprocess.Popen([sys.executable, "-m", "pipelines.cli", "-w", str(wh.root), "fit-head", "--label", "section",
                          "--name", "same", "--epochs", "3", "--json", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    reader = subprocess.Popen(start + [PINNED_READER, str(wh.root), "12"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT)
    deadline = time.time() + 240
    results = [(p, *p.communicate(timeout=max(1, deadline - time.time()))) for p in ingests + heads + [reader]]

    for process, out, err in results[:3]:
        assert process.returncode == 0, err
    fit_codes = sorted(process.returncode for process, _, _ in results[3:5])
    assert fit_codes == [0, 1], results[3:5]
    loser_error = next(err for process, _, err in results[3:5] if process.returncode == 1)
    assert loser_error.startswith("Error: a head named 'same'") and loser_error.count("\n") == 1, loser_error
    reader_process, reader_out, reader_err = results[5]
    assert reader_process.returncode == 0, reader_err
    assert json.loads(reader_out)["versions_read"] > 1

    # No lost commit: every corpus whole. No key twice. One head, loadable. Every version readable.
    counts = wh.query("select corpus, count(*) as n from documents group by all").read_all().to_pylist()
    assert {row["corpus"]: row["n"] for row in counts if row["corpus"] in ("alpha", "beta", "gamma")} == \
        {"alpha": 40, "beta": 40, "gamma": 40}
    keys = wh.query("select count(*) = count(distinct (doc_hash, model, layer, pooling)) as unique from embeddings")
    assert keys.read_all().to_pylist() == [{"unique": True}]
    assert [row.head for row in list_heads(wh)] == ["same"]
    assert open_head(wh, "same").card.name == "same"
    assert len(list(wh.heads_dir().glob("same.*"))) == 1  # the loser removed its own files only
    for entry in wh.log():
        wh.query("select count(*) from documents", version=entry.version).read_all()
