"""ew's pipelines: encoders, ingest, heads, prediction, and the `ew` command line.

    from pipelines.ingest import ingest
    from pipelines import fit_head, predict

(`ingest` is not re-exported here: the name belongs to the module `pipelines.ingest`.)
The names below load on first use, so `ew` starts fast and a Ctrl-C at start-up meets its
error boundary rather than an import.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "FitResult": "fitting",
    "fit_head": "fitting",
    "list_heads": "head_catalog",
    "IngestResult": "ingest",
    "PredictResult": "prediction",
    "predict": "prediction",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
