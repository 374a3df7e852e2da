"""Warehouses on S3-compatible object storage (warehouse/s3.py, the object lock in warehouse/lock.py),
against a moto S3 server the tests start on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

pytest.importorskip("moto.server", reason="the S3 tests need moto[server]: pip install 'ew[s3,dev]'")
boto3 = pytest.importorskip("boto3", reason="the S3 tests need boto3: pip install 'ew[s3]'")

from pipelines.cli import cli  # noqa: E402
from pipelines.ingest import ingest  # noqa: E402
from warehouse import LockLostError, Warehouse, WarehouseLockedError  # noqa: E402
from warehouse.s3 import moto_server  # noqa: E402

pytestmark = pytest.mark.s3

LOCK_TTL = 2.0


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server on a free loopback port (its own process), and the AWS variables pointing at it for this module."""
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "EW_CACHE_DIR": str(tmp_path_factory.mktemp("ew-cache")), "EW_S3_LOCK_TTL": str(LOCK_TTL),
        }.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        yield endpoint


def new_bucket() -> str:
    name = f"ew-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def s3_ingested(s3_server, tiny_bert_dir, labelled_corpus):
    """The labelled corpus ingested into s3://BUCKET/wh, as the local `ingested` fixture is."""
    uri = f"s3://{new_bucket()}/wh"
    ingest(uri, labelled_corpus, model=str(tiny_bert_dir), chunk_size=100)
    return Warehouse.open(uri)


def run(uri, *args):
    return CliRunner().invoke(cli, ["-w", uri, *map(str, args)])


def rows(wh, table, order, columns="*"):
    return wh.query(f"select {columns} from {table} order by {order}").read_all().to_pylist()


