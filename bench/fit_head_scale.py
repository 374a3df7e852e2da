"""Peak memory of ew fit-head as the warehouse grows, beside loading the vectors into NumPy.

    python -m bench.fit_head_scale [--factors 1,2,4,8] [--epochs 2]

Builds warehouses holding 1x, 2x, 4x, 8x the Debian corpus's stored MiniLM vectors (copy c
of a document gets its own doc_hash and id, its own corpus `copy<c>`, the same text, label
and vector), then measures the peak RSS of `ew fit-head --label section` on each, beside the
peak RSS of what a user would do without ew: read the vectors of that model/layer from the
Delta table into one NumPy matrix (deltalake + pyarrow), before any training. ew's peak
should stay flat while the in-memory one grows with the data. (Accuracy is printed but means
little here: copies of one text have different doc_hashes, so they fall into different
splits.) Needs the Debian warehouse of
`python -m bench.fit_head` (bench/.warehouse); writes bench/results/fit_head_scale.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from warehouse import Warehouse
from warehouse.catalog import ModelRow
from warehouse.keys import doc_hash as hash_text
from warehouse.tables import DOCUMENTS, EMBEDDINGS, MODELS

from .common import save

HERE = Path(__file__).resolve().parent
LOAD_INTO_NUMPY = """
import sys, numpy as np
from deltalake import DeltaTable
table = DeltaTable(sys.argv[1] + "/embeddings").to_pyarrow_table(
    partitions=[("model", "=", sys.argv[2]), ("layer", "=", sys.argv[3])], columns=["doc_hash", "embedding"])
matrix = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(table.num_rows, -1)
print(matrix.shape[0])
"""


# Runs ``-m MODULE ARGS`` or ``-c CODE ARGS`` as python would, then prints the process's own peak RSS
# (VmHWM) on stderr at exit: wait4's ru_maxrss would also count the parent's RSS at the spawn
# (Linux carries the pre-exec peak into it; see bench.common.peak_rss_mb).
REPORTING_PEAK = """
import atexit, runpy, sys
from bench.common import peak_rss_mb
atexit.register(lambda: print(f"ew-bench-peak-rss-mb {peak_rss_mb()}", file=sys.stderr))
how, what, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
if how == "-m":
    sys.argv = [what, *rest]
    runpy.run_module(what, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})
"""


def peak_rss_mb(how: str, what: str, *args: str) -> tuple[float, str, float]:
    """Run ``python HOW WHAT ARGS`` (``-m module`` or ``-c code``); its own peak RSS in MB, stdout, seconds."""
    command = [sys.executable, "-c", REPORTING_PEAK, how, what, *args]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.run(command, stdout=out, stderr=err, text=True, cwd=HERE.parent)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        errors = err.read()
        if child.returncode:
            raise SystemExit(f"python {how} {what[:40]} ... failed:\n{errors}")
        peak = [line.split()[1] for line in errors.splitlines() if line.startswith("ew-bench-peak-rss-mb ")]
        return float(peak[-1]), out.read(), seconds


def build(source: Warehouse, target: Path, *, factor: int, model: str, layer: int) -> Warehouse:
    """A warehouse holding ``factor`` copies of ``source``'s labelled documents and their vectors."""
    wh = Warehouse.open(target, create=True)
    if wh.snapshot().version is not None and wh.current_dataset(MODELS).count_rows():
        return wh
    docs = source.current_dataset(DOCUMENTS).to_table(columns=["corpus", "id", "doc_hash", "text", "record_hash", "section"])
    vectors = source.current_dataset(EMBEDDINGS).to_table(
        columns=["doc_hash", "model", "layer", "pooling", "embedding"],
        filter=(pc.field("model") == model) & (pc.field("layer") == layer),
    )
    models = source.current_dataset(MODELS).to_table().filter(pc.field("model") == model)
    with wh.writer() as writer:
        writer.register_model(ModelRow.from_dict(models.to_pylist()[0]))
        for copy in range(factor):
            def renamed(hashes: pa.ChunkedArray) -> pa.Array:
                return pa.array([hash_text(f"copy {copy} of {h}") for h in hashes.to_pylist()])

            writer.upsert_documents(
                docs.set_column(0, "corpus", pa.array([f"copy{copy}"] * docs.num_rows))
                .set_column(2, "doc_hash", renamed(docs.column("doc_hash")))
            )
            writer.append_embeddings(vectors.set_column(0, "doc_hash", renamed(vectors.column("doc_hash"))))
            writer.commit("bench-copy", {"copy": copy})
    return wh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=HERE / ".warehouse")
    parser.add_argument("--factors", default="1,2,4,8")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    source = Warehouse.open(args.source)
    model = source.current_dataset(MODELS).to_table().column("model")[0].as_py()
    layer = 6
    rows = []
    for factor in (int(f) for f in args.factors.split(",")):
        target = HERE / ".scale" / f"x{factor}"
        wh = build(source, target, factor=factor, model=model, layer=layer)
        ew_mb, out, ew_seconds = peak_rss_mb(
            "-m", "pipelines.cli", "-w", str(target), "fit-head", "--label", "section",
            "--epochs", str(args.epochs), "--name", f"scale-{int(time.time())}", "--json")
        fit = json.loads(out)
        numpy_mb, loaded, numpy_seconds = peak_rss_mb("-c", LOAD_INTO_NUMPY, str(wh.root), model, str(layer))
        row = {"factor": factor, "rows": fit["train"] + fit["val"] + fit["test"], "vectors_in_numpy": int(loaded),
               "ew_fit_head_peak_rss_mb": round(ew_mb, 1), "ew_fit_head_seconds": round(ew_seconds, 1),
               "numpy_load_peak_rss_mb": round(numpy_mb, 1), "numpy_load_seconds": round(numpy_seconds, 1),
               "ew_over_numpy": round(ew_mb / numpy_mb, 3), "accuracy": fit["accuracy"]}
        rows.append(row)
        print(f"  x{factor}: {row['rows']:,} rows  ew fit-head peak {ew_mb:,.0f} MB ({ew_seconds:.0f}s)  "
              f"NumPy load alone peak {numpy_mb:,.0f} MB  ratio {ew_mb / numpy_mb:.2f}x")
    growth = rows[-1]["ew_fit_head_peak_rss_mb"] / rows[0]["ew_fit_head_peak_rss_mb"]
    grown = rows[-1]["numpy_load_peak_rss_mb"] / rows[0]["numpy_load_peak_rss_mb"]
    data_growth = rows[-1]["rows"] / rows[0]["rows"]
    print(f"data x{data_growth:.1f}: ew fit-head peak RSS x{growth:.2f}, NumPy load peak RSS x{grown:.2f}")
    path = save("fit_head_scale", {"config": {"model": model, "layer": layer, "label": "section", "epochs": args.epochs},
                                   "sizes": rows, "data_growth": round(data_growth, 2),
                                   "ew_peak_growth": round(growth, 3), "numpy_peak_growth": round(grown, 3)})
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
