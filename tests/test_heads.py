"""Heads: build, save, load, apply with NumPy only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.heads import HeadCard, HeadConfig, build_head, fold_standardization, load_head, save_head, standardized_head
from pipelines.errors import HeadError, MissingDependencyError

CLASSES = ["intro", "methods", "results"]


def head_card(config: HeadConfig, **changes) -> HeadCard:
    return HeadCard(name="section", config=config, classes=tuple(CLASSES), model="m-000000000000", layer=2,
                    pooling="mean", label="section", trained_on_version=0, **changes)


def saved_head(tmp_path: Path, *, kind: str = "mlp", activation: str = "gelu"):
    config = HeadConfig(kind=kind, input_dim=16, num_classes=3, hidden=8, activation=activation)
    torch.manual_seed(0)
    module = build_head(config).eval()
    save_head(tmp_path / "section", module, head_card(config, hyperparameters={"seed": 0}))
    return tmp_path / "section", module, config


def edit_card(directory: Path, change, *, old_format: bool = False) -> None:
    """Change head.json in place; ``old_format`` makes it a format-1 card (no digest over the card)."""
    card_path = directory / "head.json"
    card = json.loads(card_path.read_text())
    change(card)
    if old_format:
        card["format"] = 1
        card.pop("digest", None)
    card_path.write_text(json.dumps(card))


def test_round_trip_keeps_card_config_and_weights(tmp_path):
    directory, module, config = saved_head(tmp_path)
    head = load_head(directory)
    assert head.config == config
    assert head.classes == CLASSES
    assert head.card.hyperparameters["seed"] == 0 and head.card.format == 2
    assert head.card.parameters == 16 * 8 + 8 + 8 * 3 + 3
    for name, tensor in module.state_dict().items():
        np.testing.assert_array_equal(head.weights[name], tensor.numpy())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["section"]  # no temp dir left


@pytest.mark.parametrize("kind, activation", [("mlp", "gelu"), ("mlp", "relu"), ("linear", "gelu")])
def test_numpy_predict_proba_matches_torch(tmp_path, kind, activation):
    directory, module, _ = saved_head(tmp_path, kind=kind, activation=activation)
    x = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32) * 3
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(x)), dim=1).numpy()
    probabilities = load_head(directory).predict_proba(x)
    assert probabilities.dtype == np.float32 and probabilities.shape == (50, 3)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(load_head(directory).predict(x), expected.argmax(1))


def test_loading_and_predicting_need_no_torch(tmp_path):
    directory, _, _ = saved_head(tmp_path)
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from pipelines.heads import load_head\n"
        f"p = load_head({str(directory)!r}).predict_proba(np.zeros((2, 16), np.float32))\n"
        "assert p.shape == (2, 3)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])


def test_build_head_without_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError, match=r"ew\[train\]"):
        build_head(HeadConfig(kind="linear", input_dim=4, num_classes=2))


def test_refuses_to_overwrite(tmp_path):
    directory, module, config = saved_head(tmp_path)
    before = (directory / "head.safetensors").read_bytes()
    with pytest.raises(HeadError, match="pick another --name"):
        save_head(directory, module, head_card(config))
    assert (directory / "head.safetensors").read_bytes() == before


def test_files_are_safetensors_and_json_not_pickle(tmp_path):
    from safetensors.numpy import load_file

    directory, _, _ = saved_head(tmp_path)
    assert sorted(path.name for path in directory.iterdir()) == ["head.json", "head.safetensors"]
    assert set(load_file(str(directory / "head.safetensors"))) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    json.loads((directory / "head.json").read_text())
    for path in directory.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # pickle protocol 2+ opcode
    source = (Path(__file__).parents[1] / "pipelines" / "heads.py").read_text()
    assert "torch.load" not in source and "import pickle" not in source


def test_linear_head_is_logistic_regression():
    config = HeadConfig(kind="linear", input_dim=384, num_classes=60)
    module = build_head(config)
    assert sum(p.numel() for p in module.parameters()) == config.parameters == 384 * 60 + 60


def test_missing_or_corrupt_files_raise_head_error_with_the_path(tmp_path):
    with pytest.raises(HeadError, match="no head at"):
        load_head(tmp_path / "nope")

    directory, _, _ = saved_head(tmp_path)
    weights = directory / "head.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(HeadError, match=str(weights)):
        load_head(directory)
    (directory / "head.json").write_text("{not json")
    with pytest.raises(HeadError, match="head.json is corrupt"):
        load_head(directory)
    weights.unlink()
    with pytest.raises(HeadError, match="head.safetensors is missing"):
        load_head(directory)


def test_corrupt_weights_without_digest_still_raise(tmp_path):
    directory, _, _ = saved_head(tmp_path)
    edit_card(directory, lambda card: card.pop("weights_sha256"), old_format=True)
    (directory / "head.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(HeadError, match="corrupt"):
        load_head(directory)


def test_shape_mismatch_raises(tmp_path):
    directory, _, _ = saved_head(tmp_path)
    edit_card(directory, lambda card: card["config"].update(input_dim=32), old_format=True)
    with pytest.raises(HeadError, match=r"hidden.weight has shape \(8, 16\)"):
        load_head(directory)
    edit_card(directory, lambda card: card["config"].update(input_dim=16))
    with pytest.raises(HeadError, match=r"shape \(N, 16\), got \(2, 384\)"):
        load_head(directory).predict_proba(np.zeros((2, 384), np.float32))


def test_bad_config_is_a_head_error():
    with pytest.raises(HeadError, match="unknown head kind"):
        HeadConfig(kind="transformer", input_dim=4, num_classes=2)
    with pytest.raises(HeadError, match="at least 2 classes"):
        HeadConfig(kind="mlp", input_dim=4, num_classes=1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda card: card.pop("model"), "lacks model; the card was damaged"),
        (lambda card: card.pop("label"), "lacks label"),
        (lambda card: card.update(layer="2"), "'layer' must be an integer"),
        (lambda card: card.update(classes=["intro", "intro", "results"]), "names a class twice"),
        (lambda card: card.update(layer=5), "does not match its digest: its model, layer"),
        (lambda card: card.update(model="other-000000000000"), "does not match its digest"),
        (lambda card: card.update(format=7), "has format 7"),
    ],
)
def test_a_tampered_card_is_refused_with_what_is_wrong(tmp_path, change, message):
    directory, _, _ = saved_head(tmp_path)
    edit_card(directory, change)
    with pytest.raises(HeadError, match=message):
        load_head(directory)


def test_nan_weights_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory, _, _ = saved_head(tmp_path)
    weights = load_file(str(directory / "head.safetensors"))
    weights["out.bias"][0] = np.nan
    save_file(weights, str(directory / "head.safetensors"))
    edit_card(directory, lambda card: card.pop("weights_sha256"), old_format=True)
    with pytest.raises(HeadError, match="out.bias holds NaN or infinite values"):
        load_head(directory)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_standardization_is_folded_into_the_saved_weights(tmp_path, kind):
    # Vectors far from 0 and of uneven scale, as intermediate layers give.
    rng = np.random.default_rng(3)
    mean, std = rng.normal(scale=5, size=16), rng.uniform(0.05, 20, size=16)
    x = (mean + std * rng.normal(size=(40, 16))).astype(np.float32)
    config = HeadConfig(kind=kind, input_dim=16, num_classes=3, hidden=8)
    torch.manual_seed(0)
    module = standardized_head(config, mean, std).eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()  # (x - mean) / std, then the head
        plain = fold_standardization(module)
    assert set(plain.state_dict()) == set(config.weight_shapes())  # nothing new to store or check
    save_head(tmp_path / "scaled", plain, head_card(config))
    head = load_head(tmp_path / "scaled")
    np.testing.assert_allclose(head.logits(x), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(head.predict(x), expected.argmax(1))


def test_standardized_head_starts_from_build_heads_weights():
    config = HeadConfig(kind="mlp", input_dim=16, num_classes=3, hidden=8)
    torch.manual_seed(0)
    plain = build_head(config)
    torch.manual_seed(0)
    scaled = standardized_head(config, np.zeros(16), np.ones(16))
    assert all(torch.equal(plain.state_dict()[name], tensor) for name, tensor in scaled.head.state_dict().items())
    with pytest.raises(HeadError, match="positive std of 16 values"):
        standardized_head(config, np.zeros(16), np.zeros(16))


@pytest.mark.parametrize("old_format", [True, False])
def test_heads_written_before_standardization_still_load_and_predict(tmp_path, old_format):
    directory, module, _ = saved_head(tmp_path)

    def as_before(card):  # what fit-head wrote before: no select/standardize/class_weight, no val_macro_f1
        card["hyperparameters"] = {"kind": "mlp", "hidden": 8, "lr": 0.001, "patience": 3, "seed": 0}
        card["history"] = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5, "seconds": 0.1}]
    edit_card(directory, as_before, old_format=old_format)
    x = np.random.default_rng(1).normal(size=(20, 16)).astype(np.float32)
    head = load_head(directory)
    assert head.card.format == (1 if old_format else 2)
    with torch.no_grad():
        np.testing.assert_array_equal(head.predict(x), module(torch.from_numpy(x)).argmax(1).numpy())


def test_ensemble_head_averages_its_members_probabilities_in_torch_and_numpy(tmp_path):
    config = HeadConfig(kind="ensemble", input_dim=16, num_classes=3, hidden=8)
    torch.manual_seed(0)
    module = build_head(config).eval()
    assert set(module.state_dict()) == set(config.weight_shapes())
    assert config.parameters == HeadConfig("mlp", 16, 3, hidden=8).parameters + HeadConfig("linear", 16, 3).parameters
    save_head(tmp_path / "both", module, head_card(config))
    head = load_head(tmp_path / "both")
    x = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32) * 3
    with torch.no_grad():
        members = [torch.softmax(module[kind](torch.from_numpy(x)), dim=1).numpy() for kind in ("mlp", "linear")]
        expected = torch.softmax(module(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(expected, (members[0] + members[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(head.predict_proba(x), expected, atol=1e-5)
    np.testing.assert_array_equal(head.predict(x), expected.argmax(1))
