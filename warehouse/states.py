"""Labelled token states, split like :class:`~warehouse.splits.LabelledVectors`, streamed in length-bucketed batches.

The rows are the same as LabelledVectors' (distinct (doc_hash, label) pairs with a non-null
label, split by :meth:`SplitSpec.split_of`, ``y`` indexing the sorted classes), taken from the
``token_states`` rows of one model / layer / precision instead of the pooled vectors.

Only narrow columns go through DuckDB (labels, splits, which documents have states, their
token counts). The states themselves are read straight from the pinned Parquet files, one row
group at a time: the rows of the wanted split are looked up by doc_hash in a sorted array of
that split's keys and copied out of the row group into a window of ``window_rows`` rows. Each
window is sorted by token count and cut into batches padded only to their own longest
document, so a batch of short texts costs little. An epoch visits the row groups in a seeded
random order, breaks ties in token count at random and shuffles each window's batches.

    with LabelledStates(wh, model=key, layer=4, precision="fp16", documents=DocumentFilter(label="section")) as data:
        stats = data.assemble()
        steps = data.steps("train", batch_size=32)
        for (states, mask), y in data.batches("train", batch_size=32, epoch=1): ...  # (B, T, D), (B, T), (B,)
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .errors import EwError, QueryError, StorageError, first_line
from .query import connect, sql_error_message
from .selection import INTERNAL_MEMORY_LIMIT, DocumentFilter, create_labelled
from .splits import SPLITS, SplitSpec
from .tables import DOCUMENTS, STATE_DTYPES, TOKEN_STATES
from .versions import Snapshot

if TYPE_CHECKING:
    from .store import Warehouse

# Rows gathered before sorting by length: ~140 MB of MiniLM fp16 states (~70 KB a document).
# More rows pad less (closer lengths share a batch), fewer hold less.
WINDOW_ROWS = 2048
NARROW = ["doc_hash", "precision", "n_tokens", "dim"]

Batch = tuple[tuple[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class StatesStats:
    """What :meth:`LabelledStates.assemble` found."""

    version: int                    # the warehouse version read
    documents: int                  # distinct texts (doc_hash) among the rows
    classes: tuple[str, ...]        # label values, sorted; a row's y indexes this
    counts: dict[str, int]          # rows per split
    rare_classes: tuple[str, ...]   # classes too small to appear in every split
    missing_label: int              # documents of the filter whose label is null (left out)
    no_states: int                  # labelled texts without states of this model/layer/precision (left out)
    dim: int                        # hidden size of the states (0 when no row has states)
    tokens: dict[str, int]          # real tokens per split, summed over its rows
    bytes: dict[str, int]           # bytes of states per split, as stored (n_tokens x dim x 2 or 4)


@dataclass
class _Window:
    """Rows waiting to be batched: where each one's states are (piece, row in it) and its narrow columns."""

    pieces: dict[int, tuple[np.ndarray, np.ndarray]]  # piece id -> (offsets, bytes) of blobs copied from a row group
    piece: np.ndarray       # (n,) piece id of each row
    local: np.ndarray       # (n,) row within its piece
    n_tokens: np.ndarray    # (n,)
    y: np.ndarray           # (n,)
    doc_hash: np.ndarray    # (n,) fixed-width bytes

    def __len__(self) -> int:
        return len(self.y)

    def split_at(self, rows: int) -> tuple["_Window", "_Window"]:
        head, tail = (_Window({}, *(column[part] for column in self.columns)) for part in (slice(rows), slice(rows, None)))
        for part in (head, tail):
            part.pieces = {int(p): self.pieces[int(p)] for p in np.unique(part.piece)}
        return head, tail

    @property
    def columns(self) -> tuple[np.ndarray, ...]:
        return self.piece, self.local, self.n_tokens, self.y, self.doc_hash

    @classmethod
    def concat(cls, windows: list["_Window"]) -> "_Window":
        pieces = {key: value for window in windows for key, value in window.pieces.items()}
        return cls(pieces, *(np.concatenate(columns) for columns in zip(*(w.columns for w in windows))))


