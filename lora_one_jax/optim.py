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

import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src.base import NO_PARAMS_MSG  # optax's own missing-params message (not re-exported)

_HI = jax.lax.Precision.HIGHEST


def _is_pair(x) -> bool:
    if not isinstance(x, Mapping) or set(x.keys()) != {"a", "b"}:
        return False
    a, b = x["a"], x["b"]
    sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
    return sa is not None and sb is not None and len(sa) == len(sb) >= 2 and sa[:-2] == sb[:-2] and sa[-1] == sb[-2]


def _grams(a: jax.Array, b: jax.Array, damping: float) -> tuple[jax.Array, jax.Array]:
    """``(A^T A + damping I, B B^T + damping I)`` in float32, batched over leading axes."""
    eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    ata = jnp.matmul(jnp.swapaxes(a, -1, -2), a, precision=_HI) + damping * eye
    bbt = jnp.matmul(b, jnp.swapaxes(b, -1, -2), precision=_HI) + damping * eye
    return ata, bbt


def _apply(ga, gb, inv_ata, inv_bbt) -> tuple[jax.Array, jax.Array]:
    new_ga = jnp.matmul(ga.astype(jnp.float32), inv_bbt, precision=_HI)
    new_gb = jnp.matmul(inv_ata, gb.astype(jnp.float32), precision=_HI)
    return new_ga.astype(ga.dtype), new_gb.astype(gb.dtype)


def _inverse(m: jax.Array) -> jax.Array:
    """Inverses of a stack of small (r, r) matrices in one batched LU solve."""
    return jnp.linalg.solve(m, jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape))


def precondition_pair(grad: Mapping, param: Mapping, damping: float) -> dict:
    """Scaled-GD step direction for one adapter pair, using the pre-step ``param`` factors.

    ``gA <- gA @ inv(B B^T + damping I)`` and ``gB <- inv(A^T A + damping I) @ gB``, in float32,
    cast back to each gradient's dtype. ``lora_one_precond`` computes the same for every pair of a
    tree at once (one batched inverse per rank instead of two solves per pair).

    Example:
        >>> p = {"a": jnp.eye(3, 2), "b": 2 * jnp.eye(2, 3)}
        >>> g = {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 3))}
        >>> out = precondition_pair(g, p, 0.0)
        >>> out["a"][0].tolist(), out["b"][0].tolist()  # B B^T = 4 I, A^T A = I
        ([0.25, 0.25], [1.0, 1.0, 1.0])
    """
    ata, bbt = _grams(jnp.asarray(param["a"]), jnp.asarray(param["b"]), damping)
    new_ga, new_gb = _apply(jnp.asarray(grad["a"]), jnp.asarray(grad["b"]), _inverse(ata), _inverse(bbt))
    return {"a": new_ga, "b": new_gb}


