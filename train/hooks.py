"""What runs beside the loop: the loss log, evaluation, checkpoints. Each is built here and handed to ``fit``.

``LossLog`` receives every step's checked loss record (``fit``'s ``on_losses``) and writes it to the loggers
(``metrics.jsonl``, TensorBoard, W&B) and the progress bar; ``evaluation_hook`` and ``checkpoint_hook``
return ``Hook``s with their ``every``. All three append to one ``history`` (a list of plain records), which
the checkpoint stores, so a resumed run's log and summary are exactly an uninterrupted run's.

Example:
    >>> history, lines = [], []
    >>> class Printer:
    ...     def log(self, step, record): lines.append((step, sorted(record)))
    >>> log = LossLog([Printer()], history, lr=lambda step: 0.1)
    >>> log([{"step": 1, "loss": 2.0, "grad_norm": 1.0, "tokens": 10}])
    >>> lines, history[0]["lr"]
    ([(1, ['grad_norm', 'loss', 'lr', 'step_seconds', 'tokens_per_s'])], 0.1)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lora_one_train.loop import Hook, NonFiniteLossError, StepInfo


def log_record(loggers, history: list[dict], record: dict) -> None:
    """Append ``record`` (``{"step": s, ...}``) to ``history`` and send it to every logger."""
    history.append(record)
    step = record["step"]
    for logger in loggers:
        logger.log(step, {k: v for k, v in record.items() if k != "step"})


class LossLog:
    """``fit``'s ``on_losses``: every training step's record (loss, gradient norm, learning rate, tokens/s and
    seconds per step over the records' window) to the loggers and the history, and the progress bar moved on.
    A window that follows an evaluation or a checkpoint includes its time: take the median over a run."""

    def __init__(self, loggers, history: list[dict], *, lr: Callable[[int], float], bar=None):
        self.loggers, self.history, self.lr, self.bar = loggers, history, lr, bar
        self.window_start = time.perf_counter()

    def __call__(self, records: list[dict]) -> None:
        if not records:
            return
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        tokens_per_s = sum(r["tokens"] for r in records) / elapsed
        step_seconds = elapsed / len(records)
        for r in records:
            record = {
                "step": r["step"],
                "loss": r["loss"],
                "grad_norm": r["grad_norm"],
                "lr": float(self.lr(r["step"])),
            }
            log_record(
                self.loggers, self.history, {**record, "tokens_per_s": tokens_per_s, "step_seconds": step_seconds}
            )
        if self.bar is not None:
            last = self.history[-1]
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}")
            self.bar.update(len(records))
        self.window_start = time.perf_counter()


def evaluation_hook(evaluate: Callable[[StepInfo], dict], loggers, history: list[dict], *, every: int, say=print):
    """A ``Hook`` that logs ``evaluate(info)`` (``{name: value}``) at its step."""

    def fn(info: StepInfo) -> None:
        result = evaluate(info)
        log_record(loggers, history, {"step": info.step, **result})
        if info.step != info.total_steps:
            headline = {k.removeprefix("eval/"): v for k, v in result.items() if k.startswith("eval/")}
            say(f"step {info.step}: " + ", ".join(f"{k} {_short(v)}" for k, v in headline.items()))

    return Hook(every=every, fn=fn)


def _short(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def checkpoint_hook(checkpointer, record: Callable[[StepInfo], dict], *, every: int) -> Hook:
    """A ``Hook`` that saves ``{trainable, opt_state}`` with ``record(info)``; state holding a NaN or an
    infinity is never saved (``NonFiniteLossError`` naming the step instead)."""

    def fn(info: StepInfo) -> None:
        state = {"trainable": info.state.trainable, "opt_state": info.state.opt_state}
        if not bool(_all_finite(state)):
            raise NonFiniteLossError(
                f"the trainable state or optimizer moments hold NaN or inf after step {info.step} (its loss was "
                "finite); it was not checkpointed"
            )
        checkpointer.save(info.step, state, record(info))

    return Hook(every=every, fn=fn)
