"""Beyond one process: local ingest vs `--engine ray` on the same cores, the driver's commit rate,
and what planning costs on a warehouse with many keys.

    python -m bench.scale_out [--docs 5000] [--cores 2]

Prints and writes (bench/results/scale_out.json):
- documents/s of a local ingest (one process, ``--cores`` threads) and of ``--engine ray`` on a
  local cluster of ``--cores`` CPUs (``--cores`` actors x 1 thread) that is up already (as a
  user's is), start-up of the actors and the model loading in them included; the ratio is the
  engine's overhead (target: ray at least 0.8 x local, i.e. <= 25%);
- rows/s the single committing driver writes (``EmbeddingService.write`` + commit of precomputed
  vectors): what bounds a cluster however many workers it has;
- planning on a warehouse holding ``--keys`` documents x 7 layers: the time to plan one chunk of
  4,096 keys and the memory it holds;
- local disk vs the local S3 server: docs/s of the same ingest (``--s3-docs`` documents).
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.embedding import EmbeddingService, Plan
from pipelines.ingest import DEFAULT_CHUNK, ingest
from pipelines.ray_engine import local_cluster
from pipelines.registry import open_model
from warehouse import Warehouse
from warehouse.tables import EMBEDDINGS, vector_column

from .common import cpu_flags, debian_records, save, write_jsonl


def ingest_rate(base: Path, copy: Path, corpus: Path, model: str, **options) -> tuple[float, Warehouse]:
    """Documents/s of one ingest of ``corpus`` into a copy of ``base`` (which holds the exported model)."""
    shutil.copytree(base, copy)
    wh = Warehouse.open(copy)
    result = ingest(wh, corpus, model=model, progress=False, **options)
    return result.read / result.seconds, wh


def ready_cluster(address: str) -> None:
    """Connect once and leave: a cluster's head finishes starting (~7 s on 2 cores) before the first
    driver gets in, and a user's cluster is up before they ingest, so that is not the engine's cost.
    The timed ingest still starts its own actors and loads the model in them."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    ray.shutdown()


def commit_rate(base: Path, copy: Path, rows: pa.Table, model: str) -> float:
    """Rows/s of the driver's write step alone: precomputed embedding rows appended and committed."""
    shutil.copytree(base, copy)
    wh = Warehouse.open(copy)
    with wh.writer() as writer:
        service = EmbeddingService(writer, open_model(wh, model), layers=[0])
        started = time.perf_counter()
        for start in range(0, rows.num_rows, DEFAULT_CHUNK * 7):  # a chunk of 4,096 documents x 7 layers
            service.write(rows.slice(start, DEFAULT_CHUNK * 7))
            writer.commit("bench")
        return rows.num_rows / (time.perf_counter() - started)


def _key(number: int) -> str:
    return hashlib.sha256(str(number).encode()).hexdigest()


