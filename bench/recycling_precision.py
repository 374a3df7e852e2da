"""Does the fp16 token-state cache change what a trained top predicts? The same heads, fed both caches.

    python -m bench.recycling_precision

`python -m bench.recycling` trains `--tune top` twice, on the fp16 cache and on the fp32 one, and
compares the two heads' test accuracy. That difference mixes two things: what fp16 states cost,
and that the rounding sets the second training on a path of its own, as another seed would.
This bench separates them: it feeds each of those two trained heads the test split's layer-K
states from both caches and counts the test predictions that change. It reads the warehouse
bench.recycling kept (bench/.recycling/warehouse) and the heads named in
bench/results/recycling.json; writes bench/results/recycling_precision.json.
"""
from __future__ import annotations

import json

import numpy as np

from pipelines.recycling import load_top_head, pad_states
from warehouse import Warehouse
from warehouse.splits import SplitSpec
from warehouse.tables import states_matrix

from .common import RESULTS, save
from .recycling import WORK

BATCH = 32


def predictions(head, states: list[np.ndarray]) -> np.ndarray:
    """The class index the head predicts for each document's (n_tokens, dim) states."""
    out = []
    for start in range(0, len(states), BATCH):
        x, mask = pad_states([s.astype(np.float32) for s in states[start : start + BATCH]])
        out.append(head.predict_proba(x, mask).argmax(axis=1))
    return np.concatenate(out)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    measured = json.loads((RESULTS / "recycling.json").read_text())
    config = measured["config"]
    heads = {row["row"]: row["head"] for row in measured["rows"] if row["row"] in ("top", "top fp32")}
    wh = Warehouse.open(WORK / "warehouse")
    spec = SplitSpec.parse(config["split"], seed=config["seed"])
    labels = {row["doc_hash"]: row["section"] for row in wh.query(
        "select distinct doc_hash, section from documents where section is not null").read_all().to_pylist()}
    test = sorted(key for key in labels if spec.split_of(key) == "test")
    caches: dict[str, dict[str, np.ndarray]] = {"fp16": {}, "fp32": {}}
    for row in wh.query(f"select doc_hash, precision, n_tokens, dim, states from token_states "
                        f"where layer = {config['from_layer']}").read_all().to_pylist():
        caches[row["precision"]][row["doc_hash"]] = states_matrix(row)
    test = [key for key in test if key in caches["fp16"] and key in caches["fp32"]]
    weights = wh.artifact_path(wh.models()[0].artifact) / "torch"
    truth = [labels[key] for key in test]

    report = {"test_documents": len(test), "from_layer": config["from_layer"], "heads": {}}
    for row, name in heads.items():
        catalog = next(entry for entry in wh.heads() if entry.head == name)
        head = load_top_head(wh.artifact_path(catalog.artifact), weights_dir=weights)
        predicted = {precision: predictions(head, [cache[key] for key in test]) for precision, cache in caches.items()}
        accuracy = {precision: float(np.mean([head.classes[i] == y for i, y in zip(found, truth)]))
                    for precision, found in predicted.items()}
        changed = int((predicted["fp16"] != predicted["fp32"]).sum())
        report["heads"][row] = {"head": name, "accuracy_on_fp16_states": round(accuracy["fp16"], 4),
                                "accuracy_on_fp32_states": round(accuracy["fp32"], 4), "predictions_changed": changed}
        print(f"{row:9s} ({name}): test accuracy on fp16 states {accuracy['fp16']:.4f}, on fp32 states "
              f"{accuracy['fp32']:.4f}; {changed} of {len(test)} predictions change")
    path = save("recycling_precision", report)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
