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
    assert card.hyperparameters["lr"] == 1e-3 and card.hyperparameters["kind"] == "mlp"
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
               "--name", "interrupted", "--epochs", "100000", "--patience", "0", "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[1])
    # Into training: torch is loaded (it is imported when training starts), then a little more.
    deadline = time.time() + 60
    while time.time() < deadline and "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text():
        time.sleep(0.2)
    time.sleep(3)
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
