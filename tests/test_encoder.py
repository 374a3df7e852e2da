import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.encoder import ArtifactError, EncodedBatch, Encoder, length_batches
from warehouse.errors import EwError

REPO = Path(__file__).resolve().parents[1]
# shared/ sits beside the checkout (CI clones it there too); /work/shared on the developers' machines.
DEBIAN = next((p for p in (Path(__file__).resolve().parents[2] / "shared/data/debian_packages.jsonl.gz",
                           Path("/work/shared/data/debian_packages.jsonl.gz")) if p.is_file()),
              Path("/work/shared/data/debian_packages.jsonl.gz"))
TEXTS = [
    "a game",
    "the python library for data files and text in the warehouse of the model layer",
    "",
    "tool",
    "data and text and files and tools for python with a game on the layer",
]


@pytest.fixture(scope="module")
def encoder(tiny_artifact) -> Encoder:
    return Encoder.load(tiny_artifact, threads=1)


def test_encode_returns_every_layer_in_input_order(encoder):
    result = encoder.encode(TEXTS, batch_size=2)
    assert isinstance(result, EncodedBatch)
    assert result.vectors.shape == (5, 3, 32) and result.vectors.dtype == np.float32
    # Batches are formed by token length; each row must still belong to its own text.
    for text, row in zip(TEXTS, result.vectors):
        np.testing.assert_allclose(row, encoder.encode([text]).vectors[0], atol=1e-5)


def test_batch_size_does_not_change_vectors(encoder):
    one_batch = encoder.encode(TEXTS, batch_size=32).vectors
    np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=1).vectors, one_batch, atol=1e-5)


def test_token_budget_does_not_change_vectors_or_order(encoder):
    one_batch = encoder.encode(TEXTS, batch_size=32).vectors
    seen = []
    tight = encoder.encode(TEXTS, batch_size=32, batch_tokens=8, on_progress=seen.append)
    np.testing.assert_allclose(tight.vectors, one_batch, atol=1e-5)
    assert sum(seen) == len(TEXTS) and len(seen) > 1  # progress per batch, every text once


def test_batches_run_side_by_side_give_the_same_numbers_in_input_order(encoder, tiny_artifact):
    texts = [f"{TEXTS[i % len(TEXTS)]} {i} " * (1 + i % 7) for i in range(40)]
    alone = encoder.encode(texts, batch_size=2).vectors
    seen = []
    lanes = Encoder.load(tiny_artifact, threads=3).encode(texts, batch_size=2, on_progress=seen.append)
    np.testing.assert_array_equal(lanes.vectors, alone)  # one thread per batch either way: the same sums
    assert sum(seen) == len(texts) and len(seen) == 20


def test_an_error_while_batches_run_side_by_side_stops_the_encoding_and_surfaces(tiny_artifact):
    encoder = Encoder.load(tiny_artifact, threads=2)
    texts = [f"text {i} " * (1 + i % 5) for i in range(30)]

    def interrupt(_rows):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encoder.encode(texts, batch_size=2, on_progress=interrupt)
    assert encoder.encode(texts, batch_size=2).vectors.shape == (30, 3, 32)  # the encoder is still usable


def test_length_batches_cover_each_text_once_longest_first_within_budget():
    lengths = np.array([5, 40, 7, 40, 3, 12, 12, 1])
    batches = length_batches(lengths, batch_size=3, batch_tokens=30)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert lengths[flat].tolist() == sorted(lengths.tolist(), reverse=True)
    assert flat[:2].tolist() == [1, 3] and flat[2:4].tolist() == [5, 6]  # ties keep input order
    for rows in batches:
        assert len(rows) <= 3
        assert len(rows) == 1 or len(rows) * lengths[rows].max() <= 30  # one text longer than the budget goes alone
    assert length_batches(np.array([], dtype=np.int64), batch_size=4) == []


@pytest.mark.parametrize("option", [{"batch_size": 0}, {"batch_tokens": 0}])
def test_batching_options_below_one_raise(encoder, option):
    with pytest.raises(EwError, match="at least 1"):
        encoder.encode(TEXTS, **option)


def test_texts_longer_than_max_length_are_flagged(encoder):
    texts = ["the game", "the " * 14, "the " * 15, "data " * 500]  # max_length 16 = 14 words + [CLS] + [SEP]
    result = encoder.encode(texts)
    assert result.truncated.tolist() == [False, False, True, True]
    lengths, truncated = encoder.token_lengths(texts)
    assert lengths.tolist() == [4, 16, 16, 16] and truncated.tolist() == result.truncated.tolist()


def test_empty_input_gives_empty_arrays(encoder):
    result = encoder.encode([])
    assert result.vectors.shape == (0, 3, 32) and result.truncated.shape == (0,)


def test_attributes_come_from_the_card(encoder):
    assert (encoder.dim, encoder.num_layers, encoder.max_length, encoder.pooling) == (32, 2, 16, "mean")
    assert encoder.key == encoder.card.key


@pytest.mark.parametrize("damage", ["model.json", "model.onnx", "tokenizer.json"])
def test_missing_or_corrupt_artifact_raises(tiny_artifact, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    (broken / damage).write_bytes(b"not what it should be")
    with pytest.raises(ArtifactError, match=damage):
        Encoder.load(broken)
    (broken / damage).unlink()
    with pytest.raises(ArtifactError, match=f"{damage} is missing"):
        Encoder.load(broken)


def test_no_artifact_directory_raises_an_ew_error(tmp_path):
    with pytest.raises(EwError, match="is missing"):
        Encoder.load(tmp_path / "nothing-here")


def test_resolving_and_inference_never_import_torch_or_transformers(tiny_artifact, tiny_bert_dir):
    script = (
        "import sys\n"
        "from pipelines.encoder import Encoder\n"
        "from pipelines.models import resolve_model\n"
        f"resolve_model({str(tiny_bert_dir)!r})\n"
        f"Encoder.load({str(tiny_artifact)!r}).encode(['a game', 'the data'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from pipelines.export import export_model
    from pipelines.models import resolve_model

    source = resolve_model("minilm")
    report = export_model(source, tmp_path / source.key)
    with gzip.open(DEBIAN, "rt") as lines:
        texts = [json.loads(line)["text"] for _, line in zip(range(64), lines)]
    ours = Encoder.load(report.path).encode(texts).vectors[:, -1]  # last layer, mean pooled
    theirs = SentenceTransformer(str(source.path), device="cpu").encode(texts)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.9999
