"""The training loop: ``fit(state, stream, hooks, ...)``; evaluation, checkpoints and exports are hooks.

Steps are dispatched without waiting for the device. The losses are read back (and checked) only where the
loop must look at them: every ``log_every`` steps, before any hook runs and at the last step. A non-finite
loss stops the run there, naming its first bad step, before any hook could log, evaluate or checkpoint
the state it produced.

Example:
    >>> seen = []
    >>> def train_step(state, batches):
    ...     return state._replace(step=state.step + 1), jnp.float32(1.0 / (state.step + 1)), jnp.float32(0.0)
    >>> state = TrainState(step=0, trainable={}, opt_state=())
    >>> hooks = [Hook(every=2, fn=lambda info: seen.append(info.step))]
    >>> logged = []
    >>> batches = iter([{"attention_mask": np.ones((2, 3))}] * 5)
    >>> state = fit(state, batches, hooks, train_step=train_step, total_steps=5, on_losses=logged.extend)
    >>> state.step, seen, [r["step"] for r in logged]
    (5, [2, 4, 5], [1, 2, 3, 4, 5])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
    """What training changes: the optimizer step, the trainable pytree and the optimizer state."""

    step: int
    trainable: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees: the step just taken and the state after it (its losses are already checked)."""

    step: int
    state: TrainState
    total_steps: int


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(info)`` every ``every`` steps (0: never periodically) and, when ``at_end``, after the last step."""

    every: int
    fn: Callable[[StepInfo], None]
    at_end: bool = True

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every and step % self.every == 0) or (self.at_end and step == total_steps)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the first bad step."""


def settle(pending: list[tuple[int, Any, Any, int]]) -> list[dict]:
    """Host records ``{"step", "loss", "grad_norm", "tokens"}`` of the pending steps; raises at the first
    non-finite loss or gradient norm (nothing after it is returned, so nothing after it gets logged)."""
    if not pending:
        return []
    jax.block_until_ready(pending[-1][1])
    records = []
    for step, loss, grad_norm, tokens in pending:
        record = {"step": step, "loss": float(loss), "grad_norm": float(grad_norm), "tokens": tokens}
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            raise NonFiniteLossError(
                f"the training loss became {record['loss']} (gradient norm {record['grad_norm']}) at step {step}, "
                "the first non-finite step; no state from that step on was logged or checkpointed"
            )
        records.append(record)
    return records


def fit(
    state: TrainState,
    stream: Iterator,
    hooks: list[Hook],
    *,
    train_step: Callable,
    total_steps: int,
    accum: int = 1,
    log_every: int = 1,
    on_losses: Callable[[list[dict]], None] = lambda records: None,
) -> TrainState:
    """Train from ``state.step`` to ``total_steps``; returns the final state.

    ``train_step(state, batches) -> (state, loss, grad_norm)`` takes ``accum`` batches of ``stream`` (dicts
    of arrays; their ``attention_mask`` counts the tokens for the tokens/s in the records).
    ``on_losses(records)`` receives every step's checked record exactly once, in order, before the hooks of
    that step run (so a checkpoint never holds a step whose loss was not logged).
    """
    pending: list = []
    for step in range(state.step + 1, total_steps + 1):
        batches = [next(stream) for _ in range(accum)]
        state, loss, grad_norm = train_step(state, batches)
        tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
        pending.append((step, loss, grad_norm, tokens))
        due = [h for h in hooks if h.due(step, total_steps)]
        if due or step % log_every == 0 or step == total_steps:
            records, pending = settle(pending), []
            on_losses(records)
        for hook in due:
            hook.fn(StepInfo(step=step, state=state, total_steps=total_steps))
    return state
