"""How well adapters are aligned with the gradient's (or any target's) dominant singular subspaces.

This is the quantity LoRA-One's theory is about: after a spectral init, the column space of A should
be the top-r left singular subspace of ``-G`` and the row space of B its top-r right singular
subspace (principal angles near 0); a random LoRA init is nearly orthogonal to them (angles near 90).

Example:
    >>> g = {"fc": jax.random.normal(jax.random.key(0), (8, 6))}
    >>> ad = lj.spectral_init(g, lj.LoraConfig(rank=2))
    >>> out = alignment(ad, g)["fc"]
    >>> out["left"] < 1e-2 and out["right"] < 1e-2  # degrees
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_one_jax.svd import principal_angles, top_svd


def subspace_angles(adapter: Mapping[str, jax.Array], matrix: jax.Array, *, svd: str = "auto") -> dict[str, np.ndarray]:
    """All principal angles (degrees, ascending) between one adapter and ``matrix`` (d_in, d_out).

    ``"left"``: between span(A) and the top-r left singular subspace of ``matrix``; ``"right"``: between
    the row space of B and its top-r right singular subspace (r = the adapter's rank).

    Example:
        >>> ad = {"a": jnp.eye(4, 2), "b": jnp.eye(2, 3)[::-1]}  # B spans e2, e1: same row space
        >>> angles = subspace_angles(ad, jnp.eye(4, 3) * jnp.array([5.0, 1.0, 0.5]))
        >>> angles["left"].round(4).tolist(), angles["right"].round(4).tolist()
        ([0.0, 0.0], [0.0, 0.0])
    """
    a, b = np.asarray(adapter["a"], np.float64), np.asarray(adapter["b"], np.float64)
    matrix = jnp.asarray(matrix, jnp.float32)
    if matrix.shape != (a.shape[0], b.shape[1]):
        raise ValueError(
            f"matrix has shape {matrix.shape}, expected (d_in, d_out) = {(a.shape[0], b.shape[1])} to match the adapter"
        )
    u, _, v = top_svd(matrix, a.shape[1], method=svd)
    return {"left": principal_angles(a, np.asarray(u)), "right": principal_angles(b.T, np.asarray(v))}


def alignment(
    adapters: Mapping[str, Mapping[str, jax.Array]], grads: Mapping[str, jax.Array], *, svd: str = "auto"
) -> dict[str, dict[str, float]]:
    """Per module, the largest principal angle (degrees) between the adapter and ``grads[path]``.

    ``{path: {"left": max angle(span(A), top-r left singular subspace of G),
    "right": max angle(row space of B, top-r right singular subspace of G)}}`` as plain floats, for
    every module in ``adapters``. The subspaces of ``-G`` and ``G`` are the same. ``grads`` may hold
    any (d_in, d_out) matrices, e.g. the true weight update of a synthetic problem. A rank-deficient
    factor (LoRA's ``B = 0``) counts its missing directions as 90 degrees. Use ``subspace_angles`` for
    all r angles of one module.

    Example:
        >>> ad = {"fc": {"a": jnp.eye(4, 2), "b": jnp.eye(2, 3)}}
        >>> out = alignment(ad, {"fc": jnp.eye(4, 3) * jnp.array([3.0, 2.0, 1.0])})
        >>> out["fc"]["left"] < 1e-6, out["fc"]["right"] < 1e-6
        (True, True)
        >>> alignment(ad, {"fc": jnp.eye(4, 3) * jnp.array([1.0, 2.0, 3.0])})["fc"]["right"]  # e2, e3 vs e1, e2
        90.0
    """
    missing = sorted(set(adapters) - set(grads))
    if missing:
        raise ValueError(f"grads lack the modules {missing[:10]} that the adapters have")
    out = {}
    for path, adapter in adapters.items():
        angles = subspace_angles(adapter, grads[path], svd=svd)
        out[path] = {side: float(angles[side].max()) for side in ("left", "right")}
    return out
