"""What every benchmark shares: the Debian corpus, the machine, and the JSON result file."""
from __future__ import annotations

import gzip
import json
import os
import platform
import random
import resource
from importlib import metadata
from datetime import datetime, timezone
from pathlib import Path


DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "debian_packages.jsonl.gz"
RESULTS = Path(__file__).resolve().parent / "results"


def debian_records(*, limit: int | None = None, seed: int = 0) -> list[dict]:
    """The Debian corpus (a seeded sample of ``limit`` records, or all of it)."""
    if not DATA.is_file():
        raise SystemExit(f"the benchmark corpus {DATA} is missing (it ships in ../shared/data)")
    with gzip.open(DATA, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    return records


def write_jsonl(records: list[dict], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def cpu_flags() -> dict:
    """The CPU's model and flags (the vector ones apart: they decide torch's and onnxruntime's kernels)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        capability = None
    return {"model": model, "usable_cores": len(os.sched_getaffinity(0)), "torch_capability": capability,
            "vector_flags": [f for f in flags if f.startswith(("avx", "fma", "amx", "sse4", "f16c"))], "flags": flags}


def versions() -> dict:
    """The versions of ew and of what it is measured against."""
    found = {}
    for package in ("ew", "onnxruntime", "torch", "transformers", "tokenizers", "sentence-transformers", "scikit-learn",
                    "duckdb", "deltalake"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def peak_rss_mb() -> float:
    """This process's own peak RSS in MB. VmHWM, not ru_maxrss: Linux carries the pre-exec peak into
    ru_maxrss, so a child started by spawn or subprocess reports its parent's RSS at the start (a child
    of an 800 MB parent read 813 MB from ru_maxrss, 15 MB from VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:  # not Linux: ru_maxrss, which may include the parent's
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "measured_at": datetime.now(timezone.utc).isoformat(), "machine": machine(),
              "versions": versions(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