def test_every_command_works_on_s3(s3_ingested, labelled_corpus, tmp_path):
    uri = s3_ingested.uri
    query = run(uri, "query", "select count(*) as n from documents", "--format", "json")
    assert query.exit_code == 0, query.output
    assert json.loads(query.stdout) == [{"n": 240}]
    again = run(uri, "ingest", labelled_corpus, "--model", s3_ingested.models()[0].model, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["embedded"] == 0
    pinned = run(uri, "query", "select count(*) as n from documents", "--version", "1", "--format", "json")
    assert pinned.exit_code == 0, pinned.output
    log = run(uri, "log")
    assert log.exit_code == 0 and "register-model" in log.stdout, log.output

    fit = run(uri, "fit-head", "--label", "section", "--epochs", "2", "--name", "s3-head", "--json")
    assert fit.exit_code == 0, fit.output
    fitted = json.loads(fit.stdout)
    assert fitted["path"].startswith(f"{uri}/artifacts/heads/s3-head.") and fitted["report"].endswith("/report.png")
    assert s3_ingested.storage.exists(fitted["report"][len(uri) + 1:])
    heads = run(uri, "heads")
    assert heads.exit_code == 0 and "s3-head" in heads.stdout, heads.output
    models = run(uri, "models")
    assert models.exit_code == 0 and s3_ingested.models()[0].model in models.stdout, models.output
    out = tmp_path / "predicted.parquet"
    predicted = run(uri, "predict", "s3-head", labelled_corpus, "--output", out)
    assert predicted.exit_code == 0, predicted.output
    assert pq.read_table(out).num_rows == 240
    verified = run(uri, "verify")
    assert verified.exit_code == 0 and verified.stdout.startswith(f"warehouse {uri} (version "), verified.output


def test_token_states_and_a_top_head_on_s3(s3_server, tiny_bert_dir, labelled_corpus, tmp_path, monkeypatch):
    uri = f"s3://{new_bucket()}/wh"
    cached = run(uri, "ingest", labelled_corpus, "--model", tiny_bert_dir, "--token-states", "1", "--json")
    assert cached.exit_code == 0, cached.output
    assert json.loads(cached.stdout)["states_cached"] == 240
    wh = Warehouse.open(uri)
    artifact = wh.models()[0].artifact
    manifest = json.loads(wh.storage.fs.open_input_stream(wh.storage._path(f"{artifact}/manifest.json")).read())
    assert {"states-1.onnx", "states.json", "torch/model.safetensors"} <= set(manifest["files"])
    monkeypatch.setenv("EW_CACHE_DIR", str(tmp_path / "another-machine"))  # downloads the extended artifact
    fit = run(uri, "fit-head", "--label", "section", "--from-layer", "1", "--tune", "top", "--epochs", "1",
              "--name", "top", "--json")
    assert fit.exit_code == 0, fit.output
    assert json.loads(fit.stdout)["embedded"] == 0
    out = tmp_path / "predicted.csv"
    predicted = run(uri, "predict", "top", labelled_corpus, "--output", out)
    assert predicted.exit_code == 0, predicted.output
    assert len(out.read_text().splitlines()) == 241


def test_artifacts_are_downloaded_once_and_checked(s3_ingested, tmp_path, monkeypatch):
    row = s3_ingested.models()[0]
    monkeypatch.setenv("EW_CACHE_DIR", str(tmp_path / "fresh-cache"))
    local = s3_ingested.artifact_path(row.artifact)
    assert local.is_relative_to(tmp_path / "fresh-cache") and (local / "model.json").is_file()
    assert s3_ingested.artifact_path(row.artifact) == local  # cached by the manifest's digest
    assert not s3_ingested.artifact_path("artifacts/models/nothing-here").exists()


def test_the_same_corpus_gives_the_same_rows_locally_and_on_s3(s3_ingested, ingested):
    assert rows(s3_ingested, "documents", "doc_hash", "* exclude (ingested_at)") == rows(
        ingested, "documents", "doc_hash", "* exclude (ingested_at)")
    assert rows(s3_ingested, "embeddings", "doc_hash, layer") == rows(ingested, "embeddings", "doc_hash, layer")


def test_a_second_writer_gets_a_clear_error_and_nothing_is_lost(s3_server, tiny_bert_dir, labelled_corpus):
    uri = f"s3://{new_bucket()}/wh"
    ingest(uri, labelled_corpus, model=str(tiny_bert_dir), layers="last")
    wh = Warehouse.open(uri)
    before = wh.latest_version()
    with wh.writer():
        second = run(uri, "ingest", labelled_corpus, "--model", str(tiny_bert_dir), "--layers", "last")
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        assert second.exit_code == 1
        assert second.stderr == (f"Error: another ew process ({holder}) is writing to the warehouse {uri}; "
                                 "wait for it to finish and run the command again\n")
        with pytest.raises(WarehouseLockedError):
            with wh.writer():
                pass
    assert wh.latest_version() == before  # the refused writer wrote nothing; the holder's commits stay
    assert run(uri, "ingest", labelled_corpus, "--model", str(tiny_bert_dir), "--layers", "last").exit_code == 0


def test_a_held_lock_is_kept_alive_and_waiting_writers_get_it_after(s3_server):
    wh = Warehouse.open(f"s3://{new_bucket()}/wh", create=True)
    taken = []

    def second_writer():
        with wh.storage.lock(wait=LOCK_TTL * 4):
            taken.append(time.monotonic())

    with wh.storage.lock():
        waiter = threading.Thread(target=second_writer)
        waiter.start()
        time.sleep(LOCK_TTL * 1.5)  # past one expiry: only the heartbeat keeps the lock
        assert taken == []
        released = time.monotonic()
    waiter.join()
    assert taken and taken[0] >= released


def test_a_writer_whose_lock_was_taken_over_commits_nothing(s3_server):
    uri = f"s3://{new_bucket()}/wh"
    wh = Warehouse.open(uri, create=True)
    with wh.writer() as writer:
        writer.commit("before")
        before = wh.latest_version()
        # another writer replaced the lock object (as after an expiry): the next heartbeat fails
        boto3.client("s3").put_object(Bucket=wh.storage.bucket, Key=wh.storage._key(".ew-write.lock"), Body=b"{}")
        time.sleep(LOCK_TTL)
        with pytest.raises(LockLostError, match="lost the write lock of the warehouse s3://"):
            writer.commit("after")
    assert wh.latest_version() == before


def test_kill_9_mid_ingest_leaves_a_readable_warehouse_and_the_rerun_has_no_duplicates(s3_server, tiny_bert_dir, tmp_path):
    uri = f"s3://{new_bucket()}/wh"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": f"the package number {i} does thing {i % 7}"}) + "\n"
                              for i in range(800)))
    warm = tmp_path / "warm.jsonl"
    warm.write_text(json.dumps({"id": "w", "text": "warm"}) + "\n")
    ingest(uri, warm, model=str(tiny_bert_dir))  # export first
    wh = Warehouse.open(uri)
    command = [sys.executable, "-m", "pipelines.cli", "-w", uri, "ingest", str(corpus), "--model", str(tiny_bert_dir),
               "--chunk-size", "50", "--corpus", "c"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=Path(__file__).parents[1])
    deadline = time.time() + 60
    while time.time() < deadline and (wh.latest_version() or 0) < 3:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    def count(sql):
        return wh.query(sql).read_all().column(0).to_pylist()[0]

    stored = count("select count(*) from documents where corpus = 'c'")
    assert 0 < stored < 800
    with pytest.raises(WarehouseLockedError):  # the dead writer's lock holds until it expires
        ingest(uri, corpus, model=str(tiny_bert_dir), corpus="c")
    time.sleep(LOCK_TTL + 0.5)
    again = ingest(uri, corpus, model=str(tiny_bert_dir), corpus="c")
    assert again.read == 800
    assert count("select count(*) from documents where corpus = 'c'") == 800
    assert count("select count(*) from embeddings") == count(
        "select count(*) from (select distinct doc_hash, model, layer, pooling from embeddings)")


def test_readers_recipes_from_the_readme(s3_ingested):
    """The README's recipes for reading an s3:// warehouse with pyarrow, Polars and DuckDB."""
    import duckdb
    import polars as pl
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    options = {"allow_http": "true"}  # the moto server speaks plain HTTP
    dataset = DeltaTable(f"{s3_ingested.uri}/embeddings", storage_options=options).to_pyarrow_dataset()
    table = dataset.to_table(filter=(ds.field("layer") == 2), columns=["doc_hash", "embedding"])
    assert table.num_rows == 240
    vectors = pl.scan_delta(f"{s3_ingested.uri}/embeddings", storage_options=options).filter(pl.col("layer") == 2).collect()
    assert vectors.height == 240
    con = duckdb.connect()
    con.register("documents", DeltaTable(f"{s3_ingested.uri}/documents", storage_options=options).to_pyarrow_dataset())
    assert con.sql("select corpus, count(*) from documents group by all").fetchall() == [("debian", 240)]


def test_a_missing_boto3_or_a_bad_lock_expiry_is_a_clear_error(s3_server, monkeypatch):
    from warehouse.errors import EwError, StorageError

    uri = f"s3://{new_bucket()}/wh"
    wh = Warehouse.open(uri, create=True)
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(StorageError, match=r"needs the Python package 'boto3', .*: pip install 'ew\[s3\]'$"):
        with wh.writer():
            pass
    monkeypatch.setenv("EW_S3_LOCK_TTL", "soon")
    with pytest.raises(EwError) as error:
        Warehouse.open(uri)
    assert str(error.value) == "EW_S3_LOCK_TTL='soon' is not a number of seconds above 0; unset it for 60"
