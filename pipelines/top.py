"""The model above layer K: encoder layers K..N-1 (optionally with LoRA adapters), pooling, a head.

Hugging Face's ``hidden_states[k]`` is the output of ``encoder.layer[k-1]`` (``hidden_states[0]``
the embeddings), so a model reading layer-K token states runs ``encoder.layer[K:]``. The layers
are transformers' own ``BertLayer`` modules, built from the base model's ``config.json`` and
loaded strictly from its ``model.safetensors`` (every tensor of those layers present, none left
random); state-dict names are the checkpoint's own (``encoder.layer.4.attention.self.query.weight``),
so a saved tensor names the base tensor it replaces.

>>> top = build_top(Path("artifact/torch"), TopConfig(from_layer=4, tune="lora"), head_config)  # doctest: +SKIP
>>> logits = top(states, mask)        # (B, T, D) float32, (B, T) -> (B, C)            # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import HeadError
from pipelines.head_card import HeadConfig
from pipelines.heads import build_head, require_torch

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
POOLINGS = ("mean", "cls")
# LoRA targets, by the short name a card records -> the Linear inside a BertLayer.
LORA_TARGETS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}


@dataclass(frozen=True)
class TopConfig:
    from_layer: int  # K: reads hidden_states[K] and runs encoder.layer[K:]; K = N runs no layer
    tune: str = "top"  # "top": layers + head train; "lora": layers frozen, adapters + head train; "head": no layer
    pooling: str = "mean"  # "mean": masked sum / clamped count (ew's export); "cls": token 0
    rank: int = 4  # lora only: R
    alpha: float = 8.0  # lora only: adapters are scaled by alpha / R
    targets: tuple[str, ...] = ("query", "value")  # lora only: keys of LORA_TARGETS

    def __post_init__(self) -> None:
        if self.tune not in ("top", "lora", "head"):
            raise HeadError(f"unknown tune {self.tune!r}: choose top or lora")
        if self.pooling not in POOLINGS:
            raise HeadError(f"unknown pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if isinstance(self.from_layer, bool) or not isinstance(self.from_layer, int) or self.from_layer < 0:
            raise HeadError(f"--from-layer must be an integer >= 0, got {self.from_layer!r}")
        if self.tune == "lora":
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise HeadError(f"--lora-rank must be a positive integer, got {self.rank!r}")
            if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
                raise HeadError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
            unknown = [t for t in self.targets if t not in LORA_TARGETS] or ([] if self.targets else ["(none)"])
            if unknown:
                raise HeadError(f"unknown LoRA targets {unknown}: choose among {', '.join(LORA_TARGETS)}")


def base_config(weights_dir: Path) -> Any:
    """The base model's BertConfig with eager attention (exports as plain MatMul/Softmax)."""
    from transformers import BertConfig

    path = Path(weights_dir) / CONFIG_FILE
    if not path.is_file() or not (Path(weights_dir) / WEIGHTS_FILE).is_file():
        raise HeadError(f"{weights_dir} lacks {CONFIG_FILE} or {WEIGHTS_FILE}: the base model's weights are needed "
                        "to run the layers above K; export the model again")
    try:
        config = BertConfig.from_json_file(str(path))
    except (OSError, ValueError) as error:
        raise HeadError(f"{path} cannot be read ({error}); export the model again") from None
    if config.model_type != "bert":
        raise HeadError(f"{path}: model_type {config.model_type!r} is not supported for training layers; ew trains BERT layers")
    config._attn_implementation = "eager"
    return config


