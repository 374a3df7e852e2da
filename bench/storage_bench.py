"""Ingest into a warehouse on local disk vs one on a local S3 server (moto), side by side.

    python -m bench.storage_bench --documents 1000 --model minilm

:func:`s3_vs_local` is what ``bench.scale_out`` calls. Both warehouses get the model exported and
registered first (one document), so the timed run is the steady state: read, hash, plan, encode,
and commit Parquet files and Delta log entries to the storage. The S3 server is moto on
127.0.0.1, in a process of its own: it measures the object-store protocol (many small requests,
no rename, an object lock with a heartbeat), not a network.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .common import debian_records, save, write_jsonl


@contextmanager
def local_s3_server() -> Iterator[str]:
    """A moto S3 server (:func:`warehouse.s3.moto_server`) with one new bucket; the AWS variables
    point at it for the block. Yields the bucket's name."""
    import boto3

    from warehouse.s3 import moto_server

    saved = dict(os.environ)
    try:
        with moto_server() as endpoint:
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
            bucket = f"ew-bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield bucket
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _timed_ingest(location: str, corpus: Path, warm: Path, *, model: str, threads: int | None,
                  chunk_size: int) -> dict:
    from pipelines.ingest import ingest

    prepared = ingest(location, warm, model=model, threads=threads, progress=False)  # export + register: not timed
    started = time.perf_counter()
    result = ingest(location, corpus, model=prepared.model, threads=threads, chunk_size=chunk_size, progress=False)
    seconds = time.perf_counter() - started
    return {"location": location, "documents": result.read, "embedded": result.embedded,
            "seconds": round(seconds, 3), "docs_per_s": round(result.read / seconds, 1)}


def s3_vs_local(*, model: str = "minilm", documents: int = 1000, threads: int | None = None,
                chunk_size: int = 4096, seed: int = 0, workdir: Path | None = None) -> dict:
    """docs/s of one ingest of ``documents`` Debian records into local disk and into a local S3 server.

    Returns ``{"local": {...}, "s3": {...}, "s3_slowdown": local docs/s / s3 docs/s}`` (1.0: no cost).
    """
    records = debian_records(limit=documents, seed=seed)
    with tempfile.TemporaryDirectory(prefix="ew-storage-bench.", dir=workdir) as scratch:
        scratch = Path(scratch)
        corpus = write_jsonl(records, scratch / "debian.jsonl")
        warm = write_jsonl(records[:1], scratch / "warm.jsonl")
        os.environ.setdefault("EW_CACHE_DIR", str(scratch / "cache"))
        local = _timed_ingest(str(scratch / "local-wh"), corpus, warm, model=model, threads=threads,
                              chunk_size=chunk_size)
        with local_s3_server() as bucket:
            s3 = _timed_ingest(f"s3://{bucket}/wh", corpus, warm, model=model, threads=threads, chunk_size=chunk_size)
    return {"model": model, "documents": len(records), "chunk_size": chunk_size, "local": local, "s3": s3,
            "s3_slowdown": round(local["docs_per_s"] / s3["docs_per_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--chunk-size", type=int, default=4096)
    args = parser.parse_args()
    result = s3_vs_local(model=args.model, documents=args.documents, threads=args.threads, chunk_size=args.chunk_size)
    for where in ("local", "s3"):
        print(f"{where:>5}: {result[where]['docs_per_s']:8.1f} docs/s ({result[where]['seconds']} s)")
    print(f"s3 / local: {result['s3_slowdown']}x slower")
    print(f"written to {save('storage', result)}")


if __name__ == "__main__":
    main()
