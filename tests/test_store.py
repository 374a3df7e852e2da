import subprocess
import sys
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from warehouse import EwError, VersionNotFoundError, Warehouse, WarehouseLockedError, WarehouseNotFoundError
from warehouse.catalog import ModelRow

MODEL_ROW = ModelRow(model="m-1", name="m", source="test", fingerprint="f" * 64, dim=8, num_layers=2, max_length=16,
                     pooling="mean", precision="fp32", max_abs_diff=0.0, artifact="artifacts/models/m-1",
                     created_at=datetime.now(timezone.utc))


def docs(*ids, section="x"):
    return pa.table(
        {
            "corpus": ["c"] * len(ids),
            "id": list(ids),
            "doc_hash": [f"h{i}" for i in ids],
            "text": [f"text {i}" for i in ids],
            "record_hash": [f"r{i}{section}" for i in ids],
            "section": [section] * len(ids),
        }
    )


@pytest.fixture
def wh(tmp_path):
    return Warehouse.open(tmp_path / "wh", create=True)


def test_open_missing_warehouse_says_how_to_create_one(tmp_path):
    with pytest.raises(WarehouseNotFoundError, match="ew ingest"):
        Warehouse.open(tmp_path / "nope")


def test_create_refuses_a_non_empty_foreign_directory(tmp_path):
    (tmp_path / "data.txt").write_text("mine")
    with pytest.raises(EwError, match="not an ew warehouse"):
        Warehouse.open(tmp_path, create=True)


def test_two_commits_then_version_reads_the_first(wh):
    with wh.writer() as w:
        w.upsert_documents(docs("1", "2"))
        assert w.commit("ingest") == 0
    with wh.writer() as w:
        w.upsert_documents(docs("3"))
        assert w.commit("ingest") == 1
    count = "select count(*) as n from documents"
    assert wh.query(count).read_all().column("n").to_pylist() == [3]
    assert wh.query(count, version=0).read_all().column("n").to_pylist() == [2]
    log = wh.log()
    assert [(e.version, e.operation, e.rows_added) for e in log] == [(0, "ingest", 2), (1, "ingest", 1)]


def test_upsert_replaces_a_changed_row_and_keeps_old_versions(wh):
    with wh.writer() as w:
        w.upsert_documents(docs("1", "2"))
        w.commit("ingest")
    with wh.writer() as w:
        w.upsert_documents(docs("2", section="y"))
        w.commit("ingest")
    rows = wh.query("select id, section from documents order by id").read_all().to_pylist()
    assert rows == [{"id": "1", "section": "x"}, {"id": "2", "section": "y"}]
    old = wh.query("select section from documents where id = '2'", version=0).read_all()
    assert old.column("section").to_pylist() == ["x"]


def test_unknown_version_is_a_clear_error(wh):
    with wh.writer() as w:
        w.upsert_documents(docs("1"))
        w.commit("ingest")
    with pytest.raises(VersionNotFoundError, match="versions run 0..0"):
        wh.snapshot(5)


def test_writes_without_a_commit_are_invisible(wh):
    with wh.writer() as w:
        w.upsert_documents(docs("1"))
        w.commit("ingest")
    with wh.writer() as w:
        w.upsert_documents(docs("2"))  # a writer that dies before its log row
    assert wh.query("select count(*) as n from documents").read_all().column("n").to_pylist() == [1]


def test_one_writer_at_a_time(wh):
    with wh.writer():
        with pytest.raises(WarehouseLockedError, match="another ew process"):
            with wh.writer():
                pass


def test_a_pinned_query_is_stable_while_another_process_commits(wh):
    for start in range(0, 40, 10):
        with wh.writer() as w:
            w.upsert_documents(docs(*[str(i) for i in range(start, start + 10)]))
            w.commit("ingest")
    reader = wh.query("select id from documents", batch_rows=5).reader
    first = reader.read_next_batch()
    writer_script = (
        "import sys, pyarrow as pa\n"
        "from warehouse import Warehouse\n"
        "wh = Warehouse.open(sys.argv[1])\n"
        "with wh.writer() as w:\n"
        "    w.upsert_documents(pa.table({'corpus': ['c'] * 50, 'id': [f'n{i}' for i in range(50)],"
        " 'doc_hash': ['h'] * 50, 'text': ['t'] * 50, 'record_hash': ['r'] * 50, 'section': ['z'] * 50}))\n"
        "    print(w.commit('ingest'))\n"
    )
    done = subprocess.run([sys.executable, "-c", writer_script, str(wh.root)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "4"
    rest = sum(batch.num_rows for batch in reader)
    assert first.num_rows + rest == 40
    assert wh.query("select count(*) as n from documents").read_all().column("n").to_pylist() == [90]


def test_the_next_writer_adopts_commits_that_no_version_pins(wh):
    with wh.writer() as w:
        w.upsert_documents(docs("1"))
        w.commit("ingest")
    with wh.writer() as w:
        w.upsert_documents(docs("2", "3"))  # killed before its log row: hidden from readers
    assert wh.query("select count(*) as n from documents").read_all().column("n").to_pylist() == [1]
    with wh.writer() as w:
        assert w.recovered_rows == 2
    recover = wh.log()[-1]
    assert (recover.operation, recover.rows_added) == ("recover", 2)
    assert recover.detail["adopted"] == {"documents": {"from": 0, "to": 1}}
    assert wh.query("select count(*) as n from documents").read_all().column("n").to_pylist() == [3]
    with wh.writer() as w:
        assert w.recovered_rows == 0  # settled once: nothing more to adopt
    assert len(wh.log()) == 2


def test_log_rows_pin_every_table_by_name(wh):
    with wh.writer() as w:
        w.upsert_documents(docs("1"))
        w.commit("ingest")
    [entry] = wh.log()
    assert entry.pins == {"documents": 0, "embeddings": -1, "models": -1, "heads": -1, "token_states": -1}
    assert wh.snapshot(0).table_versions == entry.pins


def test_a_warehouse_it_cannot_write_refuses_writes_with_one_clear_error(wh):
    # As root every chmod is ignored: a lock path that cannot be opened for writing stands in
    # for a read-only warehouse (both fail in the same open()).
    (wh.root / ".ew-write.lock").mkdir()
    with pytest.raises(EwError, match=r"cannot write to the warehouse .* check its permissions"):
        with wh.writer():
            pass


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_first_write_leaves_no_warehouse_behind(tmp_path, existed):
    root = tmp_path / "new"
    if existed:
        root.mkdir()
    wh = Warehouse.open(root, create=True)
    with pytest.raises(EwError, match="no such model"):
        with wh.discarded_if_failed(), wh.writer() as w:
            w.register_model(MODEL_ROW)
            w.commit("register-model")
            raise EwError("no such model")
    # a directory that was there before stays, emptied of ew's files; one ew made goes
    assert (sorted(root.iterdir()) == []) if existed else not root.exists()


def test_a_failed_write_keeps_a_warehouse_with_documents_or_one_it_did_not_create(tmp_path):
    wh = Warehouse.open(tmp_path / "wh", create=True)
    with pytest.raises(EwError), wh.discarded_if_failed(), wh.writer() as w:
        w.upsert_documents(docs("1"))
        w.commit("ingest")
        raise EwError("later chunk failed")
    reopened = Warehouse.open(tmp_path / "wh")
    assert reopened.latest_version() == 0
    with pytest.raises(EwError), reopened.discarded_if_failed():
        raise EwError("failed")
    assert Warehouse.open(tmp_path / "wh").latest_version() == 0