class LabelledStates:
    """The labelled token states of one model / layer / precision at one warehouse version, split by doc_hash.

    Memory is bounded by ``window_rows``, not by the table: at any time it holds one window of
    stored blobs (``window_rows`` rows plus at most one row group's worth carried over, each
    row ``n_tokens x dim x 2`` bytes for fp16), one Parquet row group as read (ingest writes
    256 rows a group), one decoded batch (``B x T x dim x 4`` bytes) and the keys of the split
    being read (a sorted array of ~80 bytes per row). Nothing is ever held for the whole table.

    Every window except the last holds a whole number of batches (``window_rows`` is rounded
    down to a multiple of ``batch_size``), so an epoch of a split has exactly
    ``ceil(count / batch_size)`` batches, its last one smaller: see :meth:`steps`.

    Reading any split reads the states column of every row group holding one of its rows, so a
    pass over val costs about the I/O of a pass over train (measured: 6,000 documents of
    ~110 x 384 fp16 tokens, 2 shared cores: 4.5 s an epoch, 60% of it Parquet reading and
    ZSTD, peak RSS 0.55 GB with window_rows=512). A stream holds a DuckDB cursor of its own, so
    it can run in a prefetch thread beside training.
    """

    def __init__(
        self,
        warehouse: "Warehouse",
        *,
        model: str,
        layer: int,
        precision: str,
        documents: DocumentFilter,
        spec: SplitSpec = SplitSpec(),
        version: int | None = None,
        memory_limit: str = INTERNAL_MEMORY_LIMIT,
        threads: int | None = None,
        window_rows: int = WINDOW_ROWS,
    ):
        if documents.label is None:
            raise EwError("labelled states need a label: DocumentFilter(label=...)")
        if precision not in STATE_DTYPES:
            raise EwError(f"unknown state precision {precision!r}; one of {', '.join(STATE_DTYPES)}")
        if window_rows < 1:
            raise EwError(f"window_rows must be at least 1, got {window_rows}")
        self.warehouse, self.model, self.layer, self.precision = warehouse, model, layer, precision
        self.documents, self.spec, self.window_rows = documents, spec, window_rows
        self.dtype = np.dtype(STATE_DTYPES[precision])
        self.snapshot: Snapshot = warehouse.snapshot(version)
        self.stats: StatesStats | None = None
        self._row_groups: list[tuple[pads.ParquetFileFragment, int]] = []
        datasets = warehouse.datasets(self.snapshot)
        documents.check(datasets[DOCUMENTS].schema.names)
        self._con = connect(datasets, memory_limit=memory_limit, threads=threads)

    def assemble(self) -> StatesStats:
        """Count the labelled rows, their splits and tokens, and list the row groups to read; call once, first."""
        try:
            self.stats = StatesStats(version=self.snapshot.version, **self._count())
            self._row_groups = self._list_row_groups()
        except duckdb.Error as error:
            self.close()
            raise QueryError(f"assembling the training data failed: {sql_error_message(error)}") from None
        except BaseException:
            self.close()
            raise
        return self.stats

    def steps(self, split: str, *, batch_size: int) -> int:
        """Batches in one epoch of ``split`` (every epoch has the same number)."""
        return math.ceil(self._require_stats().counts[self._check_split(split)] / batch_size)

    # -- building ------------------------------------------------------------------
    def _count(self) -> dict:
        """Narrow queries only (no states): labels, splits, classes, token counts, and the keys table."""
        con = self._con
        # n_tokens and dim only: the states column is never read here.
        missing_label, no_states = create_labelled(
            con, self.documents,
            present="(SELECT doc_hash, n_tokens, dim FROM token_states WHERE model = ? AND layer = ? AND precision = ?)",
            present_params=[self.model, self.layer, self.precision], split_sql=self.spec.sql("l.doc_hash"),
            columns=", p.n_tokens, p.dim",
        )
        dims = [row[0] for row in con.execute("SELECT DISTINCT dim FROM present ORDER BY dim").fetchall()]
        if len(dims) > 1:
            raise StorageError(
                f"token states of model {self.model} layer {self.layer} ({self.precision}) have widths "
                f"{', '.join(map(str, dims))}; the token_states table is inconsistent: run `ew verify --deep`"
            )
        documents = con.execute("SELECT count(DISTINCT doc_hash) FROM present").fetchone()[0]
        per_class: dict[str, dict[str, int]] = {}
        tokens = {s: 0 for s in SPLITS}
        for name, split, count, split_tokens in con.execute(
            "SELECT label, split, count(*), sum(n_tokens) FROM present GROUP BY ALL"
        ).fetchall():
            per_class.setdefault(name, {s: 0 for s in SPLITS})[split] = count
            tokens[split] += int(split_tokens)
        classes = sorted(per_class)
        counts = {s: sum(c[s] for c in per_class.values()) for s in SPLITS}
        dim = dims[0] if dims else 0
        con.register("ew_classes", pa.table({"label": classes, "y": np.arange(len(classes), dtype=np.int64)}))
        con.execute("CREATE TABLE keys AS SELECT p.doc_hash, p.split, c.y FROM present p JOIN ew_classes c USING (label)")
        con.unregister("ew_classes")
        con.execute("DROP TABLE present")
        return dict(
            documents=documents, classes=tuple(classes), counts=counts, missing_label=missing_label,
            no_states=no_states, rare_classes=tuple(name for name in classes if min(per_class[name].values()) == 0),
            dim=dim, tokens=tokens, bytes={s: tokens[s] * dim * self.dtype.itemsize for s in SPLITS},
        )

    def _list_row_groups(self) -> list[tuple[pads.ParquetFileFragment, int]]:
        """Every (file, row group) of the pinned token_states files of this model and layer, in log order."""
        dataset = self.warehouse.dataset(TOKEN_STATES, self.snapshot)
        groups = []
        for fragment in dataset.get_fragments(filter=(pc.field("model") == self.model) & (pc.field("layer") == self.layer)):
            with _parquet(fragment) as file:
                groups.extend((fragment, group) for group in range(file.num_row_groups))
        return groups

    def _split_keys(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct doc_hashes sorted, start of each one's labels in ``y`` (+ the end), y) of ``split``."""
        cursor = self._con.cursor()
        try:
            keys = cursor.sql("SELECT doc_hash, y FROM keys WHERE split = $split", params={"split": split}).to_arrow_table()
        finally:
            cursor.close()
        hashes = keys.column("doc_hash")
        width = max(1, int(pc.max(pc.binary_length(hashes)).as_py() or 0)) if len(hashes) else 1
        hashes, y = _fixed_width(hashes, width), keys.column("y").to_numpy()
        order = np.lexsort((y, hashes))  # NumPy's own byte order, which the lookups' searchsorted relies on
        hashes, y = hashes[order], y[order]
        first = np.ones(len(hashes), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        starts = np.append(np.flatnonzero(first), len(hashes))
        return hashes[first], starts, y

    # -- reading -------------------------------------------------------------------
    def batches(self, split: str, *, batch_size: int, epoch: int | None = None) -> Iterator[Batch]:
        """((states (B, T, D) float32, mask (B, T) int64), y (B,) int64) batches of ``split``; T is the batch's longest.

        With ``epoch``, a generator seeded with (split seed, epoch) orders the row groups, breaks
        ties in length and orders each window's batches: the same epoch always gives the same batches.
        """
        for inputs, y, _ in self._stream(split, batch_size=batch_size, epoch=epoch, keys=False):
            yield inputs, y

    def keyed_batches(self, split: str, *, batch_size: int) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], np.ndarray, list[str]]]:
        """Like :meth:`batches` without shuffling (row groups in file order), with the doc_hash of every row."""
        yield from self._stream(split, batch_size=batch_size, epoch=None, keys=True)

    def _stream(self, split: str, *, batch_size: int, epoch: int | None, keys: bool):
        self._check_split(split)
        stats = self._require_stats()
        if batch_size < 1:
            raise EwError(f"batch_size must be at least 1, got {batch_size}")
        if stats.counts[split] == 0:
            return
        window_size = batch_size * max(1, self.window_rows // batch_size)
        rng = None if epoch is None else np.random.default_rng([self.spec.seed, epoch])
        order = range(len(self._row_groups)) if rng is None else rng.permutation(len(self._row_groups))
        index = self._split_keys(split)
        pending: list[_Window] = []
        held = 0
        for number, position in enumerate(order):
            rows = self._read_rows(*self._row_groups[int(position)], index=index, piece=number)
            if rows is None:
                continue
            pending.append(rows)
            held += len(rows)
            while held >= window_size:
                window, rest = _Window.concat(pending).split_at(window_size)
                pending, held = [rest], len(rest)
                yield from self._window_batches(window, batch_size=batch_size, rng=rng, keys=keys)
        if held:
            yield from self._window_batches(_Window.concat(pending), batch_size=batch_size, rng=rng, keys=keys)

    def _read_rows(self, fragment: pads.ParquetFileFragment, group: int, *, index, piece: int) -> _Window | None:
        """The rows of one row group whose doc_hash is in the split (once per label), their blobs copied out."""
        unique, starts, ys = index
        with _parquet(fragment) as file:
            try:
                narrow = file.read_row_group(group, columns=NARROW)
                hashes = _fixed_width(narrow.column("doc_hash"), unique.dtype.itemsize)
                at = np.minimum(np.searchsorted(unique, hashes), len(unique) - 1)
                hit = unique[at] == hashes
                hit &= pc.equal(narrow.column("precision"), self.precision).fill_null(False).to_numpy(zero_copy_only=False)
                rows = np.flatnonzero(hit)
                if not len(rows):
                    return None
                # One row per (text, label): a text may carry several labels.
                labels = starts[at[rows] + 1] - starts[at[rows]]
                within = np.arange(labels.sum()) - np.repeat(np.cumsum(labels) - labels, labels)
                y = ys[np.repeat(starts[at[rows]], labels) + within]
                rows = np.repeat(rows, labels)
                # A copy of the wanted rows only: the row group's other rows are freed with it.
                blobs = file.read_row_group(group, columns=["states"]).column("states").take(pa.array(rows))
            except (OSError, pa.ArrowException) as error:
                raise _unreadable(fragment, error) from None
        blobs = blobs.combine_chunks()
        n_tokens = narrow.column("n_tokens").to_numpy(zero_copy_only=False)[rows].astype(np.int64)
        dims = narrow.column("dim").to_numpy(zero_copy_only=False)[rows]
        offsets = np.frombuffer(blobs.buffers()[1], np.int32)[blobs.offset : blobs.offset + len(blobs) + 1].astype(np.int64)
        data = np.frombuffer(blobs.buffers()[2], np.uint8) if blobs.buffers()[2] is not None else np.empty(0, np.uint8)
        expected = n_tokens * self._require_stats().dim * self.dtype.itemsize
        bad = np.flatnonzero((np.diff(offsets) != expected) | (dims != self._require_stats().dim))
        if len(bad):
            row = int(bad[0])
            raise StorageError(
                f"token_states row of doc_hash {hashes[rows[row]].decode()} (model {self.model}, layer {self.layer}) in "
                f"{fragment.path} holds {int(np.diff(offsets)[row])} bytes of width {int(dims[row])} where "
                f"{int(expected[row])} ({int(n_tokens[row])} tokens x {self._require_stats().dim} x {self.dtype.itemsize}) "
                "were expected; the token_states table is inconsistent: run `ew verify --deep`"
            )
        return _Window({piece: (offsets, data)}, np.full(len(rows), piece), np.arange(len(rows)), n_tokens, y,
                       hashes[rows])

    def _window_batches(self, window: _Window, *, batch_size: int, rng: np.random.Generator | None, keys: bool):
        if rng is None:
            order = np.argsort(window.n_tokens, kind="stable")
        else:
            shuffled = rng.permutation(len(window))  # ties in length fall in a new order every epoch
            order = shuffled[np.argsort(window.n_tokens[shuffled], kind="stable")]
        cuts = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        if rng is not None:
            cuts = [cuts[i] for i in rng.permutation(len(cuts))]
        for rows in cuts:
            inputs = self._decode(window, rows)
            yield inputs, window.y[rows], ([h.decode() for h in window.doc_hash[rows]] if keys else None)

    def _decode(self, window: _Window, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(states (B, T, D) float32 zero-padded, mask (B, T) int64) of some rows of a window."""
        n_tokens = window.n_tokens[rows]
        dim = self._require_stats().dim
        states = np.zeros((len(rows), int(n_tokens.max()), dim), dtype=np.float32)  # (B, T, D)
        for b, row in enumerate(rows):
            offsets, data = window.pieces[int(window.piece[row])]
            local = int(window.local[row])
            values = data[offsets[local] : offsets[local + 1]].view(self.dtype)
            states[b, : n_tokens[b]] = values.reshape(n_tokens[b], dim)
        mask = (np.arange(states.shape[1]) < n_tokens[:, None]).astype(np.int64)  # (B, T)
        return states, mask

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise EwError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
        return split

    def _require_stats(self) -> StatesStats:
        if self.stats is None:
            raise EwError("LabelledStates.assemble() must run before its batches are read")
        return self.stats

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "LabelledStates":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parquet(fragment: pads.ParquetFileFragment) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fragment.filesystem.open_input_file(fragment.path))
    except (OSError, pa.ArrowException) as error:
        raise _unreadable(fragment, error) from None


def _unreadable(fragment: pads.ParquetFileFragment, error: BaseException) -> StorageError:
    return StorageError(
        f"cannot read token states from {fragment.path} ({first_line(error)}); "
        "the token_states table is damaged: run `ew verify --deep`"
    )


def _fixed_width(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """Strings -> a NumPy ``S{width}`` array (zero-copy when all are ``width`` long); others become b"", matching no key."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    column = column.cast(pa.binary())
    lengths = pc.binary_length(column).to_numpy(zero_copy_only=False)
    if len(column) and column.null_count == 0 and (lengths == width).all():
        offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset : column.offset + len(column) + 1]
        return np.frombuffer(column.buffers()[2], f"S{width}", count=len(column), offset=int(offsets[0]))
    return np.array([v if v is not None and len(v) <= width else b"" for v in column.to_pylist()], dtype=f"S{width}")
