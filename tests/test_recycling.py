"""pipelines/top.py, pipelines/recycling.py and pipelines/head_export.py on the tiny random BERT (2 layers, hidden 32)."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipelines.errors import ExportError, HeadError
from pipelines.head_export import export_head
from pipelines.heads import HeadCard, HeadConfig, build_head, load_head, save_head
from pipelines.recycling import load_top_head, pad_states, save_top_head, train_top
from pipelines.top import TopConfig, build_lower, build_top, load_base_tensors
from pipelines.training import TrainConfig

K = 1
CLASSES = ("even", "odd")


@pytest.fixture(scope="module")
def documents(tiny_bert_dir):
    """48 token-id documents of 3-14 tokens; the label is whether token 7 appears (learnable from states)."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[2], rng.integers(5, 40, size=rng.integers(1, 12)), [3]]) for _ in range(48)]
    labels = np.array([int(7 in doc) for doc in docs], dtype=np.int64)
    lower = build_lower(tiny_bert_dir, K)
    with torch.inference_mode():  # the cache: real tokens only, (n_tokens, D) per document
        states = [lower(torch.tensor(doc)[None], torch.ones(1, len(doc), dtype=torch.long))[0].numpy() for doc in docs]
    return docs, labels, states, lower


def _batches(documents, rows, *, from_text, seed):
    docs, labels, states, _ = documents
    order = np.random.default_rng(seed).permutation(rows) if seed is not None else np.asarray(rows)
    for start in range(0, len(order), 8):
        take = order[start:start + 8]
        padded, mask = pad_states([states[i] for i in take])
        if from_text:
            ids = np.zeros_like(mask)
            for row, i in enumerate(take):
                ids[row, :len(docs[i])] = docs[i]
            yield (ids, mask, np.zeros_like(mask)), labels[take]
        else:
            yield (padded, mask), labels[take]


def _train(tiny_bert_dir, documents, *, tune="top", from_layer=K, from_text=False, epochs=3, **top):
    train, val = list(range(32)), list(range(32, 48))
    return train_top(
        tiny_bert_dir, top=TopConfig(from_layer=from_layer, tune=tune, **top),
        train_batches=lambda epoch: _batches(documents, train, from_text=from_text, seed=epoch),
        val_batches=lambda: _batches(documents, val, from_text=from_text, seed=None),
        steps_per_epoch=4, num_classes=2, config=TrainConfig(kind="linear", epochs=epochs, lr=1e-2, patience=0),
        lower=documents[3] if from_text else None,
    )


def _card(name="top-head", model="tiny"):
    return HeadCard(name=name, config=HeadConfig(kind="linear", input_dim=32, num_classes=2), classes=CLASSES,
                    model=model, layer=K, pooling="mean", label="parity", trained_on_version=1)


def test_top_model_matches_transformers(tiny_bert_dir, documents):
    from transformers import BertModel

    model = BertModel.from_pretrained(str(tiny_bert_dir), attn_implementation="eager").eval()
    top = build_top(tiny_bert_dir, TopConfig(from_layer=K), HeadConfig(kind="linear", input_dim=32, num_classes=2)).eval()
    (states, mask), _ = next(_batches(documents, range(8), from_text=False, seed=None))
    (ids, _, _), _ = next(_batches(documents, range(8), from_text=True, seed=None))
    with torch.inference_mode():
        last = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        ours = top.encoder.layer["1"](torch.tensor(states), (1.0 - torch.tensor(mask)[:, None, None, :]) * -3.4e38)
    real = torch.tensor(mask).bool()
    assert torch.allclose(last[real], ours[real], atol=1e-5)


def test_training_on_cached_states_matches_recomputing_from_text(tiny_bert_dir, documents):
    cached = _train(tiny_bert_dir, documents)
    recomputed = _train(tiny_bert_dir, documents, from_text=True)
    for a, b in zip(cached.history, recomputed.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-5)
        assert a.val_loss == pytest.approx(b.val_loss, abs=1e-5)
    assert cached.history[-1].train_loss < cached.history[0].train_loss
    for name, tensor in cached.module.state_dict().items():
        assert torch.allclose(tensor, recomputed.module.state_dict()[name], atol=1e-4), name


def test_same_seed_same_batches_same_weights(tiny_bert_dir, documents):
    first, second = (_train(tiny_bert_dir, documents, tune="lora", epochs=2) for _ in range(2))
    for name, tensor in first.module.state_dict().items():
        assert torch.equal(tensor, second.module.state_dict()[name]), name


