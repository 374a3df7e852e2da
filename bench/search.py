"""`ew search` beside NumPy brute force, on the same stored vectors and query vectors.

    python -m bench.search [--docs 20000] [--queries 50] [-k 10]

The warehouse (bench/.search/warehouse) is built once: the first ``--docs`` documents of the
Debian corpus (0: all of it) ingested with MiniLM, last layer only. Each side then runs in a
fresh process of its own, so its peak RSS is its own:

- ew: :func:`warehouse.similarity.nearest` per query: DuckDB streams the pinned Parquet files
  and keeps a top-k heap; nothing is held between queries.
- NumPy: every vector of the layer loaded into one (N, dim) float32 matrix, normalized once;
  per query one matrix-vector product and ``argpartition``: what a user would write.

Both get the same query vectors (stored documents' texts, embedded once by the model), and
their top-k are compared. Then the same on a warehouse holding ``--copies`` times the vectors
(built once beside it): ew's peak RSS should stay flat while NumPy's grows with the data.
Prints and writes bench/results/search.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from .common import DATA, cpu_flags, peak_rss_mb, save

HERE = Path(__file__).resolve().parent / ".search"
WAREHOUSE = HERE / "warehouse"
CORPUS = "debian"


def build(docs: int) -> None:
    """Ingest the first ``docs`` documents (0: all) once; a warehouse already there is reused."""
    if (WAREHOUSE / "ew-warehouse.json").is_file():
        return
    HERE.mkdir(parents=True, exist_ok=True)
    corpus = HERE / f"debian_{docs or 'all'}.jsonl"
    with gzip.open(DATA, "rt", encoding="utf-8") as source, open(corpus, "w", encoding="utf-8") as target:
        for number, line in enumerate(source):
            if docs and number >= docs:
                break
            target.write(line)
    print(f"building {WAREHOUSE} from {corpus} (once)...", flush=True)
    subprocess.run([sys.executable, "-m", "pipelines.cli", "-w", str(WAREHOUSE), "ingest", str(corpus), "--model", "minilm",
                    "--layers", "last", "--corpus", CORPUS], check=True)


def build_copies(copies: int) -> Path:
    """A copy of the warehouse holding ``copies`` times its vectors (copy c: doc_hash and corpus
    prefixed with ``copy<c>``, same text and vector), built once: does ew's memory stay flat?"""
    import pyarrow.compute as pc

    from warehouse import Warehouse
    from warehouse.tables import DOCUMENTS, EMBEDDINGS

    target = HERE / f"warehouse-x{copies}"
    if (target / "ew-warehouse.json").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(WAREHOUSE, target)
    wh = Warehouse.open(target)
    snapshot = wh.snapshot()
    vectors = wh.dataset(EMBEDDINGS, snapshot).to_table()
    documents = wh.dataset(DOCUMENTS, snapshot).to_table()
    with wh.writer() as writer:
        for copy in range(1, copies):
            def prefixed(table):
                index = table.schema.get_field_index("doc_hash")
                return table.set_column(index, "doc_hash", pc.binary_join_element_wise(f"copy{copy}-", table["doc_hash"], ""))
            writer.append_embeddings(prefixed(vectors))
            copied = prefixed(documents)
            copied = copied.set_column(copied.schema.get_field_index("corpus"), "corpus",
                                       pa.array([f"copy{copy}"] * copied.num_rows))
            writer.upsert_documents(copied)
        writer.commit("bench-copies", {"copies": copies})
    return target


def queries(count: int, seed: int) -> dict:
    """``count`` stored texts, sampled with ``seed``, and their vectors: what both sides search for."""
    from pipelines.encoder import Encoder
    from pipelines.registry import find_model, open_model
    from warehouse import Warehouse

    wh = Warehouse.open(WAREHOUSE)
    row = find_model(wh, None)
    texts = wh.query(f"select text from documents where corpus = '{CORPUS}' order by id").read_all().column(0).to_pylist()
    texts = random.Random(seed).sample(texts, count)
    encoder = Encoder.load(open_model(wh, row.model).artifact)
    started = time.perf_counter()
    vectors = encoder.encode(texts).vectors[:, row.num_layers]  # (Q, dim)
    embed_seconds = time.perf_counter() - started
    return {"model": row.model, "layer": row.num_layers, "pooling": row.pooling, "texts": texts,
            "vectors": vectors.tolist(), "embed_ms_per_query": 1000 * embed_seconds / count}


def run_ew(task: dict) -> dict:
    from warehouse import Warehouse
    from warehouse.similarity import nearest

    wh = Warehouse.open(task["warehouse"])
    start_rss = peak_rss_mb()
    options = dict(model=task["model"], layer=task["layer"], pooling=task["pooling"], k=task["k"])
    nearest(wh, np.asarray(task["vectors"][0], np.float32), **options)  # warm-up: page cache, DuckDB start
    top, scores = [], []
    started = time.perf_counter()
    for vector in task["vectors"]:
        found = nearest(wh, np.asarray(vector, np.float32), **options)
        top.append([r.doc_hash for r in found.rows])
        scores.append([r.score for r in found.rows])
    seconds = time.perf_counter() - started
    return {"queries_per_s": len(top) / seconds, "rss_after_imports_mb": start_rss, "peak_rss_mb": peak_rss_mb(),
            "top": top, "scores": scores}


