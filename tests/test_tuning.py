"""fit-head above layer K on cached token states: train, register, predict, export."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from pipelines.fitting import fit_head
from pipelines.head_catalog import list_heads, open_head
from pipelines.prediction import predict
from warehouse import EwError, Warehouse


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, states_ingested):
    """A copy of the layer-1 states warehouse with a `top` head and a `lora` head trained above layer 1."""
    root = tmp_path_factory.mktemp("tuned") / "wh"
    shutil.copytree(states_ingested.root, root)
    wh = Warehouse.open(root)
    top = fit_head(wh, label="section", from_layer=1, tune="top", epochs=2, name="top-head", split="60,20,20")
    lora = fit_head(wh, label="section", from_layer=1, tune="lora", lora_rank=2, epochs=2, name="lora-head",
                    split="60,20,20")
    return wh, top, lora


def test_top_and_lora_heads_are_trained_registered_and_described(tuned):
    wh, top, lora = tuned
    assert (top.tune, top.from_layer, lora.tune) == ("top", 1, "lora")
    assert 0 < lora.trainable_parameters < top.trainable_parameters
    assert top.train + top.val + top.test == 40 and top.embedded == 0 and top.reused == 40
    rows = {row.head: row for row in list_heads(wh)}
    assert set(rows) == {"top-head", "lora-head"}
    card = open_head(wh, "lora-head").card
    assert (card.tune, card.from_layer, card.top["rank"]) == ("lora", 1, 2)
    assert card.hyperparameters["state_precision"] == "fp16"
    assert card.hyperparameters["lr"] == 1e-3  # pretrained layers keep the lower default (heads on vectors: 1e-2)
    assert (wh.root / rows["top-head"].artifact / "report.png").is_file()


def test_predict_gives_the_same_answer_for_cached_and_uncached_documents(tuned, tmp_path):
    wh, _, _ = tuned
    texts = [row["text"] for row in wh.query("select text from documents order by id limit 6").read_all().to_pylist()]
    corpus = tmp_path / "mixed.jsonl"
    # The same texts twice: once as stored (their states are cached), once with a trailing
    # space (a new doc_hash, so its states are computed through the encoder up to layer 1).
    corpus.write_text("".join(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(texts))
                      + "".join(json.dumps({"id": f"u{i}", "text": t + " "}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "p.parquet"
    result = predict(wh, "top-head", corpus_file=corpus, output=out)
    assert (result.rows, result.reused, result.embedded) == (12, 6, 6)
    table = pq.read_table(out).to_pylist()
    cached, uncached = table[:6], table[6:]
    for a, b in zip(cached, uncached):
        assert a["predicted_section"] == b["predicted_section"]
        assert abs(a["probability"] - b["probability"]) < 2e-3  # the tokenizer drops the trailing space
    stored = predict(wh, "lora-head", where="section is not null", output=tmp_path / "s.csv")
    assert stored.rows == 40 and stored.embedded == 0


def test_export_head_writes_onnx_that_agrees_with_predict(tuned, tmp_path):
    import onnxruntime as ort
    from tokenizers import Tokenizer

    wh, _, _ = tuned
    out = tmp_path / "serve" / "top.onnx"
    result = CliRunner().invoke(cli, ["-w", str(wh.root), "export-head", "top-head", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out} (") and (out.parent / "tokenizer.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes, not 0600
    text = wh.query("select text from documents order by id limit 1").read_all().to_pylist()[0]["text"]
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"id": "x", "text": text}) + "\n")
    predict(wh, "top-head", corpus_file=corpus, output=tmp_path / "one.parquet")
    expected = pq.read_table(tmp_path / "one.parquet").to_pylist()[0]
    tokenizer = Tokenizer.from_file(str(out.parent / "tokenizer.json"))
    tokenizer.enable_truncation(16)
    encoding = tokenizer.encode(text)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": [encoding.ids], "attention_mask": [encoding.attention_mask], "token_type_ids": [encoding.type_ids]}
    names = [i.name for i in session.get_inputs()]
    (probabilities,) = session.run(None, {n: np.array(feeds[n], dtype=np.int64) for n in names})
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    assert classes[int(probabilities[0].argmax())] == expected["predicted_section"]
    assert abs(float(probabilities[0].max()) - expected["probability"]) < 2e-3


def test_from_layer_auto_compares_the_cached_layers(tuned):
    wh, _, _ = tuned
    result = fit_head(wh, label="section", from_layer="auto", tune="lora", epochs=1, name="auto-head", split="60,20,20")
    assert result.from_layer == 1 and set(result.layer_scores) == {1}


def test_errors_say_what_to_do(tuned):
    wh, _, _ = tuned
    with pytest.raises(EwError, match="--tune must be one of top, lora"):
        fit_head(wh, label="section", from_layer=1, tune="full", name="bad")
    with pytest.raises(EwError, match="--from-layer 9 does not exist; model .* has layers 0..2"):
        fit_head(wh, label="section", from_layer=9, name="bad")
    with pytest.raises(EwError, match="--token-states 0"):
        fit_head(wh, label="section", from_layer=0, name="bad")  # no states graph for layer 0 yet
