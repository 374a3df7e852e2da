"""`ew ingest --engine ray`: the encoder runs on a Ray cluster, the warehouse stays with the driver.

    ingest("ew-warehouse", Path("corpus.jsonl"), engine="ray", ray_address="10.0.0.5:6379")

The driver reads the corpus, hashes and plans it chunk by chunk exactly as a local ingest does
(:class:`pipelines.ingest._CorpusRun`). The texts to encode go to Ray Data in windows of up to
WINDOW_TEXTS, each chunk's sorted by length, longest first, and cut into RAY_BLOCK blocks; a
pool of actors (``map_batches`` with :class:`EncodeActor`) each loads the model artifact once
from bytes shipped through Ray's object store (no shared disk) and runs
:func:`pipelines.embedding.encode_texts` (or ``encode_state_texts``, for ``--token-states``) on them. Vectors stream back (``iter_batches``); a chunk is committed through the writer as soon as
all of its vectors are back, in corpus order, so the versions, counts and keys are those of a
local ingest. A Ctrl-C, a lost driver or a failed cluster leaves the warehouse at its last
commit, and the rerun plans from there; a lost worker is replaced by Ray Data.

Ray is an extra (``pip install 'ew[ray]'``); nothing here imports it before it is needed.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from warehouse.errors import EwError, first_line

from .artifacts import CARD_FILE, MODEL_FILE, STATES_CARD_FILE, TOKENIZER_FILE, states_file
from .embedding import TokenStates, encode_state_texts, encode_texts

if TYPE_CHECKING:
    from .corpus import FieldTypes, Record
    from .embedding import Embedded, EmbeddingService, Needs
    from .ingest import PlannedChunk, _CorpusRun
    from .progress import Progress

ENGINES = ("local", "ray")
# Texts per Ray Data execution: each one starts its actor pool again (~5 s measured on a 2-core
# machine), so a window must hold minutes of encoding; it also bounds what the driver holds.
WINDOW_TEXTS = 65_536
# Texts per Ray Data block, the unit an actor encodes at once. The pool waits at the end of a window
# for its slowest actor's last block: with blocks of 512, a 5,000-document ingest is 10 blocks for
# 2 actors, and one could sit idle for most of a block (~8 s). Blocks go out longest first, so the
# last ones are also the shortest.
RAY_BLOCK = 128
# What an actor needs to encode: the ONNX graph, the tokenizer and the card (not the token-state
# graphs nor the torch weights kept for fine-tuning).
SHIPPED_FILES = (CARD_FILE, MODEL_FILE, TOKENIZER_FILE)


def check_engine(engine: str, *, ray_address: str | None = None) -> None:
    """Fail before any work for an unknown engine, a Ray engine without Ray, or what Ray cannot do yet."""
    if engine not in ENGINES:
        raise EwError(f"--engine: {engine!r} is not an engine; use {' or '.join(ENGINES)}")
    if ray_address is not None and engine != "ray":
        raise EwError("--ray-address is only used with --engine ray")
    if engine == "ray":
        require_ray()


def require_ray():
    """The ``ray`` module, or the error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships in ray[data], not in plain ray)
    except ImportError:
        raise EwError("--engine ray needs Ray Data, which is not installed: pip install 'ew[ray]'") from None
    return ray


