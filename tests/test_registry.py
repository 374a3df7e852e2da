"""The model registry: which registered model a name, key prefix or alias refers to."""
from datetime import datetime, timezone

import pytest

from pipelines.errors import UnknownModelKeyError
from pipelines.registry import find_model, model_row
from warehouse import EwError, Warehouse
from warehouse.catalog import ModelRow


def row(key: str, name: str, pooling: str = "mean") -> ModelRow:
    return ModelRow(model=key, name=name, source="test", fingerprint=key[-12:] * 5, dim=8, num_layers=2,
                    max_length=16, pooling=pooling, precision="fp32", max_abs_diff=0.0,
                    artifact=f"artifacts/models/{key}", created_at=datetime.now(timezone.utc))


@pytest.fixture
def wh(tmp_path):
    wh = Warehouse.open(tmp_path / "wh", create=True)
    with wh.writer() as writer:
        for model in (row("all-minilm-l6-v2-aaaaaaaaaaaa", "sentence-transformers/all-MiniLM-L6-v2"),
                      row("all-minilm-l6-v2-bbbbbbbbbbbb", "sentence-transformers/all-MiniLM-L6-v2", "cls"),
                      row("tiny-cccccccccccc", "tiny")):
            writer.register_model(model)
        writer.commit("register-model")
    return wh


def test_a_full_key_a_unique_prefix_or_a_name(wh):
    assert find_model(wh, "tiny-cccccccccccc").model == "tiny-cccccccccccc"
    assert find_model(wh, "tiny").model == "tiny-cccccccccccc"
    assert find_model(wh, "all-minilm-l6-v2", pooling="cls").model == "all-minilm-l6-v2-bbbbbbbbbbbb"


def test_an_alias_resolves_to_its_models_slug(wh):
    assert find_model(wh, "minilm", pooling="mean").model == "all-minilm-l6-v2-aaaaaaaaaaaa"


def test_an_ambiguous_prefix_names_the_candidates(wh):
    with pytest.raises(EwError, match="matches several models .*all-minilm-l6-v2-aaaaaaaaaaaa.*pass a full key"):
        find_model(wh, "minilm")


def test_no_name_needs_a_single_model(wh):
    with pytest.raises(EwError, match="holds 3 models .*choose one with --model"):
        find_model(wh, None)
    assert find_model(wh, None, pooling="cls").model == "all-minilm-l6-v2-bbbbbbbbbbbb"


def test_unknown_names_list_the_registered_keys(wh):
    with pytest.raises(UnknownModelKeyError, match="no model 'bert' in this warehouse \\(registered: all-minilm"):
        find_model(wh, "bert")
    with pytest.raises(UnknownModelKeyError, match="registered: "):
        model_row(wh, "tiny")  # model_row wants the exact key
    assert model_row(wh, "tiny-cccccccccccc").name == "tiny"


def test_a_pooling_nobody_has_says_how_to_get_it(tmp_path):
    wh = Warehouse.open(tmp_path / "one", create=True)
    with wh.writer() as writer:
        writer.register_model(row("tiny-cccccccccccc", "tiny"))
        writer.commit("register-model")
    with pytest.raises(EwError, match="no model with cls pooling .*ingest with --pooling cls first"):
        find_model(wh, None, pooling="cls")