def planning(root: Path, *, keys: int, layers: int = 7) -> dict:
    """Plan one chunk of 4,096 keys (half stored) against ``keys`` x ``layers`` synthetic stored keys."""
    wh = Warehouse.open(root, create=True)
    stored = [_key(i) for i in range(keys)]
    with wh.writer() as writer:
        for layer in range(layers):
            writer.append_embeddings(pa.table({
                "doc_hash": stored, "model": ["m"] * keys, "layer": pa.array([layer] * keys, pa.int32()),
                "pooling": ["mean"] * keys, "embedding": vector_column(np.zeros((keys, 4), np.float32)),
            }))
            writer.append_embeddings(pa.table({  # another model's keys, which the plan must skip
                "doc_hash": stored[:1000], "model": ["other"] * 1000, "layer": pa.array([layer] * 1000, pa.int32()),
                "pooling": ["mean"] * 1000, "embedding": vector_column(np.zeros((1000, 4), np.float32)),
            }))
        writer.commit("synthetic")
    chunk = [_key(i) for i in range(keys - DEFAULT_CHUNK // 2, keys + DEFAULT_CHUNK // 2)]
    tracemalloc.start()
    pool = pa.default_memory_pool()
    started = time.perf_counter()
    plan = Plan(wh.current_dataset(EMBEDDINGS), model="m", pooling="mean", layers=range(layers))
    opened = time.perf_counter()
    missing = plan.missing(chunk)
    planned = time.perf_counter()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(1 for m in missing if m) == DEFAULT_CHUNK // 2
    return {"stored_documents": keys, "layers": layers, "chunk": DEFAULT_CHUNK,
            "open_seconds": round(opened - started, 3), "chunk_seconds": round(planned - opened, 3),
            "python_held_mb": round(held / 1e6, 2), "python_peak_mb": round(peak / 1e6, 2),
            "arrow_peak_mb": round(pool.max_memory() / 1e6, 1)}


def storage_figures(*, model: str, documents: int, threads: int) -> dict:
    """Local disk vs the local S3 server (moto, in its own process), same documents and threads:
    target at most 1.5x slower (bench/storage_bench.py's ``s3_vs_local``)."""
    from .storage_bench import s3_vs_local

    figures = s3_vs_local(model=model, documents=documents, threads=threads)
    figures["target"] = {"goal": "s3 slowdown <= 1.5", "pass": bool(figures["s3_slowdown"] <= 1.5)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keys", type=int, default=200_000, help="stored documents of the planning measurement")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--s3-docs", type=int, default=1000, help="documents of the local disk vs S3 measurement")
    args = parser.parse_args()

    flags = cpu_flags()
    print(f"CPU: {flags['model']}, {flags['usable_cores']} usable cores; {' '.join(flags['vector_flags'])}")
    records = debian_records(limit=args.docs, seed=0)
    with tempfile.TemporaryDirectory(prefix="ew-bench-") as scratch:
        scratch = Path(scratch)
        corpus = write_jsonl(records, scratch / "debian.jsonl")
        base = scratch / "base"
        warm = write_jsonl([{"id": "warm", "text": "warm up"}], scratch / "warm.jsonl")
        model = ingest(Warehouse.open(base, create=True), warm, model=args.model, progress=False).model  # export once

        local_rate, local_wh = ingest_rate(base, scratch / "local", corpus, model, threads=args.cores)
        print(f"local ingest:  {local_rate:7.1f} docs/s ({args.cores} threads, one process)")
        with local_cluster(num_cpus=args.cores) as address:
            ready_cluster(address)
            ray_rate, _ = ingest_rate(base, scratch / "ray", corpus, model, engine="ray", ray_address=address,
                                      threads=1)
        ratio = ray_rate / local_rate
        print(f"--engine ray:  {ray_rate:7.1f} docs/s ({args.cores} actors x 1 thread, actor start-up included)")
        print(f"ray / local:   {ratio:7.2f} (overhead {100 * (1 - ratio):.0f}%; target <= 25%)")

        rows = local_wh.query(f"select * from embeddings where model = '{model}'").read_all()
        rows_per_second = commit_rate(base, scratch / "commit", rows, model)
        print(f"driver commit: {rows_per_second:9,.0f} rows/s ({rows_per_second / 7:,.0f} documents/s at 7 layers)")

        plan = planning(scratch / "planning", keys=args.keys)
        print(f"planning:      {plan['chunk_seconds']:.3f} s per chunk of {plan['chunk']:,} keys against "
              f"{plan['stored_documents']:,} x {plan['layers']} stored; {plan['python_held_mb']} MB held")
        storage = storage_figures(model=args.model, documents=args.s3_docs, threads=args.cores)
        print(f"storage:       local {storage['local']['docs_per_s']:.1f} docs/s, local S3 server "
              f"{storage['s3']['docs_per_s']:.1f} docs/s: {storage['s3_slowdown']:.2f}x slower (target <= 1.5)")

    path = save("scale_out", {
        "docs": args.docs, "cores": args.cores, "model": model, "cpu": {k: v for k, v in flags.items() if k != "flags"},
        "local_docs_per_second": round(local_rate, 1), "ray_docs_per_second": round(ray_rate, 1),
        "ray_over_local": round(ratio, 3), "ray_docs_per_second_per_core": round(ray_rate / args.cores, 1),
        "commit_rows_per_second": round(rows_per_second), "planning": plan, "storage": storage,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
