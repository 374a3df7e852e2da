"""A warehouse over its life: files, bytes and full-scan time before and after `ew compact` and `ew vacuum`.

    python -m bench.lifecycle [--docs 6000] [--chunks 20] [--corrected 0.05]

Builds a warehouse from a seeded sample of the Debian corpus ingested in ``--chunks`` chunks
(MiniLM, ``--layers last``: the bench measures files, not the encoder), then ingests it again
with ``--corrected`` of the ``section`` labels changed (ew rewrites the corpus's partition).
Then, side by side in one run: Parquet files and bytes on disk, the time of a full-scan
`ew query` (best of 5), and what a plain-Parquet reader globbing ``documents/**/*.parquet``
counts, before, after `ew compact`, and after `ew vacuum --keep-versions 1 --yes`; and the time
of `ew verify --deep` per million vectors. Writes bench/results/lifecycle.json.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import duckdb

from pipelines.ingest import ingest
from pipelines.integrity import verify
from warehouse import Warehouse
from warehouse.lifecycle import compact, vacuum
from warehouse.tables import TABLES

from .common import cpu_flags, debian_records, save, write_jsonl

FULL_SCAN = ("select (select count(*) from documents) as documents, (select count(distinct section) from documents) as sections, "
             "(select sum(list_sum(embedding)) from embeddings) as vector_sum")


def on_disk(wh: Warehouse) -> dict:
    files = [(path, size) for table in TABLES for path, size in wh.storage.iter_files(table)
             if path.endswith(".parquet") and "/_delta_log/" not in path]
    return {"files": len(files), "bytes": sum(size for _, size in files)}


def full_scan_seconds(wh: Warehouse, *, repeats: int = 5) -> tuple[float, dict]:
    best, result = float("inf"), {}
    for _ in range(repeats):
        started = time.perf_counter()
        result = wh.query(FULL_SCAN).read_all().to_pylist()[0]
        best = min(best, time.perf_counter() - started)
    return best, result


def globbed_documents(wh: Warehouse) -> int:
    return duckdb.sql(f"select count(*) from read_parquet('{wh.root}/documents/**/*.parquet')").fetchall()[0][0]


def measure(wh: Warehouse, stage: str) -> dict:
    seconds, result = full_scan_seconds(wh)
    row = {"stage": stage, "version": wh.latest_version(), **on_disk(wh), "full_scan_seconds": seconds,
           "globbed_documents": globbed_documents(wh), "scan_result": result}
    print(f"{stage:<16} {row['files']:>6,} files {row['bytes'] / 1e6:>9.1f} MB   full scan {seconds * 1e3:>8.1f} ms   "
          f"documents/**/*.parquet holds {row['globbed_documents']:,} rows")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--corrected", type=float, default=0.05)
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()
    print(f"CPU flags: {' '.join(cpu_flags()['vector_flags']) or 'unknown'}")
    records = debian_records(limit=args.docs, seed=0)
    with tempfile.TemporaryDirectory(prefix="ew-lifecycle-") as scratch:
        root = Path(scratch)
        wh = Warehouse.open(root / "wh", create=True)
        corpus = write_jsonl(records, root / "debian.jsonl")
        started = time.perf_counter()
        ingest(wh, corpus, model=args.model, layers="last", chunk_size=-(-len(records) // args.chunks))
        ingest_seconds = time.perf_counter() - started
        rng = random.Random(1)
        sections = sorted({record["section"] for record in records})
        for record in rng.sample(records, round(args.corrected * len(records))):
            record["section"] = rng.choice([s for s in sections if s != record["section"]])
        ingest(wh, write_jsonl(records, corpus), model=args.model, layers="last")

        stages = [measure(wh, "ingested")]
        compacted = compact(wh)
        stages.append(measure(wh, "compacted"))
        vacuumed = vacuum(wh, keep_versions=1, dry_run=False)
        stages.append(measure(wh, "vacuumed"))
        assert len({str(stage["scan_result"]) for stage in stages}) == 1, "a query's result changed"
        report = verify(wh, deep=True)
        vectors = wh.query("select count(*) as n from embeddings").read_all().to_pylist()[0]["n"]
        assert report.ok, [problem.line() for problem in report.problems]

    speedup = stages[0]["full_scan_seconds"] / stages[1]["full_scan_seconds"]
    verify_per_million = report.seconds / vectors * 1e6
    print(f"compact: {compacted.files_before:,} -> {compacted.files_after:,} live files in {compacted.seconds:.1f}s; "
          f"full scans {speedup:.2f}x faster")
    print(f"vacuum: deleted {vacuumed.files:,} files ({vacuumed.bytes / 1e6:.1f} MB) in {vacuumed.seconds:.2f}s")
    print(f"ew verify --deep: {report.seconds:.2f}s for {vectors:,} vectors, {verify_per_million:.1f}s per million")
    path = save("lifecycle", {
        "model": args.model, "layers": "last", "documents": len(records), "chunks": args.chunks,
        "corrected_fraction": args.corrected, "cpu_flags": cpu_flags()["vector_flags"], "ingest_seconds": ingest_seconds,
        "stages": stages, "compact": compacted.to_dict(), "vacuum": vacuumed.to_dict(),
        "full_scan_speedup": speedup, "verify_deep_seconds": report.seconds, "vectors": vectors,
        "verify_deep_seconds_per_million_vectors": verify_per_million,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
