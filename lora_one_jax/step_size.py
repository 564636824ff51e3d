"""LoRA-One's own initial step: choose the spectral init's ``gamma`` from data (``init.gamma: auto``).

The spectral init is one gradient step of size ``1 / (gamma s1)`` along ``best_rank_r(-G)``:
``A0 @ B0 = best_rank_r(-G) / (gamma s1)``. Its factors scale as ``1 / sqrt(gamma)`` each, so the top-r SVD
is computed once (the factors at ``gamma = 1``) and every candidate is those factors times
``1 / sqrt(gamma)``. Each candidate is scored by the loss, before any training step, on batches that are
NOT the gradient examples (e.g. the next 32 training examples): forward passes only, through one compiled
loss whose rescaling factor is an argument (one compile per batch shape for all candidates, reused by later
calls with the same ``loss_fn`` object: make it once per run, e.g. ``lora_loss_fn(model, config)``).

Cost: ``evaluations * len(batches)`` forward passes, returned as ``forward_passes``. ``search="grid"``
scores every candidate; ``search="golden"`` assumes the loss is unimodal over the (sorted) candidates and
finds the same minimum with a discrete golden-section search: 3 to 5 of 8 candidates.

Example:
    >>> w = jnp.zeros((4, 3)); delta = jnp.outer(jnp.arange(1.0, 5.0), jnp.ones(3)) / 100
    >>> x = jnp.eye(4) * 2.0                                      # x^T x / n = I
    >>> loss = lambda p, ad, b: 0.5 * jnp.mean(jnp.sum((b @ (p + ad["w"]["a"] @ ad["w"]["b"]) - b @ delta) ** 2, 1))
    >>> grads = {"w": -delta}                                     # the gradient of that loss at w = 0
    >>> out = choose_gamma(loss, w, grads, LoraConfig(rank=1), [x], gammas=(16, 32, 64, 128))
    >>> out.gamma, out.forward_passes                             # s1 = ||delta||_2 = 0.095: gamma* = 1 / s1
    (16.0, 4)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_one_jax.config import Adapters, LoraConfig
from lora_one_jax.spectral import spectral_init

#: The candidates of ``init.gamma: auto``: 16 to 2048, x2 (the official default 128 in the middle).
DEFAULT_GAMMAS = (16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0)
SEARCHES = ("grid", "golden")


class GammaChoice(NamedTuple):
    """What ``choose_gamma`` found: the best ``gamma``, the scored ``losses`` (``{gamma: mean loss}``, every
    evaluated candidate), the cost in ``forward_passes`` (one per batch per evaluated candidate) and the
    seconds of each pass in the order they ran (``pass_seconds``; the first includes the scoring program's
    compilation unless it was cached: ``compile_seconds``)."""

    gamma: float
    losses: dict[float, float]
    forward_passes: int
    pass_seconds: tuple[float, ...] = ()

    @property
    def compile_seconds(self) -> float:
        """The first pass's time over the median of the others (its compilation; ~0 when it was cached).

        Example:
            >>> GammaChoice(128.0, {}, 4, (5.0, 1.0, 1.2, 0.9)).compile_seconds
            4.0
        """
        if len(self.pass_seconds) < 2:
            return 0.0
        return max(0.0, self.pass_seconds[0] - float(np.median(self.pass_seconds[1:])))


def unit_spectral_init(grads: Mapping[str, jax.Array], config: LoraConfig, *, svd: str = "auto", key=None) -> Adapters:
    """The spectral init's factors at ``gamma = 1``, in float32: ``rescale(unit, gamma)`` gives any other gamma.

    Example:
        >>> g = {"fc": jax.random.normal(jax.random.key(0), (6, 5))}
        >>> unit = unit_spectral_init(g, LoraConfig(rank=2))
        >>> at128 = spectral_init(g, LoraConfig(rank=2), gamma=128.0)
        >>> bool(jnp.allclose(rescale(unit, 128.0)["fc"]["a"], at128["fc"]["a"], atol=1e-6))
        True
    """
    return spectral_init(grads, dataclasses.replace(config, dtype="float32"), gamma=1.0, svd=svd, key=key)


def rescale(unit: Adapters, gamma: float, dtype=None) -> Adapters:
    """Factors for ``gamma`` from the factors at ``gamma = 1``: both divided by ``sqrt(gamma)`` (in float32,
    then cast to ``dtype``, default the factors' own), so ``A @ B`` scales as ``1 / gamma``.

    Example:
        >>> unit = {"fc": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}}
        >>> (rescale(unit, 4.0)["fc"]["a"] @ rescale(unit, 4.0)["fc"]["b"]).tolist()
        [[0.25, 0.25], [0.25, 0.25]]
    """
    _check_gamma(gamma)
    c = 1.0 / math.sqrt(gamma)
    return jax.tree.map(lambda x: (jnp.asarray(x, jnp.float32) * c).astype(dtype or x.dtype), unit)


def _check_gamma(gamma) -> float:
    if not (isinstance(gamma, (int, float, np.floating, np.integer)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"every gamma must be a finite number > 0, got {gamma!r}")
    return float(gamma)


@partial(jax.jit, static_argnames=("loss_fn", "dtype"))
def _scored(params, unit, batch, c, *, loss_fn, dtype):
    """The loss with the unit factors times ``c``: one program for every candidate (``c`` is an argument), and
    for every later call with the same ``loss_fn`` and batch shape (the weights are arguments, not constants)."""
    return loss_fn(params, jax.tree.map(lambda x: (x * c).astype(dtype), unit), batch)


def _golden_order(n: int, evaluate: Callable[[int], float]) -> None:
    """Discrete golden-section search over indices 0..n-1 (``evaluate`` memoizes); the caller takes the
    minimum of what was evaluated, which is the global minimum when the values are unimodal."""
    lo, hi = 0, n - 1
    while hi - lo > 2:
        step = max(1, round((hi - lo) * (1 - 0.6180339887)))
        m1, m2 = lo + step, hi - step
        if m2 <= m1:
            m2 = m1 + 1
        if evaluate(m1) <= evaluate(m2):
            hi = m2
        else:
            lo = m1
    for i in range(lo, hi + 1):
        evaluate(i)


def choose_gamma(
    loss_fn: Callable,
    params,
    grads: Mapping[str, jax.Array] | None,
    config: LoraConfig,
    batches: Sequence,
    *,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    key: jax.Array | None = None,
    svd: str = "auto",
    search: str = "grid",
    unit: Adapters | None = None,
) -> GammaChoice:
    """The spectral init's ``gamma`` with the lowest loss on ``batches``, before any training step.

    ``loss_fn(params, adapters, batch)`` is the adapted model's loss (like ``lora_loss_fn(model, config)``);
    ``grads`` the full fine-tuning gradient (``estimate_gradient``) the init is built from (ignored when the
    factors at gamma 1, ``unit = unit_spectral_init(grads, config)``, are given); ``batches``: held-out
    training batches, NOT the gradient examples (give them one shape: one compile). The score of a gamma is
    the mean of its per-batch losses; a NaN loss raises. ``search``: ``"grid"`` (every candidate) or
    ``"golden"`` (fewer, exact when the losses are unimodal over the sorted candidates). Build the adapters
    with ``spectral_init(grads, config, gamma=result.gamma)`` (same ``key``/``svd``) or
    ``rescale(unit, result.gamma, config.dtype)``.

    Example:
        >>> g = {"fc": -jnp.eye(3, 2)}
        >>> loss = lambda p, ad, b: jnp.sum((ad["fc"]["a"] @ ad["fc"]["b"] - b) ** 2)
        >>> best = choose_gamma(loss, None, g, LoraConfig(rank=2), [jnp.eye(3, 2) / 8], gammas=(2, 4, 8, 16))
        >>> best.gamma, {k: round(v, 4) for k, v in best.losses.items()}
        (8.0, {2.0: 0.2812, 4.0: 0.0312, 8.0: 0.0, 16.0: 0.0078})
    """
    candidates = sorted({_check_gamma(g) for g in gammas})
    if not candidates or not batches:
        raise ValueError("choose_gamma needs at least one candidate gamma and one scoring batch")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if unit is None:
        if grads is None:
            raise ValueError("choose_gamma needs grads (or the unit factors, unit=unit_spectral_init(grads, config))")
        unit = unit_spectral_init(grads, config, svd=svd, key=key)
    dtype = jnp.dtype(config.dtype).name
    losses: dict[float, float] = {}
    seconds: list[float] = []

    def scored(batch, c) -> float:
        started = time.perf_counter()
        value = float(_scored(params, unit, batch, c, loss_fn=loss_fn, dtype=dtype))
        seconds.append(time.perf_counter() - started)
        return value

    def evaluate(i: int) -> float:
        gamma = candidates[i]
        if gamma not in losses:
            c = jnp.float32(1.0 / math.sqrt(gamma))
            values = [scored(batch, c) for batch in batches]
            if any(math.isnan(v) for v in values):
                raise FloatingPointError(
                    f"the loss at gamma={gamma:g} is NaN on a scoring batch; check the batches, "
                    "or drop this candidate from init.gammas"
                )
            losses[gamma] = float(np.mean(values))
        return losses[gamma]

    if search == "grid":
        for i in range(len(candidates)):
            evaluate(i)
    else:
        _golden_order(len(candidates), evaluate)
    best = min(losses, key=lambda g: (losses[g], g))
    return GammaChoice(best, dict(sorted(losses.items())), len(losses) * len(batches), tuple(seconds))
