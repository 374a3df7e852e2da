"""Stored vector precision: fp16 beside fp32 on the same documents, bytes and head accuracy.

    python -m bench.vector_precision [--docs 2000] [--layers last] [--threads N]

Ingests the same Debian documents into one warehouse twice, with ``--vector-precision fp32``
and ``fp16`` (two model keys), then fits a default ``section`` head on each model's last layer
(same split and seed). Prints and writes (bench/results/vector_precision.json): stored bytes per
vector of each, their ratio, the heads' test accuracy and its difference in points, and the
least cosine between a stored fp16 vector and its fp32 twin. Targets (issue 12): bytes ratio
<= 0.5, accuracy within 0.2 points.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from pipelines.fitting import fit_head
from pipelines.ingest import ingest
from warehouse import Warehouse
from warehouse.query import usable_cores
from warehouse.tables import EMBEDDINGS

from .common import debian_records, save, write_jsonl

PRECISIONS = ("fp32", "fp16")


def model_bytes(warehouse: Warehouse, model: str) -> tuple[int, int]:
    """Bytes of the live Parquet files of ``model``'s partitions of the embeddings table, and of
    their vector columns alone (compressed column chunks of ``embedding`` and ``embedding_fp16``)."""
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    storage = warehouse.storage
    table = DeltaTable(storage.table_uri(EMBEDDINGS), storage_options=storage.storage_options)
    actions = table.get_add_actions(flatten=True)
    columns = [actions.column(name).to_pylist() for name in ("size_bytes", "path", "partition.model")]
    files = [(size, path) for size, path, key in zip(*columns) if key == model]
    vector_bytes = 0
    for _, path in files:
        metadata = pq.ParquetFile(storage.fs_path(f"{storage.table_uri(EMBEDDINGS)}/{path}"), filesystem=storage.fs).metadata
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                if chunk.path_in_schema.startswith("embedding"):
                    vector_bytes += chunk.total_compressed_size
    return sum(size for size, _ in files), vector_bytes


def _last_layer_vectors(warehouse: Warehouse, model: str, layer: int) -> dict[str, np.ndarray]:
    """doc_hash -> float32 vector, as `ew query` reads them (fp16 decoded by the embeddings view)."""
    table = warehouse.query(f"select doc_hash, embedding from embeddings where model = '{model}' and layer = {layer}").read_all()
    matrix = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(table.num_rows, -1)
    return dict(zip(table.column("doc_hash").to_pylist(), matrix))


def fp16_storage(*, docs: int = 2000, model: str = "minilm", layers: str = "last", threads: int | None = None,
                 seed: int = 0, records: list[dict] | None = None) -> dict:
    """Ingest ``docs`` Debian documents as fp32 and as fp16 vectors and fit a default `section` head on each.

    Returns bytes per vector of each, ``bytes_ratio`` (fp16 / fp32), each head's test accuracy and
    ``accuracy_delta_points`` (fp16 - fp32, in points), and the least cosine between the two.
    """
    records = records if records is not None else debian_records(limit=docs, seed=seed)
    threads = threads or usable_cores()
    result: dict = {"config": {"docs": len(records), "model": model, "layers": layers, "threads": threads, "seed": seed}}
    with tempfile.TemporaryDirectory(prefix="ew-bench-") as scratch:
        corpus = write_jsonl(records, Path(scratch) / "debian.jsonl")
        wh = Warehouse.open(Path(scratch) / "wh", create=True)
        keys, vectors = {}, {}
        for precision in PRECISIONS:
            run = ingest(wh, corpus, model=model, layers=layers, vector_precision=precision, threads=threads,
                         progress=False)
            keys[precision] = run.model
            layer = max(run.layers)
            rows = wh.query(f"select count(*) from embeddings where model = '{run.model}'").read_all().column(0)[0].as_py()
            head = fit_head(wh, label="section", model=run.model, layer=layer, seed=seed, threads=threads)
            vectors[precision] = _last_layer_vectors(wh, run.model, layer)
            total, vector_columns = model_bytes(wh, run.model)
            result[precision] = {"model": run.model, "ingest_seconds": run.seconds, "vectors": rows,
                                 "bytes_per_vector": round(total / rows, 1),
                                 "vector_column_bytes_per_vector": round(vector_columns / rows, 1),
                                 "test_accuracy": round(head.accuracy, 4), "test_macro_f1": round(head.macro_f1, 4)}
        exact = np.stack([vectors["fp32"][key] for key in vectors["fp16"]]).astype(np.float64)
        stored = np.stack(list(vectors["fp16"].values())).astype(np.float64)
        cosine = (exact * stored).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(stored, axis=1))
    result["bytes_ratio"] = round(result["fp16"]["bytes_per_vector"] / result["fp32"]["bytes_per_vector"], 4)
    result["vector_column_bytes_ratio"] = round(result["fp16"]["vector_column_bytes_per_vector"]
                                                / result["fp32"]["vector_column_bytes_per_vector"], 4)
    result["accuracy_delta_points"] = round(100 * (result["fp16"]["test_accuracy"] - result["fp32"]["test_accuracy"]), 2)
    result["min_cosine_fp16_vs_fp32"] = float(cosine.min())
    result["max_abs_diff_fp16_vs_fp32"] = float(np.abs(exact - stored).max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--layers", default="last")
    parser.add_argument("--threads", type=int, default=usable_cores())
    args = parser.parse_args()
    result = fp16_storage(docs=args.docs, model=args.model, layers=args.layers, threads=args.threads)
    path = save("vector_precision", result)
    print(f"stored vector precision ({result['config']['docs']} Debian docs, {args.model}, layers {args.layers})")
    for precision in PRECISIONS:
        row = result[precision]
        print(f"  {precision}: {row['bytes_per_vector']:8.1f} bytes/vector ({row['vector_column_bytes_per_vector']:.1f} in the "
              f"vector column), section head test accuracy "
              f"{row['test_accuracy']:.4f} (macro-F1 {row['test_macro_f1']:.4f})")
    print(f"  fp16 / fp32 bytes {result['bytes_ratio']:.3f} (target <= 0.5; vector column alone "
          f"{result['vector_column_bytes_ratio']:.3f}); accuracy difference "
          f"{result['accuracy_delta_points']:+.2f} points (target within 0.2)")
    print(f"  fp16 vs fp32 vectors: min cosine {result['min_cosine_fp16_vs_fp32']:.7f}, "
          f"max |diff| {result['max_abs_diff_fp16_vs_fp32']:.2e}")
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
