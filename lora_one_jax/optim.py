"""Optax transforms for LoRA-One: the scaled-GD preconditioner and the full optimizer.

An *adapter pair* is any dict in the updates tree with exactly the keys ``"a"`` and ``"b"`` whose
arrays have shapes (..., d_in, r) and (..., r, d_out) (leading axes, e.g. stacked layers, are
batched over). Everything else passes through untouched, so the transform can sit in a chain that
optimises other parameters too.

Example:
    >>> import optax
    >>> params = {"fc": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> opt = optax.chain(lora_one_precond(), optax.adamw(1e-3))
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> jax.tree.map(jnp.shape, updates)
    {'fc': {'a': (4, 2), 'b': (2, 3)}}
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from optax._src.base import NO_PARAMS_MSG  # optax's own missing-params message (not re-exported)

_HI = jax.lax.Precision.HIGHEST


def _is_pair(x) -> bool:
    if not isinstance(x, Mapping) or set(x.keys()) != {"a", "b"}:
        return False
    a, b = x["a"], x["b"]
    sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
    return sa is not None and sb is not None and len(sa) == len(sb) >= 2 and sa[:-2] == sb[:-2] and sa[-1] == sb[-2]


def precondition_pair(grad: Mapping, param: Mapping, damping: float) -> dict:
    """Scaled-GD step direction for one adapter pair, using the pre-step ``param`` factors.

    ``gA <- gA @ inv(B B^T + damping I)`` and ``gB <- inv(A^T A + damping I) @ gB``, in float32 by
    linear solves, cast back to each gradient's dtype.

    Example:
        >>> p = {"a": jnp.eye(3, 2), "b": 2 * jnp.eye(2, 3)}
        >>> g = {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 3))}
        >>> out = precondition_pair(g, p, 0.0)
        >>> out["a"][0].tolist(), out["b"][0].tolist()  # B B^T = 4 I, A^T A = I
        ([0.25, 0.25], [1.0, 1.0, 1.0])
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    a, b, ga, gb = f32(param["a"]), f32(param["b"]), f32(grad["a"]), f32(grad["b"])
    eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
    bbt = jnp.matmul(b, jnp.swapaxes(b, -1, -2), precision=_HI) + damping * eye
    ata = jnp.matmul(jnp.swapaxes(a, -1, -2), a, precision=_HI) + damping * eye
    # gA @ inv(M) with M symmetric is (M^-1 gA^T)^T = solve(M, gA^T)^T
    new_ga = jnp.swapaxes(jnp.linalg.solve(bbt, jnp.swapaxes(ga, -1, -2)), -1, -2)
    new_gb = jnp.linalg.solve(ata, gb)
    return {"a": new_ga.astype(jnp.asarray(grad["a"]).dtype), "b": new_gb.astype(jnp.asarray(grad["b"]).dtype)}


def lora_one_precond(damping: float = 1e-6) -> optax.GradientTransformation:
    """Riemannian / scaled-GD preconditioner of LoRA-One (Zhang & Pilanci 2024), stateless.

    For every adapter pair in the updates (see module doc) it returns ``gA @ inv(B B^T + damping I)``
    and ``inv(A^T A + damping I) @ gB`` with A, B the parameters *before* the step (so
    ``update(updates, state, params)`` needs ``params``). Leaves that are not adapter pairs are left
    untouched, as is a pair partly masked out (e.g. by ``optax.masked``). Chain it before the base
    optimizer: ``optax.chain(lora_one_precond(), optax.adamw(lr))``. Note that with a plain LoRA
    init (B = 0) the A-gradient gets divided by ``damping``: the transform is meant for a spectral
    (non-degenerate) init.

    Example:
        >>> p = {"fc": {"a": jnp.eye(3, 2), "b": 2 * jnp.eye(2, 3)}, "bias": jnp.ones(3)}
        >>> g = jax.tree.map(jnp.ones_like, p)
        >>> u, _ = lora_one_precond(damping=1e-12).update(g, optax.EmptyState(), p)
        >>> u["fc"]["a"][0].tolist(), u["bias"].tolist()
        ([0.25, 0.25], [1.0, 1.0, 1.0])
    """
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not 0 < float(damping) < float("inf"):
        raise ValueError(
            f"damping must be a finite number > 0, got {damping!r}: it keeps inv(B B^T + damping I) finite when a "
            "factor is rank-deficient (with 0, LoRA's B = 0 init or a collapsed factor makes every update NaN)"
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                f"{NO_PARAMS_MSG} lora_one_precond uses the pre-step A and B: call opt.update(grads, state, params)."
            )

        def visit(g, p):
            return precondition_pair(g, p, damping) if _is_pair(g) and _is_pair(p) else g

        return jax.tree.map(visit, updates, params, is_leaf=_is_pair), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lora_one(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 1e-6,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """LoRA-One's optimizer: ``optax.chain(lora_one_precond(damping), optax.adamw(...))``.

    ``learning_rate`` is a float or an optax schedule.

    Example:
        >>> opt = lora_one(optax.linear_schedule(1e-3, 0.0, 100), weight_decay=0.01)
        >>> p = {"fc": {"a": jnp.eye(3, 2), "b": jnp.eye(2, 3)}}
        >>> u, _ = opt.update(jax.tree.map(jnp.ones_like, p), opt.init(p), p)
        >>> u["fc"]["a"].shape
        (3, 2)
    """
    return optax.chain(
        lora_one_precond(damping),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )
