"""Run an exported encoder: `tokenizers` + onnxruntime, no torch.

An artifact directory (written by :func:`pipelines.export.export_model`) holds ``model.onnx``,
``tokenizer.json`` and ``model.json``. One ONNX call returns every layer's pooled vector, so a
document is encoded once whatever layer a head later trains on.

>>> encoder = Encoder.load(Path("artifacts/all-minilm-l6-v2-3f1c0b9e2d4a"))   # doctest: +SKIP
>>> encoder.encode(["a text", "another"]).vectors.shape                      # doctest: +SKIP
(2, 7, 384)
>>> encoder.encode_states(["a text"], layer=4).states[0].shape              # doctest: +SKIP
(4, 384)

Token states come from ``states-K.onnx`` (see :mod:`pipelines.artifacts`), a graph that returns
the same pooled vectors plus layer K's hidden state of every token.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from warehouse.errors import EwError
from warehouse.query import usable_cores

from .artifacts import CARD_FILE, INPUT_NAMES, MODEL_FILE, OUTPUT_NAME, STATES_OUTPUT, TOKENIZER_FILE, ModelCard, states_file
from .errors import ArtifactError


# A batch holds at most this many padded tokens (and at most ``batch_size`` texts). Measured on
# 2,000 Debian documents (2 cores, AVX-512), against 32 texts a batch: padding falls from 9% to
# 5%, ~15% more GFLOP per CPU-second (activations stay in cache), and onnxruntime's arena, which
# keeps the size of the largest batch it has seen, stays ~100 MB instead of ~450 MB after a
# batch of 32 texts of 256 tokens. 1,024 since batches run side by side (:data:`LANE_THREADS`):
# two batches of 2,048 held ~140 MB more RSS than one (3,000 Debian texts, every layer: 872 MB
# against 735 MB); two of 1,024 hold what one of 2,048 did (746 MB against 728 MB) and ran as fast.
BATCH_TOKENS = 1024


def length_batches(lengths: np.ndarray, *, batch_size: int, batch_tokens: int = BATCH_TOKENS) -> list[np.ndarray]:
    """Row indices of each batch: texts sorted longest first (ties in input order), each batch at most
    ``batch_size`` texts and at most ``batch_tokens`` padded tokens (a single text may exceed it).

    >>> [b.tolist() for b in length_batches(np.array([3, 9, 5, 9]), batch_size=8, batch_tokens=20)]
    [[1, 3], [2, 0]]
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)  # the longest text of the batch: it sets the padding
        size = min(batch_size, max(1, batch_tokens // width))
        batches.append(order[start : start + size])
        start += size
    return batches


@dataclass(frozen=True)
class EncodedBatch:
    vectors: np.ndarray  # (N, num_layers + 1, dim) float32, in input order
    truncated: np.ndarray  # (N,) bool: the text had more than max_length tokens


@dataclass(frozen=True)
class EncodedStates:
    vectors: np.ndarray  # (N, num_layers + 1, dim) float32, in input order, as :meth:`Encoder.encode` gives
    truncated: np.ndarray  # (N,) bool
    states: list[np.ndarray]  # N arrays (n_tokens_i, dim): layer K's states of each text's real tokens


def open_session(model_file: Path, *, threads: int) -> ort.InferenceSession:
    """An onnxruntime CPU session tuned for batch encoding; export verifies through this same call.

    ``threads`` is onnxruntime's intra-op pool. :class:`Encoder` opens its sessions with 1 and runs
    one batch per core at once (see :data:`LANE_THREADS`).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    # One graph branch at a time: the threads are better spent inside the big MatMuls.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning between ops: on a shared 2-core machine spinning cost
    # ~20% of the GFLOP per CPU-second (41 -> 51-55 without it), and it takes the core the commit
    # thread writes Delta files on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # onnxruntime's CPU arena stays on, with its memory patterns: it holds ~150 MB after a chunk's
    # longest batches, but without it every op's output is a fresh mmap (pipelines.memory maps
    # buffers over 1 MB) and encoding took 40% more CPU time (512 Debian texts, 1 thread: 13.8 ->
    # 19.4 s) for ~140 MB less RSS. Memory patterns off, or arena shrinkage after each run, left
    # the RSS within 15 MB of this (1,024 texts).
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


# Each batch runs on one onnxruntime thread, and the encoder runs `threads` batches at once (one
# session, concurrent run() calls, which onnxruntime allows; each releases the GIL). The intra-op
# pool splits every op, LayerNorm and GELU included, and waits for all its parts; whole batches
# need no such joins, so a core that is busy elsewhere (the commit thread writing Delta files,
# another process) stalls one batch instead of every op. Measured on 1,000 Debian texts, MiniLM,
# 2 cores (AVX-512), the same Encoder code either way: quiet machine 12.6-13.8 s against
# 13.1-14.8 s for one batch at a time on two intra-op threads; with a training run on the other
# core 24.2-26.0 s against 29.0-30.7 s (1.18x). The outputs are bit-for-bit the same.
LANE_THREADS = 1


class Encoder:
    """Tokenize and encode texts into every layer's pooled vector."""

    def __init__(self, path: Path, card: ModelCard, tokenizer: Tokenizer, session: ort.InferenceSession, *, threads: int):
        self.path = path
        self.card = card
        self.key = card.key
        self.dim = card.dim
        self.num_layers = card.num_layers
        self.max_length = card.max_length
        self.pooling = card.pooling
        self.threads = threads
        self._input_names = list(card.input_names)
        self._pad_id = card.pad_token_id
        self._tokenizer = tokenizer
        self._session = session
        self._states_sessions: dict[int, ort.InferenceSession] = {}  # layer -> states graph, opened on first use
        self._lanes = max(1, threads // LANE_THREADS)  # batches run at once

    @classmethod
    def load(cls, artifact_dir: Path, *, threads: int | None = None) -> Encoder:
        """Open an artifact directory; ``threads`` defaults to the usable cores."""
        artifact_dir = Path(artifact_dir)
        threads = usable_cores() if threads is None else threads
        if threads < 1:
            raise EwError(f"threads must be at least 1, got {threads}")
        for name in (CARD_FILE, MODEL_FILE, TOKENIZER_FILE):
            if not (artifact_dir / name).is_file():
                raise ArtifactError(artifact_dir, f"{name} is missing")
        card = ModelCard.load(artifact_dir)
        try:
            tokenizer = Tokenizer.from_file(str(artifact_dir / TOKENIZER_FILE))
        except Exception as error:  # tokenizers raises plain Exception on a bad file
            raise ArtifactError(artifact_dir, f"{TOKENIZER_FILE} cannot be loaded ({error})") from error
        tokenizer.no_padding()  # we pad per batch ourselves
        # With stride 0, anything past max_length lands in `overflowing`: that is how truncation is detected.
        tokenizer.enable_truncation(card.max_length)
        try:
            session = open_session(artifact_dir / MODEL_FILE, threads=LANE_THREADS)
        except Exception as error:  # onnxruntime raises its own non-EwError types
            raise ArtifactError(artifact_dir, f"{MODEL_FILE} cannot be loaded ({error})") from error
        _check_graph(artifact_dir, MODEL_FILE, session, card, [OUTPUT_NAME])
        return cls(artifact_dir, card, tokenizer, session, threads=threads)

    def token_lengths(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens each text gets after truncation, whether it was truncated)."""
        _, lengths, truncated = self._tokenize(texts)
        return lengths, truncated

    def encode(self, texts: Sequence[str], *, batch_size: int = 32, batch_tokens: int = BATCH_TOKENS,
               on_progress: Callable[[int], None] | None = None) -> EncodedBatch:
        """Vectors of every layer for each text, in input order.

        Texts are sorted by token count and cut into batches (:func:`length_batches`) padded only
        to their own longest text, so short texts do not pay for long ones; longest first, so a
        memory problem shows in the first batch. ``on_progress`` gets each batch's text count.
        """
        _check_batching(batch_size, batch_tokens)
        ids, lengths, truncated = self._tokenize(texts)
        vectors = np.empty((len(ids), self.num_layers + 1, self.dim), dtype=np.float32)
        batches = length_batches(lengths, batch_size=batch_size, batch_tokens=batch_tokens)

        def run(rows: np.ndarray) -> list[np.ndarray]:
            return self._session.run([OUTPUT_NAME], self._feeds([ids[i] for i in rows]))

        for rows, (pooled,) in self._in_lanes(run, batches):
            vectors[rows] = pooled  # (B, num_layers + 1, dim)
            if on_progress:
                on_progress(len(rows))
        return EncodedBatch(vectors=vectors, truncated=truncated)

    def encode_states(self, texts: Sequence[str], *, layer: int, batch_size: int = 32,
                      batch_tokens: int = BATCH_TOKENS, dtype: np.dtype | str = np.float32,
                      on_progress: Callable[[int], None] | None = None) -> EncodedStates:
        """Pooled vectors of every layer plus layer ``layer``'s states of each text's real tokens (as ``dtype``).

        Runs ``states-<layer>.onnx``, batched like :meth:`encode`; padding is cut off each text's
        states before they are kept, and each is copied out of its batch, so only the states
        asked for stay in memory.
        """
        _check_batching(batch_size, batch_tokens)
        session = self._states_session(layer)
        ids, lengths, truncated = self._tokenize(texts)
        vectors = np.empty((len(ids), self.num_layers + 1, self.dim), dtype=np.float32)
        states: list[np.ndarray] = [np.empty((0, self.dim), dtype)] * len(ids)
        batches = length_batches(lengths, batch_size=batch_size, batch_tokens=batch_tokens)

        def run(rows: np.ndarray) -> list[np.ndarray]:
            return session.run([OUTPUT_NAME, STATES_OUTPUT], self._feeds([ids[i] for i in rows]))

        for rows, (pooled, hidden) in self._in_lanes(run, batches):
            vectors[rows] = pooled
            for position, row in enumerate(rows):
                states[row] = hidden[position, : lengths[row]].astype(dtype)  # (n_tokens, dim), a copy
            if on_progress:
                on_progress(len(rows))
        return EncodedStates(vectors=vectors, truncated=truncated, states=states)

    def open_states(self, layer: int) -> None:
        """Open the layer-``layer`` token-state graph now rather than at its first use (its file may go)."""
        self._states_session(layer)

    def _states_session(self, layer: int) -> ort.InferenceSession:
        if layer not in self._states_sessions:
            path = self.path / states_file(layer)
            if not path.is_file():
                raise EwError(
                    f"model artifact {self.path} has no token-state graph for layer {layer} ({path.name}); "
                    f"`ew ingest FILE --model {self.key} --token-states {layer}` exports it (it needs the model's "
                    "weights once)"
                )
            try:
                session = open_session(path, threads=LANE_THREADS)
            except Exception as error:  # onnxruntime raises its own non-EwError types
                raise ArtifactError(self.path, f"{path.name} cannot be loaded ({error})") from error
            _check_graph(self.path, path.name, session, self.card, [OUTPUT_NAME, STATES_OUTPUT])
            self._states_sessions[layer] = session
        return self._states_sessions[layer]

    def _tokenize(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(each text's (2, n_tokens) token and type ids, token counts, truncation flags)."""
        encodings = self._tokenizer.encode_batch(list(texts))
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        # Only the ids are kept: an Encoding also holds token strings, offsets and the overflow (~10x the bytes).
        ids = [np.array([e.ids, e.type_ids], dtype=np.int64).reshape(2, -1) for e in encodings]
        lengths = np.fromiter((i.shape[1] for i in ids), dtype=np.int64, count=len(ids))
        return ids, lengths, truncated

    def _in_lanes(self, run: Callable[[np.ndarray], list], batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, list]]:
        """(rows, ``run(rows)``) for each batch, in order, with up to ``self._lanes`` batches running at once.

        At most two batches per lane are submitted ahead of the one the caller takes next, so the
        outputs waiting to be taken stay a few batches whatever the text count. On an error or
        Ctrl-C the batches not started are dropped and the running ones finish first.
        """
        if self._lanes == 1 or len(batches) == 1:
            yield from ((rows, run(rows)) for rows in batches)
            return
        pool = ThreadPoolExecutor(max_workers=self._lanes, thread_name_prefix="ew-encode")
        try:
            pending: deque[tuple[np.ndarray, Future]] = deque()
            for rows in batches:
                pending.append((rows, pool.submit(run, rows)))
                if len(pending) > 2 * self._lanes:
                    rows_done, future = pending.popleft()
                    yield rows_done, future.result()
            for rows_done, future in pending:
                yield rows_done, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _feeds(self, texts_ids: list[np.ndarray]) -> dict[str, np.ndarray]:
        width = max(i.shape[1] for i in texts_ids)
        ids = np.full((len(texts_ids), width), self._pad_id, dtype=np.int64)  # (B, T)
        mask = np.zeros((len(texts_ids), width), dtype=np.int64)
        types = np.zeros((len(texts_ids), width), dtype=np.int64)
        for row, text_ids in enumerate(texts_ids):
            n = text_ids.shape[1]
            ids[row, :n] = text_ids[0]
            mask[row, :n] = 1
            types[row, :n] = text_ids[1]
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: feeds[name] for name in self._input_names}


def _check_batching(batch_size: int, batch_tokens: int) -> None:
    if batch_size < 1:
        raise EwError(f"batch_size must be at least 1, got {batch_size}")
    if batch_tokens < 1:
        raise EwError(f"batch_tokens must be at least 1, got {batch_tokens}")


def _check_graph(artifact_dir: Path, name: str, session: ort.InferenceSession, card: ModelCard, outputs: list[str]) -> None:
    graph_inputs = [i.name for i in session.get_inputs()]
    graph_outputs = [o.name for o in session.get_outputs()]
    if sorted(graph_inputs) != sorted(card.input_names) or not set(graph_inputs) <= set(INPUT_NAMES) or graph_outputs != outputs:
        raise ArtifactError(
            artifact_dir,
            f"{name} takes {graph_inputs} and returns {graph_outputs}, "
            f"but {CARD_FILE} says {list(card.input_names)} -> {outputs}",
        )