def run_numpy(task: dict) -> dict:
    import pyarrow.compute as pc

    from warehouse import Warehouse
    from warehouse.tables import EMBEDDINGS

    wh = Warehouse.open(task["warehouse"])
    start_rss = peak_rss_mb()
    started = time.perf_counter()
    dataset = wh.dataset(EMBEDDINGS, wh.snapshot())
    table = dataset.to_table(columns=["doc_hash", "embedding"], filter=(
        (pc.field("model") == task["model"]) & (pc.field("layer") == task["layer"]) & (pc.field("pooling") == task["pooling"])))
    hashes = np.asarray(table.column("doc_hash").to_pylist())
    matrix = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(table.num_rows, -1)
    del table
    matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)  # (N, dim), unit rows
    load_seconds = time.perf_counter() - started
    k = task["k"]
    top, scores = [], []
    matrix @ matrix[0]  # warm-up: BLAS threads start
    started = time.perf_counter()
    for vector in task["vectors"]:
        query = np.asarray(vector, np.float32)
        similarity = matrix @ (query / np.linalg.norm(query))  # (N,)
        best = np.argpartition(-similarity, k)[:k]
        best = best[np.argsort(-similarity[best], kind="stable")]
        top.append(hashes[best].tolist())
        scores.append(similarity[best].tolist())
    seconds = time.perf_counter() - started
    return {"queries_per_s": len(top) / seconds, "load_seconds": load_seconds, "vectors": len(hashes),
            "rss_after_imports_mb": start_rss, "peak_rss_mb": peak_rss_mb(), "top": top, "scores": scores}


def side(name: str, task: dict) -> dict:
    """Run one side in a fresh interpreter: its peak RSS is its own."""
    completed = subprocess.run([sys.executable, "-m", "bench.search", "--side", name], input=json.dumps(task),
                               stdout=subprocess.PIPE, text=True)
    if completed.returncode:
        raise SystemExit(f"the {name} side failed (its error is above)")
    return json.loads(completed.stdout)


def agreement(ew: dict, numpy: dict) -> tuple[float, float]:
    """(share of queries whose top-k doc_hashes are the same set, max |score difference|)."""
    same = sum(set(a) == set(b) for a, b in zip(ew["top"], numpy["top"])) / len(ew["top"])
    gap = max(abs(x - y) for a, b in zip(ew["scores"], numpy["scores"]) for x, y in zip(a, b))
    return same, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000, help="First documents of the Debian corpus to ingest (0: all).")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=4, help="Also measure a warehouse holding this many copies of the vectors.")
    parser.add_argument("--side", choices=["ew", "numpy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        task = json.load(sys.stdin)
        json.dump((run_ew if args.side == "ew" else run_numpy)(task), sys.stdout)
        return

    flags = cpu_flags()["vector_flags"]
    print(f"CPU flags: {' '.join(flags) or 'unknown'}")
    build(args.docs)
    task = {**queries(args.queries, args.seed), "k": args.k}
    from warehouse import Warehouse

    result = {
        "config": {"docs": args.docs or "all", "model": task["model"], "layer": task["layer"], "queries": args.queries,
                   "k": args.k, "seed": args.seed, "warehouse_version": Warehouse.open(WAREHOUSE).snapshot().version,
                   "copies": args.copies, "cpu_flags": flags},
        "embed_ms_per_query": round(task["embed_ms_per_query"], 2),
        "runs": [],
    }
    print(f"{args.queries} queries, k={args.k}, model {task['model']} layer {task['layer']}; "
          f"embedding a query: {task['embed_ms_per_query']:.1f} ms")
    for copies, warehouse in [(1, WAREHOUSE)] + ([(args.copies, build_copies(args.copies))] if args.copies > 1 else []):
        ew, numpy = side("ew", {**task, "warehouse": str(warehouse)}), side("numpy", {**task, "warehouse": str(warehouse)})
        same, gap = agreement(ew, numpy)
        run = {
            "copies": copies, "vectors": numpy["vectors"],
            "ew_queries_per_s": round(ew["queries_per_s"], 2), "numpy_queries_per_s": round(numpy["queries_per_s"], 2),
            "numpy_load_seconds": round(numpy["load_seconds"], 3),
            "ew_peak_rss_mb": round(ew["peak_rss_mb"], 1), "numpy_peak_rss_mb": round(numpy["peak_rss_mb"], 1),
            "rss_after_imports_mb": round(ew["rss_after_imports_mb"], 1),
            # With copies, equal vectors tie: the sets may differ at the k-th place, the scores may not.
            "same_top_k_share": same, "max_score_difference": gap, "load_average_1min": round(os.getloadavg()[0], 2),
        }
        result["runs"].append(run)
        print(f"{run['vectors']:,} vectors: ew search (DuckDB, streamed) {run['ew_queries_per_s']:.2f} queries/s, "
              f"peak RSS {run['ew_peak_rss_mb']:.0f} MB | NumPy (in memory) {run['numpy_queries_per_s']:.2f} queries/s, "
              f"peak RSS {run['numpy_peak_rss_mb']:.0f} MB, loaded in {run['numpy_load_seconds']:.2f} s | "
              f"same top-{args.k} {same:.0%}, max score difference {gap:.2g} (both after imports: "
              f"{run['rss_after_imports_mb']:.0f} MB)")
    print(f"wrote {save('search', result)}")


if __name__ == "__main__":
    main()