def test_lora_leaves_the_base_bit_identical_and_trains_adapters(tiny_bert_dir, documents):
    result = _train(tiny_bert_dir, documents, tune="lora", rank=2)
    state = result.module.state_dict()
    base_names = [n for n in state if n.startswith("encoder.") and ".lora_" not in n]
    base = load_base_tensors(tiny_bert_dir, base_names)
    assert base_names and all(torch.equal(state[n], base[n]) for n in base_names)
    adapters = [n for n in state if ".lora_B" in n]
    assert {n.split(".attention.self.")[1] for n in adapters} == {"query.lora_B", "value.lora_B"}
    assert all(state[n].abs().sum() > 0 for n in adapters)  # B starts at zero: training moved it
    assert state["encoder.layer.1.attention.self.query.lora_A"].shape == (2, 32)
    assert result.trainable_parameters == 2 * (2 * 32 + 32 * 2) + 32 * 2 + 2


def test_top_trains_the_layer_weights(tiny_bert_dir, documents):
    result = _train(tiny_bert_dir, documents, epochs=1)
    name = "encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(result.module.state_dict()[name], load_base_tensors(tiny_bert_dir, [name])[name])
    layer = sum(p.numel() for p in result.module.encoder.parameters())
    assert result.trainable_parameters == layer + 32 * 2 + 2


def test_from_layer_n_trains_the_head_only(tiny_bert_dir, documents):
    docs, labels, _, _ = documents
    lower = build_lower(tiny_bert_dir, 2)
    with torch.inference_mode():
        states = [lower(torch.tensor(d)[None], torch.ones(1, len(d), dtype=torch.long))[0].numpy() for d in docs]
    result = _train(tiny_bert_dir, (docs, labels, states, lower), from_layer=2)
    assert result.trainable_parameters == 32 * 2 + 2
    assert len(result.module.encoder.layer) == 0
    with pytest.raises(HeadError, match="past the model's last layer"):
        _train(tiny_bert_dir, documents, from_layer=3)


@pytest.mark.parametrize("tune", ["top", "lora"])
def test_saving_stores_only_trained_tensors_and_reloads_identically(tmp_path, tiny_bert_dir, documents, tune):
    from safetensors.numpy import load_file

    result = _train(tiny_bert_dir, documents, tune=tune, epochs=1)
    card = save_top_head(tmp_path / "head", result, _card(), weights_dir=tiny_bert_dir)
    stored = set(load_file(str(tmp_path / "head" / "head.safetensors")))
    trained = {n for n, p in result.module.named_parameters() if p.requires_grad}
    assert stored == trained and {"head.out.weight", "head.out.bias"} <= stored
    if tune == "lora":
        assert all(".lora_" in n for n in stored - {"head.out.weight", "head.out.bias"})
    saved = json.loads((tmp_path / "head" / "head.json").read_text())
    assert (saved["format"], saved["tune"], saved["from_layer"], saved["layer"]) == (3, tune, K, K)
    assert saved["parameters"] == card.top["trainable_parameters"] == result.trainable_parameters
    assert card.row(artifact="heads/x", created_at=__import__("datetime").datetime.now()).kind == f"{tune}+linear"

    loaded = load_top_head(tmp_path / "head", weights_dir=tiny_bert_dir)
    (states, mask), _ = next(_batches(documents, range(16), from_text=False, seed=None))
    with torch.inference_mode():
        expected = torch.softmax(result.module(torch.tensor(states), torch.tensor(mask)), dim=-1).numpy()
    assert np.array_equal(loaded.predict_proba(states, mask), expected)
    with pytest.raises(HeadError, match="reads token states"):
        load_head(tmp_path / "head")


def test_loading_refuses_other_base_weights(tmp_path, tiny_bert_dir, documents):
    result = _train(tiny_bert_dir, documents, tune="lora", epochs=1)
    save_top_head(tmp_path / "head", result, _card(), weights_dir=tiny_bert_dir)
    other = tmp_path / "other"
    shutil.copytree(tiny_bert_dir, other)
    _rewrite_weights(other, lambda name, t: t + 1 if name.endswith("query.bias") else t)
    with pytest.raises(HeadError, match="other base weights"):
        load_top_head(tmp_path / "head", weights_dir=other)


def _rewrite_weights(directory, change, prefix=""):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    save_file({prefix + n: change(n, t).contiguous() for n, t in tensors.items() if change(n, t) is not None},
              str(directory / "model.safetensors"))


