"""SVD-based adapter inits: LoRA-One (spectral init from the gradient), PiSSA and LoRA-GA.

All three group the matrices that share a shape and a rank (every layer's ``q_proj``, ...), stack
them and compute their SVDs batched under one ``jax.jit`` per group (see ``lora_one_jax.svd``).
Matrices are taken in Flax orientation (d_in, d_out); the adapters come back in ``config.dtype``.
A gradient (or kernel) that is all zero or holds NaN/Inf, or whose SVD is not finite, raises a
``ValueError`` naming the module: there is no silent fallback.

Example:
    >>> g = {"fc": -jnp.outer(jnp.arange(1.0, 5.0), jnp.ones(3))}  # rank 1
    >>> ad = spectral_init(g, LoraConfig(rank=1), gamma=1.0)
    >>> bool(jnp.allclose(ad["fc"]["a"] @ ad["fc"]["b"], -g["fc"] / jnp.linalg.norm(g["fc"], 2)))
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lora_one_jax.config import Adapters, LoraConfig
from lora_one_jax.svd import top_svd


def _matrices(mats: Mapping[str, jax.Array], what: str) -> dict[str, jax.Array]:
    if not isinstance(mats, Mapping) or not mats:
        raise ValueError(
            f"{what} must be a non-empty dict {{module_path: (d_in, d_out) matrix}}, got {type(mats).__name__}"
        )
    out = {}
    for path, m in mats.items():
        if getattr(m, "ndim", None) != 2:
            raise ValueError(
                f"{what}[{path!r}] must be a 2-D (d_in, d_out) matrix, got shape {getattr(m, 'shape', None)}"
            )
        out[path] = m
    return out


@partial(jax.jit, static_argnames=("rank", "method", "negate"))
def _stacked_svd(x, key, *, rank, method, negate=False):
    x = -x.astype(jnp.float32) if negate else x.astype(jnp.float32)
    u, s, v = top_svd(x, rank, method=method, key=key)
    peak = jnp.max(jnp.abs(x), axis=(-2, -1))
    ok = jnp.isfinite(s).all(-1) & jnp.isfinite(u).all((-2, -1)) & jnp.isfinite(v).all((-2, -1))
    return u, s, v, peak, ok


def _grouped_svd(
    mats: dict[str, jax.Array], ranks: dict[str, int], *, method: str, key, what: str, negate: bool = False
):
    """``[(paths, u, s, v)]`` per group of equal (shape, rank): each matrix's SVD (negated if ``negate``), checked."""
    groups: dict[tuple, list[str]] = {}
    for path, m in mats.items():
        rank = ranks[path]
        if rank > min(m.shape):
            raise ValueError(
                f"{what} of {path!r} has shape {tuple(m.shape)}, too small for {rank} singular triplets; "
                "lower the rank for this module (LoraConfig.rank or rank_pattern)"
            )
        groups.setdefault((tuple(m.shape), rank), []).append(path)
    key = jax.random.key(0) if key is None else key
    results = []  # dispatch every group first (asynchronously), then check them
    for i, ((_, rank), paths) in enumerate(sorted(groups.items())):
        stack = jnp.stack([jnp.asarray(mats[p], jnp.float32) for p in paths])
        results.append(
            (paths, _stacked_svd(stack, jax.random.fold_in(key, i), rank=rank, method=method, negate=negate))
        )
    for paths, (_, _, _, peak, ok) in results:
        peak, ok = np.asarray(peak), np.asarray(ok)
        for j, path in enumerate(paths):
            if not np.isfinite(peak[j]):
                raise ValueError(
                    f"{what} of module {path!r} contains NaN or Inf; fix the loss or data (or exclude the module)"
                )
            if peak[j] == 0:
                raise ValueError(
                    f"{what} of module {path!r} is all zero, so it has no singular directions; check that the "
                    "module influences the loss on these batches, or exclude it from LoraConfig.targets"
                )
            if not ok[j]:
                raise ValueError(f"SVD of the {what} of module {path!r} returned NaN/Inf; retry with svd='exact'")
    return [(paths, u, s, v) for paths, (u, s, v, _, _) in results]


def _split(paths, a, b, dtype) -> Adapters:
    return {p: {"a": a[j].astype(dtype), "b": b[j].astype(dtype)} for j, p in enumerate(paths)}


def _balanced(paths, u, v, root, dtype) -> Adapters:
    """``A = U diag(root)``, ``B = diag(root) V^T`` for each stacked matrix (``root``: (k, r))."""
    return _split(paths, u * root[:, None, :], jnp.swapaxes(v * root[:, None, :], -1, -2), dtype)


