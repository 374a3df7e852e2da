"""Keys that identify documents and models.

``doc_hash``: hex SHA-256 of the UTF-8 bytes of the text after Unicode NFC normalization.
Nothing else is normalized: case and whitespace matter.

A model key is ``<name>-<fingerprint>``: a readable slug of the model's name and the first
12 hex digits of a fingerprint over everything that changes its vectors.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path

FINGERPRINT_CHARS = 12
_SLUG_BAD = re.compile(r"[^a-z0-9]+")


def doc_hash(text: str) -> str:
    """Hex SHA-256 of the NFC-normalized text.

    >>> doc_hash("caf\\u00e9") == doc_hash("cafe\\u0301")
    True
    """
    return hashlib.sha256(unicodedata.normalize("NFC", text).encode("utf-8")).hexdigest()


def _tagged(value: object) -> object:
    """Type-tag values so that 1, 1.0, "1" and True hash differently."""
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, str):
        return ["str", value]
    if value is None:
        return ["none"]
    if isinstance(value, Mapping):
        return ["map", [[str(k), _tagged(v)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]]
    if isinstance(value, (list, tuple)):
        return ["list", [_tagged(v) for v in value]]
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}")


def fingerprint(parts: Mapping[str, object]) -> str:
    """Hex SHA-256 over type-tagged, key-sorted parts.

    >>> fingerprint({"a": 1}) != fingerprint({"a": "1"})
    True
    """
    canonical = json.dumps(_tagged(dict(parts)), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def file_digest(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def slug(name: str) -> str:
    """A lowercase, folder-safe form of a model name: ``sentence-transformers/all-MiniLM-L6-v2`` -> ``all-minilm-l6-v2``."""
    last = name.rstrip("/").split("/")[-1] or name
    return _SLUG_BAD.sub("-", last.lower()).strip("-") or "model"


def model_key(name: str, model_fingerprint: str) -> str:
    """``<slug>-<first 12 hex digits of the fingerprint>``; safe as a Hive partition value."""
    return f"{slug(name)}-{model_fingerprint[:FINGERPRINT_CHARS]}"


def record_hash(record: Mapping[str, object]) -> str:
    """Fingerprint of a whole input record, to skip rewriting rows that did not change."""
    return fingerprint(record)
