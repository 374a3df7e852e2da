"""Ingest speed and storage: ew beside sentence-transformers, on the same documents, model and threads.

    python -m bench.ingest [--docs 5000] [--threads N] [--batch-size 32]

Prints and writes (bench/results/ingest.json): ingest documents/s, SentenceTransformer.encode
documents/s and their ratio; re-ingest of the unchanged corpus / first ingest; stored bytes
per vector / (4 x dim); the cosine of ew's last-layer vectors to sentence-transformers'.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.ingest import ingest
from pipelines.models import resolve_model
from pipelines.registry import prepare_model
from warehouse import Warehouse
from warehouse.query import usable_cores
from warehouse.tables import EMBEDDINGS

from .common import debian_records, save, write_jsonl


def stored_bytes(warehouse: Warehouse) -> int:
    """Bytes of the live Parquet files of the embeddings table."""
    from deltalake import DeltaTable

    actions = DeltaTable(str(warehouse.table_path(EMBEDDINGS))).get_add_actions(flatten=True)
    return int(sum(actions.column("size_bytes").to_pylist()))


def sentence_transformers_rate(model_dir: Path, texts: list[str], *, threads: int, batch_size: int, max_length: int):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = max_length
    model.encode(texts[:64], batch_size=batch_size)  # warm-up, as ew's export check warms onnxruntime
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return len(texts) / (time.perf_counter() - started), vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()

    records = debian_records(limit=args.docs, seed=0)
    texts = [r["text"] for r in records]
    source = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="ew-bench-") as scratch:
        corpus = write_jsonl(records, Path(scratch) / "debian.jsonl")
        wh = Warehouse.open(Path(scratch) / "wh", create=True)
        started = time.perf_counter()
        with wh.writer() as writer:
            prepared = prepare_model(writer, args.model)
        export_seconds = time.perf_counter() - started

        st_rate, st_vectors = sentence_transformers_rate(
            source.path, texts, threads=args.threads, batch_size=args.batch_size, max_length=source.max_length
        )
        first = ingest(wh, corpus, model=prepared.key, batch_size=args.batch_size, threads=args.threads, progress=False)
        again = ingest(wh, corpus, model=prepared.key, batch_size=args.batch_size, threads=args.threads, progress=False)
        ew_rate = first.read / first.seconds

        last = wh.query(
            f"select d.id, e.embedding from documents d join embeddings e using (doc_hash) "
            f"where e.model = '{prepared.key}' and e.layer = {source.num_layers}"
        ).read_all()
        ours = dict(zip(last.column("id").to_pylist(), last.column("embedding").to_pylist()))
        mine = np.array([ours[r["id"]] for r in records], dtype=np.float32)
        cosines = (mine * st_vectors).sum(1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(st_vectors, axis=1))
        vector_rows = wh.query(f"select count(*) as n from embeddings where model = '{prepared.key}'").read_all().column("n")[0].as_py()
        bytes_per_vector = stored_bytes(wh) / vector_rows

    result = {
        "config": {"docs": len(records), "model": prepared.key, "threads": args.threads, "batch_size": args.batch_size,
                   "max_length": source.max_length, "layers_stored": source.num_layers + 1},
        "export_seconds": round(export_seconds, 2),
        "ew_ingest_docs_per_s": round(ew_rate, 1),
        "sentence_transformers_docs_per_s": round(st_rate, 1),
        "ratio_ew_over_st": round(ew_rate / st_rate, 3),
        "first_ingest_seconds": first.seconds,
        "reingest_seconds": again.seconds,
        "reingest_over_first": round(again.seconds / first.seconds, 4),
        "reingest_embedded": again.embedded,
        "embedded": first.embedded,
        "duplicates": first.duplicates,
        "truncated": first.truncated,
        "bytes_per_vector": round(bytes_per_vector, 1),
        "bytes_per_vector_over_4dim": round(bytes_per_vector / (4 * source.dim), 4),
        "min_cosine_last_layer_vs_st": float(cosines.min()),
        "mean_cosine_last_layer_vs_st": float(cosines.mean()),
        "warehouse_version": first.version,
    }
    path = save("ingest", result)
    print(f"ingest ({len(records)} Debian docs, {prepared.key}, {args.threads} threads, all {source.num_layers + 1} layers stored)")
    print(f"  ew ingest                      {ew_rate:8.1f} docs/s")
    print(f"  SentenceTransformer.encode     {st_rate:8.1f} docs/s (last layer only)")
    print(f"  ratio ew / sentence-transformers {ew_rate / st_rate:6.2f}x")
    print(f"  re-ingest / first ingest       {again.seconds:.2f}s / {first.seconds:.2f}s = {again.seconds / first.seconds:.2%}")
    print(f"  stored bytes per vector / 4*dim {bytes_per_vector / (4 * source.dim):.3f}")
    print(f"  cosine to sentence-transformers (last layer) min {cosines.min():.6f}, mean {cosines.mean():.6f}")
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
