from collections import Counter
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest

from warehouse import EwError, Warehouse
from warehouse.keys import doc_hash
from warehouse.selection import DocumentFilter, missing_states
from warehouse.splits import SPLITS, SplitSpec
from warehouse.states import LabelledStates
from warehouse.tables import STATE_DTYPES, states_column

DIM = 4
MODEL = "m-000000000000"
LAYER = 2


def label_of(i):
    return None if i % 10 == 0 else f"class{i % 3}"


def has_states(i):
    return i % 7 != 3


def n_tokens_of(i):
    return 1 + (i * 7919) % 23


def text_of(i):
    return f"document number {i}"


def add(wh, start, stop, *, fp32_below=150, twin=None):
    """Documents start..stop (every tenth unlabelled), fp16 states for most, fp32 ones for i < fp32_below.

    ``twin``: one more record with the text of document ``twin`` and another label.
    """
    ids = list(range(start, stop))
    texts = [text_of(i) for i in ids]
    labels = [label_of(i) for i in ids]
    if twin is not None:
        ids, texts, labels = ids + [f"twin{twin}"], texts + [text_of(twin)], labels + ["class9"]
    hashes = [doc_hash(t) for t in texts]
    with wh.writer() as w:
        w.upsert_documents(pa.table({
            "corpus": ["c"] * len(texts), "id": [str(i) for i in ids], "doc_hash": hashes, "text": texts,
            "record_hash": [doc_hash(f"{i}") for i in ids], "topic": labels,
        }))
        for precision in STATE_DTYPES:
            cached = [i for i in range(start, stop) if has_states(i) and (precision == "fp16" or i < fp32_below)]
            matrices = [matrix_of(i) for i in cached]
            w.append_token_states(pa.table({
                "doc_hash": [doc_hash(text_of(i)) for i in cached],
                "model": [MODEL] * len(cached),
                "layer": pa.array([LAYER] * len(cached), pa.int32()),
                "precision": [precision] * len(cached),
                "n_tokens": pa.array([m.shape[0] for m in matrices], pa.int32()),
                "dim": pa.array([DIM] * len(cached), pa.int32()),
                "states": states_column(matrices, precision),
            }))
        w.commit("ingest")


def matrix_of(i):
    return np.random.default_rng(i).normal(size=(n_tokens_of(i), DIM)).astype(np.float32)


def stored(i, precision):
    """The matrix as the cache gives it back: fp16 values rounded once."""
    return matrix_of(i).astype(STATE_DTYPES[precision]).astype(np.float32)


def expected_rows(start, stop, precision="fp16", fp32_below=150, twin=None):
    """(doc index, label) of every training row."""
    rows = [(i, label_of(i)) for i in range(start, stop)
            if label_of(i) is not None and has_states(i) and (precision == "fp16" or i < fp32_below)]
    if twin is not None and has_states(twin):
        rows.append((twin, "class9"))
    return rows


@pytest.fixture
def wh(tmp_path):
    wh = Warehouse.open(tmp_path / "wh", create=True)
    add(wh, 0, 300, twin=4)
    return wh


@contextmanager
def assembled(wh, precision="fp16", **options):
    options.setdefault("window_rows", 32)
    with LabelledStates(wh, model=MODEL, layer=LAYER, precision=precision, documents=DocumentFilter(label="topic"),
                        **options) as data:
        yield data, data.assemble()


def keyed_rows(data, split, batch_size=8):
    """(doc_hash, y, states (n, D), n_tokens) of every row of ``split``, as keyed_batches gives them."""
    rows = []
    for (states, mask), y, hashes in data.keyed_batches(split, batch_size=batch_size):
        for b, h in enumerate(hashes):
            n = int(mask[b].sum())
            rows.append((h, int(y[b]), states[b, :n], n))
    return rows