def test_prefixed_checkpoints_load_and_missing_tensors_are_refused(tmp_path, tiny_bert_dir):
    head = HeadConfig(kind="linear", input_dim=32, num_classes=2)
    torch.manual_seed(0)
    plain = build_top(tiny_bert_dir, TopConfig(from_layer=K), head)
    prefixed = tmp_path / "prefixed"
    shutil.copytree(tiny_bert_dir, prefixed)
    _rewrite_weights(prefixed, lambda n, t: t, prefix="bert.")
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 build_top(prefixed, TopConfig(from_layer=K), head).state_dict().values()))
    _rewrite_weights(prefixed, lambda n, t: None if n.endswith("layer.1.output.dense.weight") else t)
    with pytest.raises(HeadError, match=r"lacks 1 tensors .*encoder.layer.1.output.dense.weight"):
        build_top(prefixed, TopConfig(from_layer=K), head)


def _onnx_probabilities(path, artifact, texts):
    import onnxruntime

    from pipelines.head_export import _sample_feeds
    from pipelines.artifacts import ModelCard

    card = ModelCard.load(artifact)
    feeds = _sample_feeds(artifact, card)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: feeds[n] for n in card.input_names})[0], feeds


def test_plain_head_export_agrees_with_ew_encoder_and_head(tmp_path, tiny_artifact, tiny_bert_dir):
    from pipelines.artifacts import ModelCard
    from pipelines.encoder import Encoder
    from pipelines.tracing import SAMPLE_TEXTS

    key = ModelCard.load(tiny_artifact).key
    torch.manual_seed(1)
    config = HeadConfig(kind="mlp", input_dim=32, num_classes=2, hidden=8)
    save_head(tmp_path / "plain", build_head(config).eval(), HeadCard(
        name="plain", config=config, classes=CLASSES, model=key, layer=1, pooling="mean", label="x", trained_on_version=1))
    report = export_head(tmp_path / "plain", tmp_path / "out" / "plain.onnx", artifact_dir=tiny_artifact,
                         weights_dir=tiny_bert_dir)
    assert report.max_abs_diff <= report.tolerance and (tmp_path / "out" / "tokenizer.json").is_file()
    probabilities, _ = _onnx_probabilities(report.path, tiny_artifact, SAMPLE_TEXTS)
    pooled = Encoder.load(tiny_artifact).encode(list(SAMPLE_TEXTS), batch_size=8).vectors[:, 1]  # (B, D) layer 1
    assert np.abs(probabilities - load_head(tmp_path / "plain").predict_proba(pooled)).max() < 1e-4
    with pytest.raises(ExportError, match="already exists"):
        export_head(tmp_path / "plain", report.path, artifact_dir=tiny_artifact, weights_dir=tiny_bert_dir)


def test_top_head_export_agrees_with_torch(tmp_path, tiny_artifact, tiny_bert_dir, documents):
    import onnx

    from pipelines.artifacts import ModelCard

    result = _train(tiny_bert_dir, documents, tune="lora", epochs=1)
    save_top_head(tmp_path / "lora", result, _card(model=ModelCard.load(tiny_artifact).key), weights_dir=tiny_bert_dir)
    report = export_head(tmp_path / "lora", tmp_path / "lora.onnx", artifact_dir=tiny_artifact, weights_dir=tiny_bert_dir)
    probabilities, feeds = _onnx_probabilities(report.path, tiny_artifact, None)
    lower = build_lower(tiny_bert_dir, K)
    head = load_top_head(tmp_path / "lora", weights_dir=tiny_bert_dir)
    with torch.inference_mode():
        states = lower(torch.tensor(feeds["input_ids"]), torch.tensor(feeds["attention_mask"])).numpy()
    assert np.abs(probabilities - head.predict_proba(states, feeds["attention_mask"])).max() < 1e-4
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    metadata = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert json.loads(metadata["classes"]) == list(CLASSES)


def test_export_refuses_a_head_of_another_model(tmp_path, tiny_artifact, tiny_bert_dir, documents):
    result = _train(tiny_bert_dir, documents, tune="lora", epochs=1)
    save_top_head(tmp_path / "lora", result, _card(model="other-model"), weights_dir=tiny_bert_dir)
    with pytest.raises(HeadError, match="reads model 'other-model'"):
        export_head(tmp_path / "lora", tmp_path / "x.onnx", artifact_dir=tiny_artifact, weights_dir=tiny_bert_dir)


@pytest.mark.parametrize("change, message", [
    ({"tune": "top"}, "does not match its digest"),
    ({"from_layer": 0}, "'from_layer' must equal 'layer'"),
    ({"format": 2}, "unknown to this ew"),
])
def test_a_changed_top_card_is_refused(tmp_path, tiny_bert_dir, documents, change, message):
    result = _train(tiny_bert_dir, documents, tune="lora", epochs=1)
    save_top_head(tmp_path / "head", result, _card(), weights_dir=tiny_bert_dir)
    path = tmp_path / "head" / "head.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(HeadError, match=message):
        load_top_head(tmp_path / "head", weights_dir=tiny_bert_dir)