def spectral_init(
    grads: Mapping[str, jax.Array],
    config: LoraConfig,
    *,
    gamma: float = 128.0,
    svd: str = "auto",
    key: jax.Array | None = None,
) -> Adapters:
    """LoRA-One's spectral init from full fine-tuning gradients ``{module_path: G (d_in, d_out)}``.

    With ``-G = P diag(s) Q^T`` and ``s1 = s[0]``, each module gets
    ``A0 = P[:, :r] sqrt(s[:r]) / sqrt(gamma s1)`` and ``B0 = sqrt(s[:r]) Q[:, :r]^T / sqrt(gamma s1)``,
    so ``A0 @ B0 = best_rank_r(-G) / (gamma s1)`` and ``A0^T A0 = B0 B0^T = diag(s[:r]) / (gamma s1)``.
    ``r = config.rank_for(path)``. The LoRA scale is not part of the formula: a merged kernel is
    ``W + scale * A0 @ B0``. The base weights are not changed. ``svd`` is ``"auto"``, ``"exact"`` or
    ``"randomized"`` (see ``lora_one_jax.svd``); ``key`` seeds the randomized sketch.

    Example:
        >>> g = {"fc": jax.random.normal(jax.random.key(0), (6, 5))}
        >>> ad = spectral_init(g, LoraConfig(rank=2))
        >>> ad["fc"]["a"].shape, ad["fc"]["b"].shape
        ((6, 2), (2, 5))
        >>> s = jnp.linalg.svd(g["fc"], compute_uv=False)
        >>> bool(jnp.allclose(ad["fc"]["a"].T @ ad["fc"]["a"], jnp.diag(s[:2]) / (128 * s[0]), atol=1e-6))
        True
    """
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    mats = _matrices(grads, "grads")
    dtype = jnp.dtype(config.dtype)
    out: Adapters = {}
    for paths, u, s, v in _grouped_svd(
        mats, {p: config.rank_for(p) for p in mats}, method=svd, key=key, what="gradient", negate=True
    ):
        out.update(_balanced(paths, u, v, jnp.sqrt(s) / jnp.sqrt(gamma * s[:, :1]), dtype))
    return {p: out[p] for p in mats}


def pissa_init(
    weights: Mapping[str, jax.Array], config: LoraConfig, *, svd: str = "auto", key: jax.Array | None = None
) -> Adapters:
    """PiSSA (Meng et al. 2024): adapters holding the top-r SVD of the kernels themselves.

    ``weights`` are ``{module_path: W (d_in, d_out)}`` in Flax orientation. With ``W = U S V^T``:
    ``A = U_r sqrt(S_r) / sqrt(scale)``, ``B = sqrt(S_r) V_r^T / sqrt(scale)``, so that
    ``scale * A @ B = best_rank_r(W)``. The frozen base must become the residual
    ``W - scale * A @ B``; ``init_adapters(..., method="pissa")`` does that for you.

    Example:
        >>> w = {"fc": jnp.diag(jnp.array([4.0, 1.0]))}
        >>> ad = pissa_init(w, LoraConfig(rank=1, alpha=2.0))  # scale 2
        >>> (2.0 * ad["fc"]["a"] @ ad["fc"]["b"]).round(5).tolist()
        [[4.0, 0.0], [0.0, 0.0]]
    """
    mats = _matrices(weights, "weights")
    dtype = jnp.dtype(config.dtype)
    out: Adapters = {}
    for paths, u, s, v in _grouped_svd(mats, {p: config.rank_for(p) for p in mats}, method=svd, key=key, what="kernel"):
        scale = jnp.asarray([config.scale_for(p) for p in paths], jnp.float32)[:, None]
        out.update(_balanced(paths, u, v, jnp.sqrt(s / scale), dtype))
    return {p: out[p] for p in mats}


def lora_ga_init(
    grads: Mapping[str, jax.Array],
    config: LoraConfig,
    *,
    gamma: float = 16.0,
    svd: str = "auto",
    key: jax.Array | None = None,
) -> Adapters:
    """LoRA-GA (Wang et al. 2024) from gradients ``{module_path: G (d_in, d_out)}``.

    With ``G = P diag(s) Q^T`` (2r triplets): ``A = P[:, :r] * c`` and ``B = Q[:, r:2r]^T * c`` (disjoint
    singular directions; the official ``direction="ArB2r"``) with their "stable" scale
    ``c = d_out ** 0.25 / sqrt(gamma)`` (official default ``stable_gamma=16``). Needs
    ``2 r <= min(d_in, d_out)``. ``A @ B != 0``, so the base must have ``scale * A @ B`` subtracted;
    ``init_adapters(..., method="lora-ga")`` does that for you.

    Example:
        >>> g = {"fc": jax.random.normal(jax.random.key(0), (8, 6))}
        >>> ad = lora_ga_init(g, LoraConfig(rank=2))
        >>> ad["fc"]["a"].shape, ad["fc"]["b"].shape
        ((8, 2), (2, 6))
    """
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    mats = _matrices(grads, "grads")
    dtype = jnp.dtype(config.dtype)
    out: Adapters = {}
    ranks = {p: config.rank_for(p) for p in mats}
    for path, r in ranks.items():
        if 2 * r > min(mats[path].shape):
            raise ValueError(
                f"LoRA-GA needs 2 * rank = {2 * r} <= min(d_in, d_out) for {path!r} of shape "
                f"{tuple(mats[path].shape)}; "
                "lower the rank for this module"
            )
    for paths, u, _, v in _grouped_svd(
        mats, {p: 2 * r for p, r in ranks.items()}, method=svd, key=key, what="gradient"
    ):
        r = u.shape[-1] // 2
        c = v.shape[-2] ** 0.25 / math.sqrt(gamma)  # v: (k, d_out, 2r)
        out.update(_split(paths, u[..., :r] * c, jnp.swapaxes(v[..., r:], -1, -2) * c, dtype))
    return {p: out[p] for p in mats}