def test_splits_follow_split_of_and_stats_count_rows(wh):
    with assembled(wh) as (data, stats):
        expected = expected_rows(0, 300, twin=4)
        spec = SplitSpec()
        assert stats.classes == ("class0", "class1", "class2", "class9")
        assert stats.dim == DIM and stats.version == 0
        assert stats.documents == len({i for i, _ in expected})
        assert stats.missing_label == 30
        assert stats.no_states == len({i for i in range(300) if label_of(i) and not has_states(i)})
        assert stats.rare_classes == ("class9",)
        for split in SPLITS:
            rows = keyed_rows(data, split)
            assert all(spec.split_of(h) == split for h, *_ in rows)
            mine = [(i, label) for i, label in expected if spec.split_of(doc_hash(text_of(i))) == split]
            assert stats.counts[split] == len(rows) == len(mine)
            assert stats.tokens[split] == sum(n_tokens_of(i) for i, _ in mine)
            assert stats.bytes[split] == stats.tokens[split] * DIM * 2
            assert data.steps(split, batch_size=8) == -(-len(mine) // 8)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_every_row_comes_once_with_its_label_and_states(wh, precision):
    with assembled(wh, precision=precision) as (data, stats):
        by_hash = {doc_hash(text_of(i)): i for i in range(300)}
        seen = Counter()
        for split in SPLITS:
            for h, y, states, n in keyed_rows(data, split):
                i = by_hash[h]
                label = "class9" if y == stats.classes.index("class9") else label_of(i)
                assert stats.classes[y] == label
                assert states.dtype == np.float32 and np.array_equal(states, stored(i, precision))
                seen[(i, label)] += 1
        assert seen == Counter(expected_rows(0, 300, precision=precision, twin=4))
        assert seen[(4, "class9")] == seen[(4, label_of(4))] == 1  # one text, two labels: two rows

        expected = sorted((stats.classes.index(label), stored(i, precision).tobytes())
                          for i, label in expected_rows(0, 300, precision=precision, twin=4)
                          if SplitSpec().split_of(doc_hash(text_of(i))) == "train")
        got = []
        for (states, mask), y in data.batches("train", batch_size=8, epoch=1):
            assert states.dtype == np.float32 and mask.dtype == np.int64 and y.dtype == np.int64
            got.extend((int(y[b]), states[b, : int(mask[b].sum())].tobytes()) for b in range(len(y)))
        assert sorted(got) == expected


def test_batches_are_padded_to_their_longest_and_sorted_by_length_within_a_window(wh):
    with assembled(wh, window_rows=32) as (data, stats):
        batches = list(data.keyed_batches("train", batch_size=8))
        for (states, mask), y, _ in batches:
            lengths = mask.sum(axis=1)
            assert states.shape == (len(y), lengths.max(), DIM)
            assert np.array_equal(mask, (np.arange(mask.shape[1]) < lengths[:, None]).astype(np.int64))
            assert not states[mask == 0].any()  # padding is zeros
        # A window is 32 rows, 4 batches of 8 in increasing length.
        for first in range(0, len(batches), 4):
            window = [batch[0][1].sum(axis=1) for batch in batches[first : first + 4]]
            assert all(window[k].max() <= window[k + 1].min() for k in range(len(window) - 1))


@pytest.mark.parametrize("batch_size", [1, 5, 8, 50])
def test_an_epoch_has_steps_batches_and_only_the_last_is_smaller(wh, batch_size):
    with assembled(wh, window_rows=32) as (data, stats):
        sizes = [len(y) for _, y in data.batches("train", batch_size=batch_size, epoch=2)]
        keyed = [len(y) for _, y, _ in data.keyed_batches("train", batch_size=batch_size)]
        assert len(sizes) == len(keyed) == data.steps("train", batch_size=batch_size)
        assert sum(sizes) == sum(keyed) == stats.counts["train"]
        assert sorted(sizes)[1:] == [batch_size] * (len(sizes) - 1)  # one batch, anywhere in the epoch, is short
        assert keyed[:-1] == [batch_size] * (len(keyed) - 1)


def test_epochs_are_shuffled_reproducibly(wh):
    add(wh, 300, 600)  # more files, more row groups to order

    def epoch(number):
        with assembled(wh) as (data, _):
            return [(states.copy(), mask.copy(), y.copy()) for (states, mask), y in
                    data.batches("train", batch_size=8, epoch=number)]

    one, again, two = epoch(1), epoch(1), epoch(2)
    assert len(one) == len(again) == len(two) > 10
    assert all(all(np.array_equal(a, b) for a, b in zip(x, z)) for x, z in zip(one, again))
    assert [y.tolist() for *_, y in one] != [y.tolist() for *_, y in two]
    assert sorted(np.concatenate([y for *_, y in one]).tolist()) == sorted(np.concatenate([y for *_, y in two]).tolist())


def test_precision_counts_documents_cached_in_the_other_one_as_without_states(wh):
    with assembled(wh, precision="fp32") as (_, fp32), assembled(wh) as (_, fp16):
        assert sum(fp32.counts.values()) == len(expected_rows(0, 300, precision="fp32", twin=4))
        assert fp32.no_states == fp16.no_states + len({i for i in range(150, 300) if label_of(i) and has_states(i)})
        assert fp32.bytes["train"] == fp32.tokens["train"] * DIM * 4


def test_a_pinned_version_sees_only_its_rows(wh):
    add(wh, 300, 500)
    with assembled(wh, version=0) as (data, old), assembled(wh) as (_, new):
        assert sum(old.counts.values()) == len(expected_rows(0, 300, twin=4))
        assert sum(new.counts.values()) == len(expected_rows(0, 500, twin=4))
        assert sum(len(keyed_rows(data, split)) for split in SPLITS) == sum(old.counts.values())


def test_missing_states_finds_exactly_the_documents_without_states(wh):
    datasets = wh.datasets(wh.snapshot())

    def missing(precision, **options):
        batches = missing_states(datasets, documents=DocumentFilter(label="topic"), model=MODEL, layer=LAYER,
                                 precision=precision, **options)
        return {h: text for batch in batches for h, text in zip(*(batch.column(c).to_pylist() for c in batch.schema.names))} \
            if not options.get("probe") else [row for batch in batches for row in batch.to_pylist()]

    labelled = {i for i in range(300) if label_of(i)}
    assert missing("fp16") == {doc_hash(text_of(i)): text_of(i) for i in labelled if not has_states(i)}
    assert set(missing("fp32")) == {doc_hash(text_of(i)) for i in labelled if not has_states(i) or i >= 150}
    assert len(missing("fp16", probe=True)) == 1
    other = missing_states(datasets, documents=DocumentFilter(), model=MODEL, layer=LAYER + 1, precision="fp16")
    assert sum(batch.num_rows for batch in other) == 300  # another layer: nothing cached


def test_misuse_says_what_to_do(wh):
    with pytest.raises(EwError, match="unknown state precision 'bf16'; one of fp16, fp32"):
        LabelledStates(wh, model=MODEL, layer=LAYER, precision="bf16", documents=DocumentFilter(label="topic"))
    with pytest.raises(EwError, match="need a label"):
        LabelledStates(wh, model=MODEL, layer=LAYER, precision="fp16", documents=DocumentFilter())
    with LabelledStates(wh, model=MODEL, layer=LAYER, precision="fp16", documents=DocumentFilter(label="topic")) as data:
        with pytest.raises(EwError, match=r"assemble\(\) must run"):
            next(data.batches("train", batch_size=4))
        data.assemble()
        with pytest.raises(EwError, match="unknown split 'dev'"):
            next(data.batches("dev", batch_size=4))


def test_a_split_without_rows_gives_no_batches(tmp_path):
    wh = Warehouse.open(tmp_path / "wh", create=True)
    add(wh, 0, 3)
    with assembled(wh, spec=SplitSpec(train=100, val=0, test=0)) as (data, stats):
        assert stats.counts["val"] == 0 and list(data.batches("val", batch_size=4, epoch=1)) == []
        assert data.steps("val", batch_size=4) == 0
