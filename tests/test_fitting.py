import json

import numpy as np
import pytest

from pipelines.fitting import fit_head
from pipelines.head_catalog import list_heads
from pipelines.heads import load_head
from pipelines.ingest import ingest
from warehouse import EwError, SelectionError
from pipelines.errors import HeadError, UnknownModelKeyError


def test_fit_head_stores_a_self_describing_head(fitted):
    [row] = list_heads(fitted)
    head = load_head(fitted.root / row.artifact)
    card = head.card
    assert card.label == "section" and card.model == row.model and card.layer == row.layer
    assert card.classes == row.classes and len(card.classes) == 4
    assert card.split["train"] == 80 and card.split["seed"] == 0
    assert card.trained_on_version == row.trained_on_version
    assert card.hyperparameters["lr"] == 1e-2 and card.hyperparameters["kind"] == "ensemble" == card.config.kind
    assert card.hyperparameters["standardize"] and card.hyperparameters["select"] == "macro_f1"
    assert card.hyperparameters["class_weight"] == "none" and card.hyperparameters["patience"] == 10
    assert set(card.hyperparameters["members"]) == {"mlp", "linear", "ensemble"}
    assert set(card.metrics) >= {"accuracy", "macro_f1", "per_class", "confusion"}
    assert row.card_dict() == card.to_dict()  # the catalog row carries the card as stored
    assert (fitted.root / row.artifact / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    probabilities = head.predict_proba(np.zeros((2, 32), dtype=np.float32))
    assert probabilities.shape == (2, 4) and np.allclose(probabilities.sum(1), 1)
    viewed = fitted.query("select head, label, accuracy from heads").read_all().to_pylist()
    assert viewed == [{"head": row.head, "label": "section", "accuracy": row.accuracy}]


def test_same_seed_same_head(warehouse_copy):
    first = fit_head(warehouse_copy, label="section", name="one", epochs=3)
    second = fit_head(warehouse_copy, label="section", name="two", epochs=3)
    a = load_head(first.path).weights
    b = load_head(second.path).weights
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (first.train, first.val, first.test) == (second.train, second.val, second.test)


def test_fit_head_embeds_only_what_is_missing_and_reuses_the_rest(warehouse_copy, tmp_path, tiny_bert_dir):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"id": f"x{i}", "text": f"extra text {i}", "section": "libs"}) + "\n" for i in range(10)))
    before = warehouse_copy.latest_version()
    ingest(warehouse_copy, extra, model=str(tiny_bert_dir), layers="0")
    without = fit_head(warehouse_copy, label="section", name="without", epochs=2, version=warehouse_copy.latest_version())
    assert (without.embedded, without.no_vector) == (0, 10)
    result = fit_head(warehouse_copy, label="section", name="grown", epochs=2)
    assert result.no_vector == 0
    assert result.embedded == 10 and result.reused > 0
    again = fit_head(warehouse_copy, label="section", name="again", epochs=2)
    assert again.embedded == 0 and again.reused == result.reused + 10
    pinned = fit_head(warehouse_copy, label="section", name="pinned", epochs=2, version=before)
    assert pinned.version == before and pinned.embedded == 0
    assert pinned.train + pinned.val + pinned.test == result.reused


def test_json_summary_and_errors(warehouse_copy):
    result = fit_head(warehouse_copy, label="section", kind="linear", epochs=2, name="lin")
    data = result.to_dict()
    for key in ("head", "accuracy", "macro_f1", "train", "val", "test", "reused", "embedded", "seconds", "report"):
        assert key in data
    with pytest.raises(SelectionError, match="no label column 'colour'"):
        fit_head(warehouse_copy, label="colour")
    with pytest.raises(HeadError, match="already exists"):
        fit_head(warehouse_copy, label="section", name="lin")
    with pytest.raises(HeadError, match="val split is empty"):
        fit_head(warehouse_copy, label="section", split="90,0,10", name="noval")
    with pytest.raises(HeadError, match="no document has both"):
        fit_head(warehouse_copy, label="section", where="section = 'nothing'", name="none")
    with pytest.raises(UnknownModelKeyError, match="registered:"):
        fit_head(warehouse_copy, label="section", model="nope")
    with pytest.raises(EwError, match="no model with cls pooling"):
        fit_head(warehouse_copy, label="section", pooling="cls")
    with pytest.raises(EwError, match="layers 0..2"):
        fit_head(warehouse_copy, label="section", layer=7)


def test_ctrl_c_stops_training_stores_nothing_and_exits_130(warehouse_copy):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    command = [sys.executable, "-m", "pipelines.cli", "-w", str(warehouse_copy.root), "fit-head", "--label", "section",
               "--name", "interrupted", "--epochs", "100000", "--patience", "0", "--batch-size", "1", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[1])
    # Into training: torch is loaded (it is imported when training starts), then long enough for
    # its import to finish on a loaded machine (an interrupted import of torch is another test).
    deadline = time.time() + 60
    while time.time() < deadline and "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text():
        time.sleep(0.2)
    time.sleep(8)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 130, (out, err)
    assert err.count("\n") == 1 and err.startswith("Interrupted"), err
    assert [row.head for row in list_heads(warehouse_copy)] == []
    assert not list(warehouse_copy.heads_dir().glob("interrupted*")) if warehouse_copy.heads_dir().exists() else True


def test_layer_auto_probes_every_stored_layer_and_trains_on_the_best(warehouse_copy):
    from pipelines.layer_choice import LAYER_SCORE, stored_layers

    layers = stored_layers(warehouse_copy, model=warehouse_copy.models()[0].model, pooling="mean")
    assert layers == [0, 1, 2]
    result = fit_head(warehouse_copy, label="section", layer="auto", name="auto", epochs=2)
    scores = result.layer_scores
    assert sorted(scores) == layers
    key = lambda layer: (scores[layer]["val_accuracy"] + scores[layer]["val_macro_f1"], layer)
    assert result.layer == max(layers, key=key)
    card = load_head(result.path).card
    assert card.layer == result.layer and card.hyperparameters["layer"] == "auto"
    assert card.hyperparameters["layer_scores"] == {str(layer): score for layer, score in scores.items()}
    assert card.hyperparameters["layer_score"] == LAYER_SCORE
    fixed = fit_head(warehouse_copy, label="section", layer=result.layer, name="fixed", epochs=2)
    assert (fixed.accuracy, fixed.macro_f1) == (result.accuracy, result.macro_f1)  # the same head as a fixed --layer


def test_layer_auto_is_printed_per_layer(warehouse_copy):
    from click.testing import CliRunner
    from pipelines.cli import cli

    done = CliRunner().invoke(cli, ["-w", str(warehouse_copy.root), "fit-head", "--label", "section", "--layer", "auto",
                                    "--epochs", "1", "--name", "auto-cli"])
    assert done.exit_code == 0, done.output
    lines = [line for line in done.output.splitlines() if line.startswith("--layer auto:")]
    assert len(lines) == 3 and sum(line.endswith("<- chosen") for line in lines) == 1
    assert lines[0].startswith("--layer auto: layer 0: validation accuracy ")
    bad = CliRunner().invoke(cli, ["-w", str(warehouse_copy.root), "fit-head", "--label", "section", "--layer", "best"])
    assert bad.exit_code == 2 and "'best' is not a layer number or 'auto'" in bad.output
