"""ew's pipelines: encoders, ingest, heads, prediction, and the `ew` command line.

    from pipelines import ingest, fit_head, predict
"""
from .fitting import FitResult, fit_head, list_heads
from .ingest import IngestResult, ingest
from .prediction import PredictResult, predict

__all__ = ["FitResult", "IngestResult", "PredictResult", "fit_head", "ingest", "list_heads", "predict"]
