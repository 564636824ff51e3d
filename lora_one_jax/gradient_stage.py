"""The gradient stage without the gradient: what the inits and the diagnostics need from G, one group of kernels
at a time.

The SVD inits (LoRA-One, LoRA-GA) and the diagnostics read the full fine-tuning gradient ``G`` only through a
few singular vectors per module. ``gradient_factors`` goes from the loss straight to them: per pass
(``gradient_passes``) it differentiates one group of kernels over all the micro-batches, keeps each init's
factors at gamma 1 (``rescale(unit, gamma, dtype)`` gives the adapters at any gamma), G's top-r subspaces and
the stability of those subspaces between the two halves of the micro-batches, then frees the group's
gradients. With one pass (``kernels_per_pass`` at least the number of targets) it is the one-pass pipeline
(``estimate_gradient``, then ``unit_spectral_init`` / LoRA-GA's SVD, ``gradient_subspaces``,
``gradient_stability``); with more, the peak memory holds one group's gradients instead of every kernel's.

For the stability the micro-batches are differentiated in halves and ``G`` is their weighted mean (exact: the
estimate is the plain mean over micro-batches), so the diagnostics cost no pass over the data of their own.

Example:
    >>> params = {"l0": {"kernel": jnp.eye(4)}, "l1": {"kernel": jnp.eye(4)[::-1]}}
    >>> loss_fn = lambda p, x: jnp.sum((x @ p["l0"]["kernel"] @ p["l1"]["kernel"]) ** 2)
    >>> x = [jnp.arange(8.0).reshape(2, 4), jnp.ones((2, 4))]
    >>> cfg = lj.LoraConfig(rank=1)
    >>> out = gradient_factors(loss_fn, params, x, cfg, kernels_per_pass=1, svd="exact", progress=False)
    >>> out.passes
    [['l0'], ['l1']]
    >>> one = lj.spectral_init(lj.estimate_gradient(loss_fn, params, x, cfg, progress=False), cfg, svd="exact")
    >>> ad = lj.rescale(out.unit["lora-one"], 128.0)
    >>> all(bool(jnp.allclose(ad[p]["a"] @ ad[p]["b"], one[p]["a"] @ one[p]["b"], atol=1e-6)) for p in one)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_one_jax.config import Adapters, LoraConfig, Target, find_targets
from lora_one_jax.diagnostics import gradient_subspaces, subspace_shifts, summarize_angles
from lora_one_jax.gradient import estimate_gradient, pad_micro_batches
from lora_one_jax.spectral import _plan, _run, _streamed_plan

#: The inits ``gradient_factors`` can prepare: their adapters at gamma 1 come from G's SVD alone.
GRADIENT_INITS = ("lora-one", "lora-ga")


class GradientFactors(NamedTuple):
    """What ``gradient_factors`` keeps of G: ``unit`` (init name -> its adapters at gamma 1, float32), ``subspaces``
    (``gradient_subspaces(G)``, or None), ``stability`` (``gradient_stability`` of the two halves' gradients, as
    its flat dict of floats; empty when not asked or with a single micro-batch) and ``passes`` (the module
    paths differentiated together, one list per pass)."""

    unit: dict[str, Adapters]
    subspaces: dict | None
    stability: dict[str, float]
    passes: list[list[str]]


def _pieces(n: int, halves: bool) -> list[tuple[int, int, bool]]:
    """``(start, stop, is_half)`` slices of ``n`` micro-batches: the two halves (and an odd one out), or all."""
    if not halves or n < 2:
        return [(0, n, False)]
    h = n // 2
    return [(0, h, True), (h, 2 * h, True)] + ([(2 * h, n, False)] if n % 2 else [])


@partial(jax.jit, donate_argnums=0)
def _add_scaled(acc, grads, weight):
    """``acc + weight * grads`` per module (``acc``'s buffers reused)."""
    return {p: acc[p] + weight * grads[p] for p in acc}


@jax.jit
def _scaled(grads, weight):
    return {p: weight * g for p, g in grads.items()}


def _check_lora_ga(targets: dict[str, Target]) -> None:
    """LoRA-GA's 2r singular triplets fit every module (a ``ValueError`` naming the module, before any pass)."""
    shapes = {p: jax.ShapeDtypeStruct((t.d_in, t.d_out), jnp.float32) for p, t in targets.items()}
    _plan(shapes, {p: t.rank for p, t in targets.items()}, "gradient", factor=2)


def _group_gradient(estimate: Callable, batches: list, pieces, paths, config: LoraConfig, svd: str):
    """The group's gradient over all micro-batches, and its top-r subspaces on each half (when ``pieces`` has
    halves): the pieces one after another, each added into the running mean and freed (two copies at most)."""
    n, acc, halves = len(batches), None, []
    for start, stop, half in pieces:
        grads = estimate(batches[start:stop], modules=paths)
        if half:
            halves.append(gradient_subspaces(grads, config, svd=svd))
        if len(pieces) == 1:
            return grads, halves
        weight = jnp.float32((stop - start) / n)
        acc = _scaled(grads, weight) if acc is None else _add_scaled(acc, grads, weight)
        del grads
    return acc, halves


def gradient_factors(
    loss_fn: Callable[[Any, Any], jax.Array],
    params,
    batches: Iterable,
    config: LoraConfig,
    *,
    inits: Sequence[str] = ("lora-one",),
    subspaces: bool = False,
    stability: bool = False,
    svd: str = "auto",
    key: jax.Array | None = None,
    kernels_per_pass: int | None = None,
    max_bytes: int | None = None,
    micro_batches_per_step: int = 8,
    progress: bool = True,
    targets: dict[str, Target] | None = None,
) -> GradientFactors:
    """From the loss to what the inits and diagnostics need of G (see the module doc), one group per pass.

    ``inits``: any of ``GRADIENT_INITS``; ``unit["lora-one"]`` is ``unit_spectral_init(G, config, svd=svd,
    key=key)`` and ``unit["lora-ga"]`` is ``lora_ga_init(G, config, gamma=1, svd=svd, key=key)`` in float32:
    ``rescale(unit[init], gamma, config.dtype)`` gives the adapters at ``gamma`` (LoRA-GA's subtract from the
    base: ``unmerge``). ``subspaces``: also ``gradient_subspaces(G, config, svd=svd)``; ``stability``: also
    ``gradient_stability`` between the gradients of the first and the second half of the micro-batches (G is
    then their mean, plus an odd micro-batch out: the same G, no extra pass). Passes as ``gradient_passes``:
    at most ``kernels_per_pass`` kernels or ``max_bytes`` of float32 gradients held at once (with
    ``stability``, a group's running mean and one half's gradients: each pass's group gets half the bytes);
    with neither, one pass when the gradients fit in half the free memory. Passes of whole SVD groups (the
    default, and whenever a group fits) give the one-pass results exactly; a group split across passes gets
    the same results with ``svd="exact"`` and sketches of its own with ``"randomized"``. The other arguments
    are ``estimate_gradient``'s.

    Example:
        >>> params = {"fc": {"kernel": jnp.ones((6, 5))}}
        >>> loss_fn = lambda p, x: jnp.sum(jnp.sin(x @ p["fc"]["kernel"]))
        >>> x = [jax.random.normal(jax.random.key(i), (3, 6)) for i in range(4)]
        >>> out = gradient_factors(loss_fn, params, x, lj.LoraConfig(rank=1), inits=("lora-one", "lora-ga"),
        ...                        subspaces=True, stability=True, progress=False)
        >>> sorted(out.unit), out.unit["lora-ga"]["fc"]["a"].shape, sorted(out.subspaces["fc"])
        (['lora-ga', 'lora-one'], (6, 1), ['left', 'right'])
        >>> sorted(out.stability)[:2]
        ['grad_stability/left_max', 'grad_stability/left_max_mean']
    """
    unknown = sorted(set(inits) - set(GRADIENT_INITS))
    if unknown:
        raise ValueError(f"inits {unknown} do not start from the gradient; choose among {list(GRADIENT_INITS)}")
    targets = find_targets(params, config) if targets is None else targets
    if "lora-ga" in inits:
        _check_lora_ga(targets)
    batches = pad_micro_batches(list(batches))  # one shape for every piece: one compiled gradient step
    if not batches:
        raise ValueError("batches is empty: gradient_factors needs at least one micro-batch")
    pieces = _pieces(len(batches), stability)
    budget = max_bytes if max_bytes is None or len(pieces) == 1 else max(1, max_bytes // 2)
    passes = _streamed_plan(params, config, kernels_per_pass, budget, targets)
    estimate = partial(
        estimate_gradient,
        loss_fn,
        params,
        config=config,
        micro_batches_per_step=micro_batches_per_step,
        progress=progress,
        targets=targets,
    )
    unit_config = dataclasses.replace(config, dtype="float32")
    unit: dict[str, Adapters] = {init: {} for init in inits}
    subs, shifts = ({} if subspaces else None), {}
    for group in passes:
        paths = [p for _, (_, ps, _) in group for p in ps]
        grads, halves = _group_gradient(estimate, batches, pieces, paths, config, svd)
        for init in inits:
            unit[init].update(
                _run(grads, unit_config, kind=init, method=svd, key=key, what="gradient", gamma=1.0, plan=group)
            )
        if subs is not None:
            subs.update(gradient_subspaces(grads, config, svd=svd))
        if halves:
            shifts.update(subspace_shifts(*halves))
        del grads  # every SVD above has been checked (waited for): the group's gradients are free
    order = sorted(targets)
    return GradientFactors(
        unit={init: {p: factors[p] for p in order} for init, factors in unit.items()},
        subspaces=None if subs is None else {p: subs[p] for p in order},
        stability=summarize_angles(shifts, "grad_stability/") if shifts else {},
        passes=[[p for _, (_, ps, _) in group for p in ps] for group in passes],
    )
