"""The loop that fits a head on batches of (embedding, class index), or any module on batches of (inputs, class index).

:func:`train_module` is the loop; :func:`train_head` builds a plain head and runs it on
``(x, y)`` batches; ``pipelines.recycling`` runs it on ``((states, mask), y)`` batches.
The data side is a pair of callables, so the loop knows nothing about the warehouse:
``train_batches(epoch)`` yields that epoch's shuffled batches, ``val_batches()`` the
validation split. Loading runs in a background thread (:func:`prefetch`) while torch computes.

>>> result = train_head(train_batches=..., val_batches=..., steps_per_epoch=625,
...                     input_dim=384, num_classes=12, config=TrainConfig())  # doctest: +SKIP
>>> result.best_epoch, result.history[-1].val_accuracy                        # doctest: +SKIP
(7, 0.91)
"""
from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipelines.head_card import MEMBERS, HeadConfig
from pipelines.heads import build_head, fold_standardization, require_torch, standardized_head
from pipelines.errors import HeadError
from pipelines.progress import epoch_done

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
SELECTIONS = ("loss", "macro_f1")
CLASS_WEIGHTS = ("balanced", "none")
# (x: (B, D) float32, y: (B,) int64 class index), or (inputs: a tuple of arrays passed to the module in order, y)
Batches = Iterable[tuple["np.ndarray | tuple[np.ndarray, ...]", np.ndarray]]


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "mlp"  # "mlp", "linear" or "ensemble" (train_head only), see HeadConfig
    hidden: int = 64  # mlp width
    dropout: float = 0.1  # mlp only
    activation: str = "gelu"  # mlp only: "gelu" (tanh approximation) or "relu"
    epochs: int = 30  # at most; early stopping usually ends sooner
    batch_size: int = 64  # rows per batch; the data side batches, the loop only records it
    lr: float = 1e-3  # peak learning rate, decayed linearly to 0 over epochs * steps_per_epoch
    weight_decay: float = 1e-5  # Adam's L2 penalty, on every trained tensor
    seed: int = 0  # weight init and dropout; the data side seeds its own shuffling
    patience: int = 3  # stop after this many epochs without a better validation score; 0 never stops early
    # Which epoch to keep: "loss" (lowest validation loss) or "macro_f1" (highest validation macro-F1,
    # ties to the lower loss); patience counts epochs without a better one.
    select: str = "loss"
    # train_head only, from the InputMoments of the training split it is given:
    class_weight: str = "none"  # "balanced": the loss weighs class c by n / (C * n_c), as scikit-learn's
    standardize: bool = False  # inputs scaled by the split's mean and std; folded into the first layer when done

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise HeadError(f"unknown selection {self.select!r}: choose one of {', '.join(SELECTIONS)}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise HeadError(f"unknown class weight {self.class_weight!r}: choose one of {', '.join(CLASS_WEIGHTS)}")


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's rows, in train mode (dropout on)
    val_loss: float  # mean over the validation rows, in eval mode
    val_accuracy: float
    seconds: float  # training plus validation
    val_macro_f1: float = float("nan")  # over the classes present in the validation split or its predictions


@dataclass(frozen=True)
class TrainResult:
    module: Any  # torch.nn.Module in eval mode, holding the best epoch's weights
    config: HeadConfig | None  # the head's config (train_head); None from train_module
    history: tuple[EpochStats, ...]
    best_epoch: int  # 1-based; the epoch whose weights `module` holds
    seconds: float
    # kind "ensemble": per member, its best epoch, epochs run and history (history/best_epoch above: the mlp's),
    # and under "ensemble" the averaged head's validation loss, accuracy and macro-F1
    members: dict = field(default_factory=dict)


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(batches: Iterable[T], *, depth: int = 4) -> Iterator[T]:
    """Iterate ``batches`` in a background thread, at most ``depth`` items ahead.

    Order is kept; an exception raised by the producer is re-raised here, in the consumer.
    If the consumer stops early (break, exception, garbage collection), the producer is told
    to stop, its iterator is closed, and the thread is joined before this generator returns.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        iterator = None
        try:
            iterator = iter(batches)
            for item in iterator:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            offer(_Failure(error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="ew-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def _tensor(torch: Any, array: np.ndarray) -> "torch.Tensor":
    """Zero-copy for writable float32 / int64 / bool arrays; floats become float32, integers int64."""
    array = np.asarray(array)
    if array.dtype != np.bool_:
        array = array.astype(np.float32 if np.issubdtype(array.dtype, np.floating) else np.int64, copy=False)
    # torch warns on read-only arrays (Arrow buffers often are); a copy of one batch is cheap.
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _as_tensors(torch: Any, inputs: "np.ndarray | tuple", y: np.ndarray) -> tuple[tuple["torch.Tensor", ...], "torch.Tensor"]:
    """((input tensors...), y): a bare array is the module's only input."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    return tuple(_tensor(torch, part) for part in inputs), _tensor(torch, np.asarray(y, dtype=np.int64))


def _class_weight_tensor(torch: Any, class_weights: np.ndarray | None, num_classes: int) -> "torch.Tensor | None":
    if class_weights is None:
        return None
    weights = np.asarray(class_weights, dtype=np.float32)
    if weights.shape != (num_classes,):
        raise HeadError(f"class_weights must have shape ({num_classes},), got {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not np.any(weights > 0):
        raise HeadError("class_weights must be finite, non-negative and not all zero")
    return torch.from_numpy(weights.copy())


def _evaluate(
    torch: Any, module: "torch.nn.Module", batches: Batches, weight: "torch.Tensor | None", num_classes: int
) -> tuple[float, float, float]:
    """(mean loss, accuracy, macro-F1) over the validation batches; the loss uses the training class weights."""
    from pipelines.metrics import classification_metrics

    functional = torch.nn.functional
    module.eval()
    loss_sum, weight_sum = 0.0, 0.0
    true_parts: list[np.ndarray] = []
    pred_parts: list[np.ndarray] = []
    with torch.inference_mode():
        for x_np, y_np in prefetch(batches):
            x, y = _as_tensors(torch, x_np, y_np)
            logits = module(*x)  # (B, C)
            loss_sum += functional.cross_entropy(logits, y, weight=weight, reduction="sum").item()
            weight_sum += float(weight[y].sum()) if weight is not None else len(y)
            true_parts.append(y.numpy())
            pred_parts.append(logits.argmax(dim=1).numpy())
    if not true_parts:
        raise HeadError("validation split is empty: no rows to measure the head on; check the label and split")
    metrics = classification_metrics(np.concatenate(true_parts), np.concatenate(pred_parts),
                                     classes=[str(c) for c in range(num_classes)])
    return loss_sum / max(weight_sum, 1e-12), metrics.accuracy, metrics.macro_f1


def _adam(torch: Any, module: "torch.nn.Module", config: TrainConfig, param_groups: list | None = None) -> "torch.optim.Optimizer":
    """Adam with AMSGrad on the trainable tensors; the fused kernel when this torch has it (a third less time per step on CPU)."""
    options = dict(lr=config.lr, weight_decay=config.weight_decay, amsgrad=True)
    params = param_groups or [p for p in module.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **options)


@dataclass(frozen=True, eq=False)
class InputMoments:
    """One pass over the training split: what standardization and class weighting need."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64, floored so a constant dimension scales by 1, not by infinity
    class_counts: np.ndarray  # (C,) int64 training rows per class

    def balanced_weights(self) -> np.ndarray:
        """(C,) float32 n / (k * n_c) over the k classes present, 0 for absent ones (scikit-learn's "balanced"):
        every present class weighs as much in the loss as the others, whatever its size."""
        counts = self.class_counts.astype(np.float64)
        present = counts > 0
        weights = np.zeros_like(counts)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return weights.astype(np.float32)


def input_moments(batches: Batches, *, num_classes: int) -> InputMoments:
    """Mean and std per dimension (float64 sums, streamed) and rows per class of ``batches``."""
    rows, total, squares = 0, None, None
    counts = np.zeros(num_classes, dtype=np.int64)
    for x, y in batches:
        x = np.asarray(x, dtype=np.float64)  # (B, D)
        total = x.sum(axis=0) if total is None else total + x.sum(axis=0)
        squares = (x * x).sum(axis=0) if squares is None else squares + (x * x).sum(axis=0)
        counts += np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)[:num_classes]
        rows += len(x)
    if rows == 0:
        raise HeadError("training split is empty: no rows to measure; check the label and split")
    mean = total / rows
    std = np.sqrt(np.maximum(squares / rows - mean * mean, 0.0))
    return InputMoments(mean=mean, std=np.where(std > 1e-6, std, 1.0), class_counts=counts)


def train_head(
    *,
    train_batches: Callable[[int], Batches],
    val_batches: Callable[[], Batches],
    steps_per_epoch: int,
    input_dim: int,
    num_classes: int,
    config: TrainConfig,
    class_weights: np.ndarray | None = None,
    moments: InputMoments | None = None,
) -> TrainResult:
    """Fit a head with Adam (AMSGrad) under a linear learning-rate decay; keep the best epoch.

    ``train_batches(epoch)`` is called with epoch = 1, 2, ... and should shuffle per epoch.
    ``steps_per_epoch`` sizes the schedule; if an epoch yields more batches the rate stays at 0.
    ``config.standardize`` and ``config.class_weight="balanced"`` need the training split's
    ``moments`` (:func:`input_moments`); explicit ``class_weights`` take precedence. A standardized
    head trains on scaled inputs and is returned with the scaling folded into its first layer,
    so it is a plain head of ``config`` that reads raw vectors (and NumPy needs nothing new).
    Same seed and same batches give bit-identical weights. torch's global RNG is left as it was.
    """
    head_config = HeadConfig(
        kind=config.kind,
        input_dim=input_dim,
        num_classes=num_classes,
        hidden=config.hidden,
        dropout=config.dropout,
        activation=config.activation,
    )
    if moments is None and (config.standardize or config.class_weight == "balanced"):
        raise HeadError("standardize and class_weight='balanced' need the training split's moments (input_moments)")
    if class_weights is None and config.class_weight == "balanced":
        class_weights = moments.balanced_weights()
    if config.kind == "ensemble":  # each member trains as it would alone; their probabilities are averaged
        members = {kind: train_head(train_batches=train_batches, val_batches=val_batches, steps_per_epoch=steps_per_epoch,
                                    input_dim=input_dim, num_classes=num_classes, config=replace(config, kind=kind),
                                    class_weights=class_weights, moments=moments) for kind in MEMBERS}
        with require_torch().random.fork_rng(devices=[]):  # the random init is overwritten at once
            module = build_head(head_config)
        for kind, member in members.items():
            module[kind].load_state_dict(member.module.state_dict())
        torch = require_torch()
        weight = _class_weight_tensor(torch, class_weights, num_classes)
        val_loss, val_accuracy, val_macro_f1 = _evaluate(torch, module, val_batches(), weight, num_classes)
        first = members[MEMBERS[0]]
        return TrainResult(module=module.eval(), config=head_config, history=first.history, best_epoch=first.best_epoch,
                           seconds=sum(member.seconds for member in members.values()),
                           members={kind: {"best_epoch": m.best_epoch, "epochs": len(m.history),
                                           "history": [asdict(epoch) for epoch in m.history]}
                                    for kind, m in members.items()}
                           | {"ensemble": {"val_loss": val_loss, "val_accuracy": val_accuracy,
                                           "val_macro_f1": val_macro_f1}})
    build = (lambda: standardized_head(head_config, moments.mean, moments.std)) if config.standardize else \
        (lambda: build_head(head_config))
    result = train_module(
        build, train_batches=train_batches, val_batches=val_batches,
        steps_per_epoch=steps_per_epoch, num_classes=num_classes, config=config, class_weights=class_weights,
    )
    module = fold_standardization(result.module) if config.standardize else result.module
    return replace(result, module=module, config=head_config)


def train_module(
    build: Callable[[], "torch.nn.Module"],
    *,
    train_batches: Callable[[int], Batches],
    val_batches: Callable[[], Batches],
    steps_per_epoch: int,
    num_classes: int,
    config: TrainConfig,
    class_weights: np.ndarray | None = None,
    param_groups: Callable[["torch.nn.Module"], list] | None = None,
) -> TrainResult:
    """Train the module ``build()`` returns (built under ``config.seed``) on batches of (inputs, y).

    Only tensors with ``requires_grad`` train; ``param_groups(module)``, when given, returns
    the optimizer's groups (e.g. a lower learning rate for transformer layers). The loop,
    schedule, early stopping and determinism are :func:`train_head`'s. The module's forward
    takes the batch's inputs in order and returns logits (B, C).
    """
    torch = require_torch()
    if steps_per_epoch < 1:
        raise HeadError("training split is empty: steps_per_epoch is 0; check the label and split")
    if config.epochs < 1:
        raise HeadError(f"epochs must be at least 1, got {config.epochs}")
    weight = _class_weight_tensor(torch, class_weights, num_classes)
    total_steps = config.epochs * steps_per_epoch
    started = time.perf_counter()
    history: list[EpochStats] = []
    best_score, best_epoch, best_state = None, 0, None

    with torch.random.fork_rng(devices=[]):  # seed locally: the caller's RNG state is untouched
        torch.manual_seed(config.seed)
        module = build()
        optimizer = _adam(torch, module, config, param_groups(module) if param_groups else None)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total_steps)
        )
        for epoch in range(1, config.epochs + 1):
            epoch_started = time.perf_counter()
            train_loss = _train_epoch(torch, module, train_batches(epoch), optimizer, schedule, weight, epoch)
            val_loss, val_accuracy, val_macro_f1 = _evaluate(torch, module, val_batches(), weight, num_classes)
            if not math.isfinite(val_loss):
                raise HeadError(f"training diverged at epoch {epoch} (validation loss {val_loss}); lower the learning rate")
            history.append(EpochStats(epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_accuracy=val_accuracy,
                                      seconds=time.perf_counter() - epoch_started, val_macro_f1=val_macro_f1))
            epoch_done(f"epoch {epoch}: validation accuracy {val_accuracy:.3f}, macro-F1 {val_macro_f1:.3f}")
            score = (-val_loss,) if config.select == "loss" else (val_macro_f1, -val_loss)
            if best_score is None or score > best_score:
                best_score, best_epoch = score, epoch
                best_state = {name: tensor.detach().clone() for name, tensor in _trained_state(module).items()}
            elif config.patience > 0 and epoch - best_epoch >= config.patience:
                break

    module.load_state_dict(best_state, strict=False)  # only trained tensors are kept; frozen ones never moved
    module.eval()
    return TrainResult(module=module, config=None, history=tuple(history), best_epoch=best_epoch,
                       seconds=time.perf_counter() - started)


def _trained_state(module: "torch.nn.Module") -> dict:
    """The state-dict entries that training changes: parameters with requires_grad (all of a plain head)."""
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in module.state_dict(keep_vars=True).items() if name in trained}


def _train_epoch(torch: Any, module, batches: Batches, optimizer, schedule, weight, epoch: int) -> float:
    """One pass over ``batches`` in train mode; the mean training loss over its rows."""
    module.train()
    loss_sum = torch.zeros(())
    rows = 0
    for x_np, y_np in prefetch(batches):
        x, y = _as_tensors(torch, x_np, y_np)
        logits = module(*x)  # (B, C)
        loss = torch.nn.functional.cross_entropy(logits, y, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach() * len(y)  # no .item() per step: keeps the step cheap
        rows += len(y)
    if rows == 0:
        raise HeadError(f"training split is empty: epoch {epoch} yielded no rows; check the label and split")
    train_loss = float(loss_sum) / rows
    if not math.isfinite(train_loss):
        raise HeadError(f"training diverged at epoch {epoch} (loss {train_loss}); lower the learning rate")
    return train_loss


def predict_batches(module: "torch.nn.Module", batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred), both (N,) int64, streaming over ``batches``; leaves ``module`` in eval mode."""
    torch = require_torch()
    module.eval()
    true_parts: list[np.ndarray] = []
    pred_parts: list[np.ndarray] = []
    with torch.inference_mode():
        for x_np, y_np in prefetch(batches):
            x, y = _as_tensors(torch, x_np, y_np)
            true_parts.append(y.numpy())
            pred_parts.append(module(*x).argmax(dim=1).numpy())  # (B,)
    if not true_parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(true_parts), np.concatenate(pred_parts)


@contextmanager
def torch_threads(threads: int):
    """Run the block with torch using ``threads`` threads, then restore what it had."""
    torch = require_torch()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