def load_base_tensors(weights_dir: Path, names: list[str]) -> dict[str, "torch.Tensor"]:
    """The tensors ``names`` (unprefixed: ``encoder.layer.4...``) from ``model.safetensors``, strictly.

    Checkpoints saved from a task model prefix every name (``bert.encoder.layer.4...``); the prefix
    is whatever precedes ``embeddings.word_embeddings.weight``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(weights_dir) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as stored:
            keys = set(stored.keys())
            anchors = [k for k in keys if k.endswith("embeddings.word_embeddings.weight")]
            if len(anchors) != 1:
                raise HeadError(f"{path} holds no single embeddings.word_embeddings.weight: is it a BERT checkpoint?")
            prefix = anchors[0][: -len("embeddings.word_embeddings.weight")]
            missing = [n for n in names if prefix + n not in keys]
            if missing:
                raise HeadError(f"{path} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
                                "the checkpoint does not match its config.json: export the model again")
            return {n: stored.get_tensor(prefix + n).float() for n in names}
    except (SafetensorError, OSError) as error:
        raise HeadError(f"{path} cannot be read ({error}); export the model again") from None


def _load_strict(module: "torch.nn.Module", weights_dir: Path) -> None:
    """Fill every tensor of ``module`` from the checkpoint; a missing or misshapen one is an error."""
    expected = module.state_dict()
    names = list(expected)
    tensors = load_base_tensors(weights_dir, names)
    for name in names:
        if tuple(tensors[name].shape) != tuple(expected[name].shape):
            raise HeadError(f"{weights_dir}/{WEIGHTS_FILE}: {name} has shape {tuple(tensors[name].shape)}, "
                            f"config.json implies {tuple(expected[name].shape)}; export the model again")
    module.load_state_dict(tensors, strict=True)


def _lora_linear_class(torch: Any) -> type:
    nn = torch.nn

    class LoRALinear(nn.Linear):
        """y = x W^T + b + (x A^T) B^T * alpha / R, W and b frozen; B starts at zero so training starts at the base."""

        def __init__(self, base: "nn.Linear", rank: int, alpha: float):
            super().__init__(base.in_features, base.out_features, device="meta")  # no throwaway init
            self.weight, self.bias = base.weight, base.bias  # the base's own frozen tensors, not copies
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))  # (R, in)
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, R)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT: small, random
            self.scale = alpha / rank

        def forward(self, x):  # (..., in) -> (..., out)
            return super().forward(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scale

    return LoRALinear


def _add_lora(torch: Any, layer: "torch.nn.Module", config: TopConfig) -> None:
    lora_linear = _lora_linear_class(torch)
    for target in config.targets:
        parent_name, _, attribute = LORA_TARGETS[target].rpartition(".")
        parent = layer.get_submodule(parent_name)
        setattr(parent, attribute, lora_linear(getattr(parent, attribute), config.rank, config.alpha))


def _mask_bias(torch: Any, mask: "torch.Tensor", dtype: Any) -> "torch.Tensor":
    """(B, T) 1 = real token -> (B, 1, 1, T) additive attention bias: 0 for real keys, the dtype's minimum for padding."""
    return (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


def _run_layers(torch: Any, layers: Any, hidden: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    bias = _mask_bias(torch, mask, hidden.dtype)
    for layer in layers.values():
        out = layer(hidden, bias)  # (B, T, D)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
    return hidden


def pool(torch: Any, hidden: "torch.Tensor", mask: "torch.Tensor", pooling: str) -> "torch.Tensor":
    """(B, T, D), (B, T) -> (B, D): ew's pooling (mean: masked sum / clamped count, as sentence-transformers)."""
    if pooling == "cls":
        return hidden[:, 0]
    keep = mask.to(hidden.dtype)[:, :, None]  # (B, T, 1)
    return (hidden * keep).sum(dim=1) / torch.clamp(keep.sum(dim=1), min=1e-9)


def build_top(weights_dir: Path, config: TopConfig, head: HeadConfig) -> "torch.nn.Module":
    """The model above layer K, loaded from ``weights_dir``; forward (states (B, T, D), mask (B, T)) -> logits (B, C).

    Random tensors (the head, LoRA's A) come from torch's RNG: build under a seed for determinism.
    """
    torch = require_torch()
    bert = base_config(weights_dir)
    num_layers = int(bert.num_hidden_layers)
    if config.from_layer > num_layers:
        raise HeadError(f"--from-layer {config.from_layer} is past the model's last layer ({num_layers})")
    if head.input_dim != bert.hidden_size:
        raise HeadError(f"the head takes {head.input_dim} dims, the model's layers give {bert.hidden_size}")
    first = config.from_layer if config.tune != "head" else num_layers
    return _top_model_class(torch)(bert, config, head, range(first, num_layers), weights_dir)


def _top_model_class(torch: Any) -> type:
    from transformers.models.bert.modeling_bert import BertLayer

    class TopModel(torch.nn.Module):
        def __init__(self, bert, config: TopConfig, head: HeadConfig, indices: range, weights_dir: Path):
            super().__init__()
            self.config, self.num_layers = config, int(bert.num_hidden_layers)
            self.encoder = torch.nn.Module()  # a namespace: state-dict names match the checkpoint's
            self.encoder.layer = torch.nn.ModuleDict({str(i): BertLayer(bert, layer_idx=i) for i in indices})
            _load_strict(self, weights_dir)  # before the head exists: every tensor so far is the base's
            self.encoder.requires_grad_(config.tune == "top")
            if config.tune == "lora":
                for layer in self.encoder.layer.values():
                    _add_lora(torch, layer, config)
            self.head = build_head(head)

        def forward(self, states, mask):  # (B, T, D) float32, (B, T) 1 = real token -> (B, C)
            hidden = _run_layers(torch, self.encoder.layer, states, mask)  # (B, T, D)
            return self.head(pool(torch, hidden, mask, self.config.pooling))  # (B, D) -> (B, C)

    return TopModel


def build_lower(weights_dir: Path, layers: int) -> "torch.nn.Module":
    """The frozen encoder up to layer K, in eval mode: (input_ids, attention_mask, token_type_ids) -> hidden_states[K] (B, T, D)."""
    torch = require_torch()
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

    bert = base_config(weights_dir)
    if not 0 <= layers <= bert.num_hidden_layers:
        raise HeadError(f"layer {layers} is outside the model's 0..{bert.num_hidden_layers}")

    class LowerEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = BertEmbeddings(bert)
            self.encoder = torch.nn.Module()
            self.encoder.layer = torch.nn.ModuleDict({str(i): BertLayer(bert, layer_idx=i) for i in range(layers)})

        def train(self, mode: bool = True):  # frozen: never dropout, so it draws no random numbers
            return super().train(False)

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # (B, T) int64 each -> (B, T, D)
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, T, D)
            return _run_layers(torch, self.encoder.layer, hidden, attention_mask)

    lower = LowerEncoder()
    _load_strict(lower, weights_dir)
    return lower.requires_grad_(False).eval()


def trainable_parameters(module: "torch.nn.Module") -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def trained_tensors(module: "torch.nn.Module") -> dict[str, np.ndarray]:
    """The tensors training changed, by state-dict name, as float32 NumPy (what a trained head stores)."""
    return {name: p.detach().cpu().float().contiguous().numpy()
            for name, p in module.named_parameters() if p.requires_grad}
