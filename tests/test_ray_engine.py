"""`ew ingest --engine ray` (pipelines/ray_engine.py) on a real Ray cluster started on 127.0.0.1.

The module's fixture starts a head with 2 CPUs on 127.0.0.1 (:func:`pipelines.ray_engine.local_cluster`)
and kills it at the end; every ingest connects with --ray-address. Without Ray
installed these tests are skipped, except the one checking the error that names the extra.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from pipelines.ingest import ingest
from warehouse import Warehouse

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
# The driver dies (os._exit, as kill -9 leaves it) right after this many Delta writes.
DIE_AFTER_WRITE = 7
KILLED_INGEST = textwrap.dedent(
    """
    import os, sys
    import warehouse.writer as store

    real, calls = store.write_deltalake, [0]

    def write_then_maybe_die(*args, **kwargs):
        real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            os._exit(137)

    store.write_deltalake = write_then_maybe_die
    from pipelines.cli import cli
    cli(sys.argv[2:], prog_name="ew", standalone_mode=False)
    """
)


@pytest.fixture(scope="module")
def ray_address():
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'ew[ray]'")
    from pipelines.ray_engine import local_cluster

    with local_cluster(num_cpus=2) as address:
        yield address


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_bert_dir, labelled_corpus):
    """The labelled corpus ingested locally (the reference), in 3 chunks."""
    wh = Warehouse.open(tmp_path_factory.mktemp("local") / "wh", create=True)
    result = ingest(wh, labelled_corpus, model=str(tiny_bert_dir), chunk_size=100)
    return wh, result


def _ray_ingest(wh_root: Path, corpus: Path, model: Path, address: str, *more: str) -> dict:
    result = CliRunner().invoke(cli, ["-w", str(wh_root), "ingest", str(corpus), "--model", str(model),
                                      "--engine", "ray", "--ray-address", address, "--json", *more])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _rows(wh: Warehouse, sql: str) -> list[dict]:
    return wh.query(sql).read_all().to_pylist()


def _vectors(wh: Warehouse) -> dict[tuple[str, int], np.ndarray]:
    rows = _rows(wh, "select doc_hash, layer, embedding from embeddings")
    return {(row["doc_hash"], row["layer"]): np.asarray(row["embedding"]) for row in rows}


def _documents(wh: Warehouse) -> list[dict]:
    return _rows(wh, "select * exclude (ingested_at) from documents order by corpus, id")


def _same_vectors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key, vector in left.items():
        other = right[key]
        cosine = float(vector @ other / (np.linalg.norm(vector) * np.linalg.norm(other)))
        assert cosine >= 0.99999, key


def test_ray_ingest_equals_local_ingest_and_a_rerun_embeds_nothing(ray_address, local, tiny_bert_dir,
                                                                   labelled_corpus, tmp_path):
    wh_local, expected = local
    summary = _ray_ingest(tmp_path / "wh", labelled_corpus, tiny_bert_dir, ray_address, "--chunk-size", "100")
    wh = Warehouse.open(tmp_path / "wh")
    counted = ("corpus", "model", "layers", "read", "new_documents", "updated_documents", "embedded", "reused",
               "duplicates", "rejected", "truncated", "duplicate_ids", "recovered", "version")
    assert {k: summary[k] for k in counted} == {k: expected.to_dict()[k] for k in counted}
    assert _documents(wh) == _documents(wh_local)
    _same_vectors(_vectors(wh), _vectors(wh_local))
    assert [entry.detail for entry in wh.log()] == [entry.detail for entry in wh_local.log()]

    again = _ray_ingest(tmp_path / "wh", labelled_corpus, tiny_bert_dir, ray_address)
    assert (again["embedded"], again["reused"], again["new_documents"]) == (0, expected.embedded, 0)
    assert again["version"] == summary["version"]


def test_a_driver_killed_mid_ingest_leaves_a_readable_warehouse_and_the_rerun_completes(
        ray_address, local, tiny_bert_dir, labelled_corpus, tmp_path):
    wh_local, expected = local
    root = tmp_path / "wh"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_INGEST, str(DIE_AFTER_WRITE), "-w", str(root), "ingest", str(labelled_corpus),
         "--model", str(tiny_bert_dir), "--engine", "ray", "--ray-address", ray_address, "--chunk-size", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert killed.returncode == 137, killed.stderr[-2000:]
    wh = Warehouse.open(root)
    stored = _rows(wh, "select count(*) as n from documents")[0]["n"]
    assert 0 < stored < expected.new_documents  # it died part way, and what it committed reads

    rerun = _ray_ingest(root, labelled_corpus, tiny_bert_dir, ray_address, "--chunk-size", "40")
    assert rerun["recovered"] > 0  # the chunk written but not committed when it died, adopted
    keys = _rows(wh, "select count(*) as n, count(distinct (doc_hash, layer)) as distinct_keys from embeddings")[0]
    assert keys["n"] == keys["distinct_keys"]
    assert _documents(wh) == _documents(wh_local)
    _same_vectors(_vectors(wh), _vectors(wh_local))


def test_read_delta_reads_one_model_layer_of_the_embeddings_table(ray_address, local):
    """The README's recipe: Ray Data reads the table itself, pinned to the Delta version ew's log names."""
    import pyarrow.compute as pc
    import ray

    wh, result = local
    pins = wh.log()[-1].pins
    ray.init(address=ray_address, log_to_driver=False)
    try:
        dataset = ray.data.read_delta(str(wh.root / "embeddings"), version=pins["embeddings"],
                                      columns=["doc_hash", "embedding"],
                                      filter=(pc.field("model") == result.model) & (pc.field("layer") == 2))
        assert dataset.count() == result.embedded
        first = dataset.take(1)[0]
        assert len(first["embedding"]) == 32
    finally:
        ray.shutdown()


def test_the_ray_engine_without_ray_names_the_extra(monkeypatch, tmp_path, labelled_corpus):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = CliRunner().invoke(cli, ["-w", str(tmp_path / "wh"), "ingest", str(labelled_corpus), "--engine", "ray"])
    assert result.exit_code == 1
    assert result.stderr == "Error: --engine ray needs Ray Data, which is not installed: pip install 'ew[ray]'\n"


def test_ray_address_without_the_ray_engine_is_refused(tmp_path, labelled_corpus):
    result = CliRunner().invoke(cli, ["-w", str(tmp_path / "wh"), "ingest", str(labelled_corpus),
                                      "--ray-address", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.stderr == "Error: --ray-address is only used with --engine ray\n"


def test_workers_get_the_drivers_code_only_when_theirs_differs(ray_address, monkeypatch):
    import ray

    from pipelines import ray_engine

    ray.init(address=ray_address, log_to_driver=False)
    try:
        assert ray_engine.code_environment(ray) is None  # the cluster runs this very installation
        # a worker whose ew differs: the probe it runs reports other sources
        monkeypatch.setattr(ray_engine, "_by_value", lambda function: lambda: "an older ew's sources")
        shipped = ray_engine.code_environment(ray)
    finally:
        ray.shutdown()
    import pipelines
    import warehouse

    assert shipped == {"py_modules": [pipelines, warehouse]}


def _states(wh: Warehouse) -> dict[str, np.ndarray]:
    rows = _rows(wh, "select doc_hash, n_tokens, states from token_states")
    return {row["doc_hash"]: np.frombuffer(row["states"], "<f2").reshape(row["n_tokens"], -1) for row in rows}


def test_token_states_cached_through_ray_equal_local_ones(ray_address, tiny_bert_dir, labelled_corpus, tmp_path):
    local_wh = Warehouse.open(tmp_path / "local", create=True)
    expected = ingest(local_wh, labelled_corpus, model=str(tiny_bert_dir), token_states=1)
    summary = _ray_ingest(tmp_path / "wh", labelled_corpus, tiny_bert_dir, ray_address, "--token-states", "1")
    counted = ("embedded", "reused", "states_cached", "states_bytes", "version")
    assert {k: summary[k] for k in counted} == {k: expected.to_dict()[k] for k in counted}
    wh = Warehouse.open(tmp_path / "wh")
    _same_vectors(_vectors(wh), _vectors(local_wh))
    got, want = _states(wh), _states(local_wh)
    assert got.keys() == want.keys()
    for key, states in want.items():
        np.testing.assert_allclose(got[key].astype(np.float32), states.astype(np.float32), atol=2e-3)

    again = _ray_ingest(tmp_path / "wh", labelled_corpus, tiny_bert_dir, ray_address, "--token-states", "1")
    assert (again["states_cached"], again["embedded"]) == (0, 0)
