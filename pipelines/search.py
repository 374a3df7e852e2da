"""`ew search`: embed a text with a stored model and find the nearest stored documents.

    found = search(Warehouse.open("ew-warehouse"), "python bindings for a C library", k=5)
    for row in found.rows: print(row.rank, f"{row.score:.3f}", row.corpus, row.id)

The query is encoded by the model's own ONNX artifact (onnxruntime, no torch), so its vector
is comparable with the stored ones; the search itself is :func:`warehouse.similarity.nearest`.
"""
from __future__ import annotations

from warehouse import Warehouse
from warehouse.catalog import ModelRow
from warehouse.errors import EwError
from warehouse.selection import DocumentFilter
from warehouse.similarity import Neighbours, nearest

from .encoder import Encoder
from .registry import find_model, open_model


def resolve_layer(row: ModelRow, layer: int | None) -> int:
    """``layer``, checked against the model, or its last layer when None (fit-head's default)."""
    layer = row.num_layers if layer is None else layer
    if not 0 <= layer <= row.num_layers:
        raise EwError(f"--layer {layer} does not exist; model {row.model} has layers 0..{row.num_layers}")
    return layer


def search(
    warehouse: Warehouse,
    text: str,
    *,
    model: str | None = None,
    layer: int | None = None,
    k: int = 10,
    corpus: str | None = None,
    where: str | None = None,
    version: int | None = None,
    threads: int | None = None,
) -> Neighbours:
    """The ``k`` stored documents nearest ``text`` by cosine similarity of ``model``'s ``layer`` vectors.

    ``model`` is a registered key, unique key prefix or alias (default: the only model stored);
    ``layer`` defaults to the last; ``corpus`` and ``where`` (SQL over documents) narrow the candidates.
    """
    if not text.strip():
        raise EwError("the search text is empty; pass the text to look for, e.g. ew search \"python web framework\"")
    warehouse.snapshot(version)  # an unknown version fails before the model loads
    row = find_model(warehouse, model)
    layer = resolve_layer(row, layer)
    encoder = Encoder.load(open_model(warehouse, row.model).artifact, threads=threads)
    vector = encoder.encode([text]).vectors[0, layer]  # (dim,)
    return nearest(warehouse, vector, model=row.model, layer=layer, pooling=row.pooling, k=k,
                   documents=DocumentFilter(corpus=corpus, where=where), version=version, threads=threads)
