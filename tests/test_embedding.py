"""The embedding service (pipelines/embedding.py): plans, encodes and writes vectors and token states once."""
import shutil

import pyarrow as pa
import pytest

from pipelines.embedding import EmbeddingService, TokenStates, embed_missing
from pipelines.ingest import ingest
from pipelines.registry import open_model, prepare_states
from warehouse import EwError, Warehouse
from warehouse.keys import doc_hash

TEXTS = ["the game data", "a python library", "text model file", "the warehouse layer tool"]


def count(wh, sql):
    return wh.query(sql).read_all().column(0).to_pylist()[0]


@pytest.fixture(scope="module")
def vectors_only(tmp_path_factory, tiny_bert_dir):
    """A warehouse holding every layer's vectors of the first two TEXTS, and the layer-1 states graph."""
    root = tmp_path_factory.mktemp("service")
    wh = Warehouse.open(root / "wh", create=True)
    corpus = root / "c.jsonl"
    corpus.write_text("".join(f'{{"id": "{i}", "text": "{text}"}}\n' for i, text in enumerate(TEXTS[:2])))
    model = ingest(wh, corpus, model=str(tiny_bert_dir)).model
    with wh.writer() as writer:
        prepare_states(writer, open_model(wh, model), layer=1, name=str(tiny_bert_dir))
    return wh, model


@pytest.fixture
def wh_with_vectors(tmp_path, vectors_only):
    """A private copy of ``vectors_only``, for tests that write."""
    wh, model = vectors_only
    shutil.copytree(wh.root, tmp_path / "wh")
    return Warehouse.open(tmp_path / "wh"), model


def test_the_plan_sends_stored_vectors_to_states_only(wh_with_vectors):
    wh, model = wh_with_vectors
    keys = [doc_hash(text) for text in TEXTS]
    with wh.writer() as writer:
        service = EmbeddingService(writer, open_model(wh, model), layers=[0, 1, 2], states=TokenStates(1, "fp32"))
        assert service.plan.missing(keys) == [[], [], [0, 1, 2], [0, 1, 2]]
        assert service.plan.lacks_states(keys) == [True] * 4
        result = service.embed(keys, TEXTS)
        assert (result.embedded, result.reused, result.states_cached, result.encoded) == (2, 2, 4, 4)
        assert result.rows.num_rows == 2 * 3 and result.states.num_rows == 4
        assert result.states_bytes == sum(n * 32 * 4 for n in result.states.column("n_tokens").to_pylist())
        again = service.embed(keys, TEXTS)  # the plan counts this run's keys as stored
        assert (again.embedded, again.states_cached, again.encoded, again.states.num_rows) == (0, 0, 0, 0)
        service.write_states(result.states)
        service.write(result.rows)
        writer.commit("embed")
    with wh.writer() as writer:  # a new plan reads what was committed
        fresh = EmbeddingService(writer, open_model(wh, model), layers=[0, 1, 2], states=TokenStates(1, "fp32"))
        assert fresh.plan.lacks_states(keys) == [False] * 4
        other = EmbeddingService(writer, open_model(wh, model), layers=[2], states=TokenStates(1, "fp16"))
        assert other.plan.lacks_states(keys) == [True] * 4  # another precision is another cache


def test_the_service_bounds_the_heap_when_it_starts_the_encoder_and_not_before(wh_with_vectors, monkeypatch):
    wh, model = wh_with_vectors
    calls = []
    monkeypatch.setattr("pipelines.embedding.bound_heap", lambda: calls.append(1) or True)
    with wh.writer() as writer:
        service = EmbeddingService(writer, open_model(wh, model), layers=[2])
        service.embed([doc_hash(t) for t in TEXTS[:2]], TEXTS[:2])  # stored already: no encoder, heap untouched
        assert calls == []
        service.embed([doc_hash(TEXTS[2])], TEXTS[2:3])
        service.embed([doc_hash(TEXTS[3])], TEXTS[3:])
        assert calls == [1]  # once, before the encoder's first batch


def test_a_service_without_states_plans_no_states(wh_with_vectors):
    wh, model = wh_with_vectors
    with wh.writer() as writer:
        service = EmbeddingService(writer, open_model(wh, model), layers=[2])
        assert service.plan.lacks_states([doc_hash(TEXTS[0])]) == [False]
        result = service.embed([doc_hash(t) for t in TEXTS], TEXTS)
        assert (result.embedded, result.states_cached, result.states.num_rows) == (2, 0, 0)


def test_embed_missing_stores_states_and_vectors_in_one_version(wh_with_vectors):
    wh, model = wh_with_vectors
    batch = pa.record_batch({"doc_hash": [doc_hash(t) for t in TEXTS], "text": TEXTS})
    before = wh.latest_version()
    with wh.writer() as writer:
        summary = embed_missing(writer, [batch], model=open_model(wh, model), layers=[2], states=TokenStates(1))
    assert (summary.embedded, summary.reused, summary.states_cached) == (2, 2, 4)
    assert wh.latest_version() == before + 1
    assert count(wh, "select count(*) from token_states where precision = 'fp16'") == 4
    with wh.writer() as writer:
        rerun = embed_missing(writer, [batch], model=open_model(wh, model), layers=[2], states=TokenStates(1))
    assert (rerun.embedded, rerun.states_cached, wh.latest_version()) == (0, 0, before + 1)


def test_an_unknown_precision_is_refused():
    with pytest.raises(EwError, match=r"--state-precision: 'fp8' is not supported; use fp16 or fp32"):
        TokenStates(1, "fp8")


def _write_keys(wh, keys, *, model, layer, pooling="mean"):
    from warehouse.tables import vector_column
    import numpy as np

    n = len(keys)
    with wh.writer() as writer:
        writer.append_embeddings(pa.table({
            "doc_hash": keys, "model": [model] * n, "layer": pa.array([layer] * n, pa.int32()),
            "pooling": [pooling] * n, "embedding": vector_column(np.zeros((n, 2), np.float32)),
        }))
        writer.commit("keys")


def test_the_plan_reads_only_its_model_pooling_and_layers_keys_chunk_by_chunk(tmp_path):
    from pipelines.embedding import Plan
    from warehouse.tables import EMBEDDINGS

    wh = Warehouse.open(tmp_path / "wh", create=True)
    keys = [doc_hash(str(i)) for i in range(6)]
    _write_keys(wh, keys[:2], model="m", layer=0)
    _write_keys(wh, keys[:1], model="m", layer=1)
    _write_keys(wh, keys[2:4], model="other", layer=0)             # another model's keys
    _write_keys(wh, keys[4:], model="m", layer=0, pooling="cls")   # another pooling's
    _write_keys(wh, keys[1:2], model="m", layer=5)                 # a layer not wanted
    plan = Plan(wh.current_dataset(EMBEDDINGS), model="m", pooling="mean", layers=[0, 1])
    assert plan.missing(keys) == [[], [1], [0, 1], [0, 1], [0, 1], [0, 1]]
    assert plan.missing([keys[2]]) == [[0, 1]] and plan.missing([]) == []
    plan.add(keys[2:3], [[0, 1]])  # this run's keys count as stored, and only for their layers
    plan.add(keys[1:2], [[1]])
    assert plan.missing(keys) == [[], [], [], [0, 1], [0, 1], [0, 1]]
    _write_keys(wh, keys[3:4], model="m", layer=0)  # committed after the plan opened: not seen, it is pinned
    assert plan.missing(keys[3:4]) == [[0, 1]]
    assert plan.lacks_states(keys) == [False] * 6  # no states asked
