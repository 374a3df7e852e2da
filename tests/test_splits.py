from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest

from warehouse.tables import vector_column
from warehouse import EwError, SelectionError, Warehouse
from warehouse.keys import doc_hash
from warehouse.selection import DocumentFilter
from warehouse.splits import LabelledVectors, SplitSpec

DIM = 8


def every_third(i):
    return f"class{i % 3}"


def add(wh, start, stop, *, label="topic", labeller=every_third):
    texts = [f"document number {i}" for i in range(start, stop)]
    hashes = [doc_hash(t) for t in texts]
    rng = np.random.default_rng(start)
    with wh.writer() as w:
        w.upsert_documents(
            pa.table(
                {
                    "corpus": ["c"] * len(texts),
                    "id": [str(i) for i in range(start, stop)],
                    "doc_hash": hashes,
                    "text": texts,
                    "record_hash": hashes,
                    label: [None if i % 10 == 0 else labeller(i) for i in range(start, stop)],
                }
            )
        )
        w.append_embeddings(
            pa.table(
                {
                    "doc_hash": hashes,
                    "model": ["m-000000000000"] * len(texts),
                    "layer": pa.array([2] * len(texts), pa.int32()),
                    "pooling": ["mean"] * len(texts),
                    "embedding": vector_column(rng.normal(size=(len(texts), DIM)).astype(np.float32)),
                }
            )
        )
        w.commit("ingest")


@pytest.fixture
def wh(tmp_path):
    wh = Warehouse.open(tmp_path / "wh", create=True)
    add(wh, 0, 300)
    return wh


@contextmanager
def assembled(wh, label="topic", **options):
    """(data, stats) of the labelled vectors of the fixture's model, layer 2."""
    with LabelledVectors(wh, model="m-000000000000", layer=2, pooling="mean", documents=DocumentFilter(label=label),
                         **options) as data:
        yield data, data.assemble()


def splits_of(wh, **options):
    with assembled(wh, **options) as (data, stats):
        return {split: {h for _, _, keys in data.keyed_batches(split, batch_size=50) for h in keys} for split in ("train", "val", "test")}, stats.counts


def test_split_is_a_function_of_doc_hash_and_seed(wh):
    spec = SplitSpec()
    splits, counts = splits_of(wh)
    for split, hashes in splits.items():
        assert all(spec.split_of(h) == split for h in hashes)
    assert sum(counts.values()) == 270  # every tenth document has no label
    assert 0.7 < counts["train"] / 270 < 0.9


def test_no_document_changes_split_when_the_warehouse_grows(wh):
    before, _ = splits_of(wh)
    add(wh, 300, 900)
    after, counts = splits_of(wh)
    for split in before:
        assert before[split] <= after[split]
    assert sum(counts.values()) == 810
    old, _ = splits_of(wh, version=0)
    assert old == before


def test_another_seed_gives_another_split(wh):
    first, _ = splits_of(wh)
    second, _ = splits_of(wh, spec=SplitSpec(seed=1))
    assert first != second


@pytest.mark.parametrize("pile_rows", [8192, 32])
def test_epochs_are_shuffled_reproducibly(wh, pile_rows):
    with assembled(wh, pile_rows=pile_rows) as (data, stats):
        one = np.concatenate([x for x, _ in data.batches("train", batch_size=16, epoch=1)])
        again = np.concatenate([x for x, _ in data.batches("train", batch_size=16, epoch=1)])
        two = np.concatenate([x for x, _ in data.batches("train", batch_size=16, epoch=2)])
        assert one.shape == (stats.counts["train"], DIM) and one.dtype == np.float32
        assert np.array_equal(one, again)
        assert not np.array_equal(one, two)
        assert np.allclose(np.sort(one, axis=0), np.sort(two, axis=0))
        assert stats.classes == ("class0", "class1", "class2")
        assert stats.missing_label == 30


def test_a_fresh_copy_gives_the_same_epochs(wh):
    add(wh, 300, 600)  # vectors in two files: rows reach DuckDB's join in no fixed order

    def epoch():
        with assembled(wh, pile_rows=32, threads=2) as (data, _):
            return [(x.copy(), y.copy()) for x, y in data.batches("train", batch_size=16, epoch=3)]

    first, second = epoch(), epoch()
    assert len(first) == len(second) > 10
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, second))


def test_a_corpus_ingested_in_label_order_still_gives_mixed_batches(tmp_path):
    wh = Warehouse.open(tmp_path / "wh", create=True)
    add(wh, 0, 900, labeller=lambda i: f"class{i // 300}")  # 300 of class0, then class1, then class2
    with assembled(wh, pile_rows=64) as (data, stats):
        assert stats.piles["train"] == -(-stats.counts["train"] // 64) > 1
        batches = [y for _, y in data.batches("train", batch_size=32, epoch=1)]
        labels = np.concatenate(batches)
        assert len(labels) == stats.counts["train"]
        assert np.array_equal(np.bincount(labels), np.bincount(np.concatenate([y for _, y in data.batches("train", batch_size=500)])))
        # Every full batch mixes the classes, and the epoch does not start with the first class.
        assert all(len(set(y.tolist())) > 1 for y in batches if len(y) == 32)
        assert set(batches[0].tolist()) != {0}


def test_unknown_label_lists_the_usable_fields(wh):
    with pytest.raises(SelectionError, match="no label column 'sentiment'; fields you can use: topic"):
        LabelledVectors(wh, model="m-000000000000", layer=2, pooling="mean", documents=DocumentFilter(label="sentiment"))


def test_bad_split_spec():
    with pytest.raises(EwError, match="add up to 100"):
        SplitSpec.parse("80,10,5")
    with pytest.raises(EwError, match="look like 80,10,10"):
        SplitSpec.parse("80/20")
