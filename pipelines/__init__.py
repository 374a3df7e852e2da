"""ew's pipelines: encoders, ingest, heads, prediction, and the `ew` command line.

    from pipelines.ingest import ingest
    from pipelines import fit_head, predict

(`ingest` is not re-exported here: the name belongs to the module `pipelines.ingest`.)
"""
from .fitting import FitResult, fit_head
from .head_catalog import list_heads
from .ingest import IngestResult
from .prediction import PredictResult, predict

__all__ = ["FitResult", "IngestResult", "PredictResult", "fit_head", "list_heads", "predict"]