@contextmanager
def connected(address: str | None) -> Iterator:
    """A driver connected to the cluster at ``address`` (None: a Ray started on this machine).

    See :func:`code_environment` for how the workers get this process's ew.
    """
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, log_to_driver=False,
                     include_dashboard=False if address is None else None, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"at {address}" if address else "on this machine"
            raise EwError(f"cannot connect to a Ray cluster {where} ({first_line(error)}); start one with "
                          "`ray start --head` and pass its address as --ray-address HOST:PORT") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ew draws its own docs/s line
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def code_digest() -> str | None:
    """A digest of the ``pipelines`` and ``warehouse`` sources this Python imports (None: it imports none).

    Self-contained (it imports what it needs), so Ray can run it by value on a worker without ew.
    """
    import hashlib
    import importlib.util
    from pathlib import Path

    digest = hashlib.sha256()
    for package in ("pipelines", "warehouse"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(list(spec.submodule_search_locations)[0])
        for source in sorted(root.glob("*.py")):
            digest.update(f"{package}/{source.name}\0".encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def code_environment(ray) -> dict | None:
    """The runtime environment that gives the encoding actors this process's ew: none when the
    cluster's workers import the very same sources already (a cluster started from this
    installation), else this process's ``pipelines`` and ``warehouse`` shipped as ``py_modules``.

    Shipping costs every ingest ~4 s on 2 cores (workers start afresh in a new environment), so
    it is done only when a worker's sources differ from the driver's, checked by one small task.
    """
    import pipelines
    import warehouse

    probe = ray.remote(num_cpus=0)(_by_value(code_digest))
    if ray.get(probe.remote()) == code_digest():
        return None
    return {"py_modules": [pipelines, warehouse]}


def _by_value(function):
    """``function`` as a fresh function object, which Ray pickles by value rather than by module name."""
    import types

    return types.FunctionType(function.__code__, {"__builtins__": __builtins__}, function.__name__)


def artifact_files(artifact: Path, *, states: TokenStates | None = None) -> dict[str, bytes]:
    """The files an :class:`EncodeActor` loads, by name: shipped as one object, not as a path
    (with ``states``, the token-state graph of that layer too)."""
    names = SHIPPED_FILES + ((states_file(states.layer), STATES_CARD_FILE) if states else ())
    return {name: (Path(artifact) / name).read_bytes() for name in names}


# The kind of a text in a block: it needs vectors only, or its token states as well.
VECTORS, STATES = 0, 1


class EncodeActor:
    """One Ray Data actor: loads the model from shipped bytes once, then encodes blocks of texts.

    A text of kind STATES also gets its layer-K token states, as bytes of ``states.precision``
    values ((n_tokens, dim), row-major); the others get an empty ``states``.
    """

    def __init__(self, files: list, *, threads: int, batch_size: int, states: TokenStates | None = None):
        import ray

        from .encoder import Encoder

        # onnxruntime and tokenizers load from files: a private temp dir, removed once loaded.
        directory = Path(tempfile.mkdtemp(prefix="ew-artifact-"))
        try:
            for name, data in ray.get(files[0]).items():
                (directory / name).write_bytes(data)
            self.encoder = Encoder.load(directory, threads=threads)
            if states is not None:
                self.encoder.open_states(states.layer)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        self.batch_size = batch_size
        self.states = states

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for kind in np.unique(block["kind"]):  # one, unless Ray Data merged blocks
            rows = block["kind"] == kind
            texts = list(block["text"][rows])
            if kind == STATES:
                vectors, truncated, states = encode_state_texts(self.encoder, texts, layer=self.states.layer,
                                                                dtype=self.states.dtype, batch_size=self.batch_size)
                blobs = np.array([s.tobytes() for s in states], dtype=object)
            else:
                vectors, truncated = encode_texts(self.encoder, texts, batch_size=self.batch_size)
                blobs = np.array([b""] * len(texts), dtype=object)
            parts.append({"chunk": block["chunk"][rows], "index": block["index"][rows], "kind": block["kind"][rows],
                          "vectors": vectors, "truncated": truncated, "states": blobs})
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def run_on_ray(run: _CorpusRun, chunks: Iterable[list[Record]], field_types: FieldTypes, show: Progress, *,
               address: str | None, threads: int | None = None) -> None:
    """Plan ``chunks`` on the driver, encode their texts on the cluster, commit each chunk in order."""
    with connected(address) as ray:
        threads = threads or 1
        actors = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        show.label += f" on Ray ({actors} actors x {threads} thread{'s' if threads > 1 else ''})"
        states = run.service.states
        files = [ray.put(artifact_files(run.service.model.artifact, states=states))]  # in a list: Ray passes the reference
        environment = code_environment(ray)
        planned = (run.plan_chunk(chunk) for chunk in chunks)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ew-commit") as committer:
            commits = _Commits(committer, run)
            for window in _windows(planned, WINDOW_TEXTS):
                blocks = list(_blocks(window))
                results = iter(())
                if blocks:
                    dataset = ray.data.from_arrow(blocks).map_batches(
                        EncodeActor, batch_size=None, batch_format="numpy", num_cpus=threads,
                        compute=ray.data.ActorPoolStrategy(size=actors), runtime_env=environment,
                        fn_constructor_kwargs={"files": files, "threads": threads, "batch_size": run.service.batch_size,
                                               "states": states},
                    )
                    results = dataset.iter_batches(batch_size=None, batch_format="numpy")
                _receive(window, results, run, field_types, show, commits, ray)
            commits.wait()
    run.commit_updates(field_types)


def _windows(planned: Iterable[PlannedChunk], size: int) -> Iterator[list[PlannedChunk]]:
    """Planned chunks in groups holding about ``size`` texts to encode (a group ends after the chunk that fills it)."""
    window: list[PlannedChunk] = []
    texts = 0
    for chunk in planned:
        window.append(chunk)
        texts += chunk.needs.encoded
        if texts >= size:
            yield window
            window, texts = [], 0
    if window:
        yield window


def _blocks(window: list[PlannedChunk]) -> Iterator[pa.Table]:
    """Each chunk's texts of each kind, longest first (short texts are not padded to long ones), RAY_BLOCK at a time."""
    for number, chunk in enumerate(window):
        for kind, texts in ((VECTORS, chunk.needs.vector_texts), (STATES, chunk.needs.state_texts)):
            order = np.argsort([-len(text) for text in texts], kind="stable")
            for start in range(0, len(order), RAY_BLOCK):
                group = order[start : start + RAY_BLOCK]
                yield pa.table({"chunk": pa.array(np.full(len(group), number, np.int32)),
                                "index": pa.array(group.astype(np.int64)),
                                "kind": pa.array(np.full(len(group), kind, np.int8)),
                                "text": pa.array([texts[i] for i in group], pa.string())})


class _Commits:
    """Commits chunks on one background thread, one at a time and in order, while vectors keep arriving."""

    def __init__(self, committer: ThreadPoolExecutor, run: _CorpusRun):
        self.committer = committer
        self.run = run
        self.pending: Future | None = None

    def submit(self, work) -> None:
        self.wait()
        if work is not None:
            self.pending = self.committer.submit(self.run.commit_chunk, work)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None


class _Arrivals:
    """What came back so far for one chunk's texts, by kind, in the order of its ``needs``."""

    def __init__(self, chunk: PlannedChunk, *, layers: int, dim: int, states: TokenStates | None):
        counts = (len(chunk.needs.vectors_only), len(chunk.needs.with_states))
        self.vectors = [np.empty((n, layers, dim), np.float32) for n in counts]
        self.truncated = [np.zeros(n, bool) for n in counts]
        self.states: list[np.ndarray | None] = [None] * counts[STATES]
        self.dtype = states.dtype if states else None
        self.dim = dim
        self.left = sum(counts)

    def add(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        for kind in (VECTORS, STATES):
            mine = rows & (batch["kind"] == kind)
            index = batch["index"][mine]
            self.vectors[kind][index] = batch["vectors"][mine]
            self.truncated[kind][index] = batch["truncated"][mine]
            if kind == STATES:
                for i, blob in zip(index, batch["states"][mine]):
                    self.states[i] = np.frombuffer(blob, self.dtype).reshape(-1, self.dim)
            self.left -= len(index)

    def embedded(self, service: EmbeddingService, needs: Needs) -> Embedded:
        embedded = service.embedded(needs, self.vectors[VECTORS], self.truncated[VECTORS])
        if needs.with_states:
            embedded = service.with_states(embedded, needs, self.vectors[STATES], self.truncated[STATES], self.states)
        return embedded


def _receive(window: list[PlannedChunk], results: Iterable[dict], run: _CorpusRun, field_types: FieldTypes,
             show: Progress, commits: _Commits, ray) -> None:
    """Gather the streamed vectors (and states) by chunk; commit every chunk that is all back, in order."""
    card = run.service.model.card
    arrivals: list[_Arrivals | None] = [
        _Arrivals(chunk, layers=card.num_layers + 1, dim=card.dim, states=run.service.states) for chunk in window]
    done = 0

    def commit_ready() -> None:
        nonlocal done
        while done < len(window) and arrivals[done].left == 0:
            chunk = window[done]
            embedded = arrivals[done].embedded(run.service, chunk.needs)
            show.advance(chunk.size - embedded.encoded)
            commits.submit(run.finish_chunk(chunk, embedded, field_types))
            arrivals[done] = None  # committed: let it go
            done += 1

    commit_ready()
    try:
        for batch in results:
            for number in np.unique(batch["chunk"]):  # one, unless Ray Data merged blocks
                arrivals[number].add(batch, batch["chunk"] == number)
            show.advance(len(batch["chunk"]))
            commit_ready()
    except ray.exceptions.RayError as error:
        raise EwError(
            f"the Ray cluster failed while encoding ({first_line(error)}); the warehouse keeps every chunk committed "
            "before: run the same command again to continue"
        ) from None
    if done < len(window):  # cannot happen unless Ray lost blocks without saying so
        raise EwError(f"the Ray cluster returned the vectors of {done} of {len(window)} chunks; run the same "
                      "command again to continue")


@contextmanager
def local_cluster(*, num_cpus: int, port: int | None = None, startup: float = 60.0) -> Iterator[str]:
    """A Ray head on 127.0.0.1 with ``num_cpus`` CPUs (no dashboard), killed on exit; yields its address.

    For tests and benchmarks: ``ray start --block`` runs in a session of its own, so every
    process of the cluster (raylet, workers) is found by that session and killed by id.
    """
    import signal
    import subprocess
    import sys

    from warehouse.loopback import free_port, listening

    require_ray()
    port = free_port() if port is None else port
    # Ray's unix sockets live under the temp dir: it must stay short (a socket path has at most 107 bytes).
    temp = Path(tempfile.mkdtemp(prefix="ew-ray-", dir="/tmp"))
    with open(temp / "ray-start.log", "w") as log:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--include-dashboard=false",
             f"--temp-dir={temp}", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp,
        )
    try:
        if not listening(port, head, seconds=startup, poll=0.2):
            raise EwError(f"ray start failed: {(temp / 'ray-start.log').read_text()[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_processes(head.pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                head.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if not _session_processes(head.pid):
                break
        shutil.rmtree(temp, ignore_errors=True)


def _session_processes(session: int) -> list[int]:
    """The ids of the processes in session ``session``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return found