def _precondition_tree(updates, params, damping: float):
    """``precondition_pair`` on every adapter pair of ``updates``, batched.

    Pairs with equal shapes are stacked (every layer's q_proj, ...) so that their Gram matrices come
    from one batched matmul, and all Gram matrices of one rank are inverted by one batched solve: a
    handful of ops in the compiled step instead of two LU solves per pair (the per-pair version cost
    a 210-pair SmolLM2 step +80% time and 3.5x compile time; see benchmarks/speed.py).
    """
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_pair)
    param_leaves = treedef.flatten_up_to(params)
    groups: dict[tuple, list[int]] = {}
    for i, (g, p) in enumerate(zip(leaves, param_leaves)):
        if _is_pair(g) and _is_pair(p):
            key = (tuple(p["a"].shape), tuple(p["b"].shape), tuple(g["a"].shape), tuple(g["b"].shape))
            groups.setdefault(key, []).append(i)
    if not groups:
        return updates
    stacked = []  # per group: (indices, ata, bbt)
    for idx in groups.values():
        a = jnp.stack([param_leaves[i]["a"] for i in idx])
        b = jnp.stack([param_leaves[i]["b"] for i in idx])
        stacked.append((idx, *_grams(a, b, damping)))
    by_rank: dict[int, list[int]] = {}  # one batched inverse per rank r for all Gram matrices of that size
    for n, (_, ata, _) in enumerate(stacked):
        by_rank.setdefault(ata.shape[-1], []).append(n)
    inverses: dict[int, tuple[jax.Array, jax.Array]] = {}
    for members in by_rank.values():
        flat = [m.reshape((-1,) + m.shape[-2:]) for n in members for m in stacked[n][1:]]
        inv = _inverse(jnp.concatenate(flat))
        offset = 0
        for n, f in zip(members, range(0, len(flat), 2)):
            ata, bbt = stacked[n][1:]
            k_a, k_b = flat[f].shape[0], flat[f + 1].shape[0]
            inv_ata = inv[offset : offset + k_a].reshape(ata.shape)
            inv_bbt = inv[offset + k_a : offset + k_a + k_b].reshape(bbt.shape)
            inverses[n] = (inv_ata, inv_bbt)
            offset += k_a + k_b
    out = list(leaves)
    for n, (idx, _, _) in enumerate(stacked):
        ga = jnp.stack([leaves[i]["a"] for i in idx])
        gb = jnp.stack([leaves[i]["b"] for i in idx])
        new_ga, new_gb = _apply(ga, gb, *inverses[n])
        for k, i in enumerate(idx):
            out[i] = {"a": new_ga[k], "b": new_gb[k]}
    return jax.tree.unflatten(treedef, out)


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
    value = _real_value(damping, "damping") if not isinstance(damping, (bool, np.bool_)) else math.nan
    if not (math.isfinite(value) and value > 0) and not isinstance(damping, jax.core.Tracer):
        raise ValueError(
            f"damping must be a finite number > 0, got {damping!r}: it keeps inv(B B^T + damping I) finite when a "
            "factor is rank-deficient (with 0, LoRA's B = 0 init or a collapsed factor makes every update NaN)"
        )
    damping = damping if isinstance(damping, jax.Array) else value  # an array under optax.inject_hyperparams

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                f"{NO_PARAMS_MSG} lora_one_precond uses the pre-step A and B: call opt.update(grads, state, params)."
            )

        return _precondition_tree(updates, params, damping), state

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

    ``learning_rate`` is a float > 0 or an optax schedule (a callable of the step). A rate that is zero,
    negative, NaN or infinite, ``b1`` / ``b2`` outside [0, 1), or a negative ``eps`` / ``weight_decay`` raise
    ``ValueError`` here rather than training silently in the wrong direction.

    Example:
        >>> opt = lora_one(optax.linear_schedule(1e-3, 0.0, 100), weight_decay=0.01)
        >>> p = {"fc": {"a": jnp.eye(3, 2), "b": jnp.eye(2, 3)}}
        >>> u, _ = opt.update(jax.tree.map(jnp.ones_like, p), opt.init(p), p)
        >>> u["fc"]["a"].shape
        (3, 2)
        >>> lora_one(-1e-2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: learning_rate must be a finite number > 0 (or an optax schedule), got -0.01; ...
    """
    _check_hyperparameters(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(
        lora_one_precond(damping),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def _real_value(value, name: str) -> float:
    """``value`` as a float (NaN for a traced value, e.g. under ``optax.inject_hyperparams`` in a jitted step)."""
    if isinstance(value, jax.core.Tracer):
        return math.nan
    scalar_array = isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
    if isinstance(value, (bool, np.bool_)) or not (
        isinstance(value, numbers.Real) or (scalar_array and jnp.issubdtype(value.dtype, jnp.floating))
    ):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _check_hyperparameters(learning_rate, **others) -> None:
    """A clear ``ValueError`` for a rate that is not finite and > 0, and for AdamW settings out of range."""
    if not callable(learning_rate):
        lr = _real_value(learning_rate, "learning_rate")
        if not (math.isfinite(lr) and lr > 0) and not isinstance(learning_rate, jax.core.Tracer):
            raise ValueError(
                f"learning_rate must be a finite number > 0 (or an optax schedule), got {lr!r}; "
                "a typical LoRA-One rate is 1e-4 to 1e-3 (a negative rate ascends the loss, 0 never moves)"
            )
    ranges = {"b1": (0.0, 1.0), "b2": (0.0, 1.0), "eps": (0.0, math.inf), "weight_decay": (0.0, math.inf)}
    for name, value in others.items():
        low, high = ranges[name]
        v = _real_value(value, name)
        if not (math.isfinite(v) and low <= v < high) and not isinstance(value, jax.core.Tracer):
            raise ValueError(f"{name} must be a finite number in [{low}, {high}), got {v!r}")
