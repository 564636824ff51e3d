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

For logging during training, compute the gradient's subspaces once (``gradient_subspaces``) and summarise
the angles at every evaluation as a flat dict of floats (``alignment_summary``); ``gradient_stability``
says, once at init, how far G's top-r subspaces move between two disjoint sets of gradient examples.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_one_jax.config import LoraConfig
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


# ----------------------------------------------------------------------------- logged with every evaluation


def gradient_subspaces(
    grads: Mapping[str, jax.Array], config: LoraConfig, *, svd: str = "auto", key: jax.Array | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Per module, orthonormal bases of the top-r left (d_in, r) and right (d_out, r) singular subspaces of
    ``grads[path]`` (r = ``config.rank_for(path)``), as float64 numpy: compute them once, compare often.

    Matrices of one shape and rank share one stacked ``top_svd`` (``svd``: ``"auto"``, ``"exact"`` or
    ``"randomized"``; ``key`` seeds the sketch). The subspaces of ``G`` and ``-G`` are the same.

    Example:
        >>> sub = gradient_subspaces({"fc": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}, lj.LoraConfig(rank=2))
        >>> np.abs(sub["fc"]["left"]).round(6).tolist()
        [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    """
    groups: dict[tuple, list[str]] = {}
    for path, g in grads.items():
        if getattr(g, "ndim", None) != 2:
            raise ValueError(f"grads[{path!r}] must be a (d_in, d_out) matrix, got shape {getattr(g, 'shape', None)}")
        groups.setdefault((tuple(g.shape), config.rank_for(path)), []).append(path)
    out = {}
    for (_, rank), paths in groups.items():
        stack = jnp.stack([jnp.asarray(grads[p], jnp.float32) for p in paths])
        if not bool(jnp.isfinite(stack).all()):
            bad = [p for p in paths if not bool(jnp.isfinite(grads[p]).all())]
            raise ValueError(f"the gradients of {bad[:10]} hold NaN or Inf; their subspaces are undefined")
        u, _, v = top_svd(stack, rank, method=svd, key=key)
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        out.update({p: {"left": u[i], "right": v[i]} for i, p in enumerate(paths)})
    return {p: out[p] for p in grads}


def _gram_basis(x: np.ndarray, rtol: float) -> np.ndarray:
    """Orthonormal columns spanning ``x`` (m, k) from two rounds of ``x^T x`` eigendecompositions (like
    CholeskyQR2): only k x k decompositions and matrix products touch the tall matrix. Directions with
    ``sqrt(lam) <= rtol * max`` in the first round are dropped."""
    for round_ in range(2):
        lam, w = np.linalg.eigh(x.T @ x)
        if round_ == 0:
            keep = lam > (rtol**2) * lam.max() if lam.size and lam.max() > 0 else np.zeros(lam.shape, bool)
        else:
            keep = lam > 0
        x = x @ (w[:, keep] / np.sqrt(lam[keep]))
    return x


def gram_principal_angles(x, y, *, rtol: float = 1e-6) -> np.ndarray:
    """Principal angles (degrees, ascending) between the column spaces of ``x`` (m, p) and ``y`` (m, q): the
    same as ``principal_angles`` (``max(p, q)`` angles, missing directions 90 degrees, sines for small
    angles and cosines for large ones), but the tall matrices only enter matrix products and k x k
    eigendecompositions (``_gram_basis``), never a LAPACK SVD of a tall matrix.

    Why: with several processes sharing a few cores, multi-threaded LAPACK on tall-skinny matrices made
    ``principal_angles`` ~20x slower (measured: 17 s instead of 0.5-1 s for 210 modules of SmolLM2-135M's shapes).
    In float64; agrees with ``principal_angles`` to about 1e-6 degrees for well-conditioned inputs.

    Example:
        >>> gram_principal_angles(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), np.eye(3)[:, :2]).round(4).tolist()
        [0.0, 45.0]
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"gram_principal_angles needs (m, p) and (m, q) matrices, got {x.shape} and {y.shape}")
    want = max(x.shape[1], y.shape[1])
    qx, qy = _gram_basis(x, rtol), _gram_basis(y, rtol)
    if qx.shape[1] < qy.shape[1]:
        qx, qy = qy, qx
    k = qy.shape[1]
    if k == 0:
        return np.full(want, 90.0)
    cos = np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)  # descending
    residual = qy - qx @ (qx.T @ qy)
    sin = np.sqrt(np.clip(np.linalg.eigvalsh(residual.T @ residual), 0.0, 1.0))  # ascending
    angles = np.where(cos**2 < 0.5, np.arccos(cos), np.arcsin(sin))
    return np.concatenate([np.sort(np.degrees(angles)), np.full(want - k, 90.0)])


def adapter_angles(
    adapters: Mapping[str, Mapping[str, jax.Array]], subspaces: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """Per module, all principal angles (degrees, ascending) between span(A) and the ``"left"`` subspace and
    between the row space of B and the ``"right"`` subspace of ``subspaces[path]`` (``gradient_subspaces``).

    Example:
        >>> sub = gradient_subspaces({"fc": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}, lj.LoraConfig(rank=1))
        >>> ad = {"fc": {"a": jnp.array([[0.0], [1.0], [1.0]]), "b": jnp.array([[2.0, 0.0, 0.0]])}}
        >>> {k: v.round(3).tolist() for k, v in adapter_angles(ad, sub)["fc"].items()}
        {'left': [90.0], 'right': [0.0]}
    """
    missing = sorted(set(adapters) - set(subspaces))
    if missing:
        raise ValueError(f"no gradient subspaces for the modules {missing[:10]}; compute them for every adapter")
    out = {}
    for path, ad in adapters.items():
        a, b = np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError(f"adapter {path!r} holds NaN or Inf; its subspaces are undefined")
        out[path] = {
            "left": gram_principal_angles(a, subspaces[path]["left"]),
            "right": gram_principal_angles(b.T, subspaces[path]["right"]),
        }
    return out


def summarize_angles(angles: Mapping[str, Mapping[str, np.ndarray]], prefix: str = "") -> dict[str, float]:
    """A flat dict of floats (degrees) from per-module principal angles, for logs and plots.

    For each side (``left``, ``right``): ``{side}_mean``, the mean over modules of the module's mean angle;
    ``{side}_max_mean``, the mean over modules of the module's largest angle; ``{side}_max``, the largest
    angle of any module. Keys are prefixed with ``prefix``.

    Example:
        >>> ang = {"m1": {"left": np.array([0.0, 10.0]), "right": np.array([0.0, 0.0])},
        ...        "m2": {"left": np.array([20.0, 30.0]), "right": np.array([0.0, 90.0])}}
        >>> summarize_angles(ang, "align/")  # doctest: +NORMALIZE_WHITESPACE
        {'align/left_mean': 15.0, 'align/left_max_mean': 20.0, 'align/left_max': 30.0,
         'align/right_mean': 22.5, 'align/right_max_mean': 45.0, 'align/right_max': 90.0}
    """
    if not angles:
        raise ValueError("summarize_angles needs the angles of at least one module")
    out = {}
    for side in ("left", "right"):
        means = [float(np.mean(a[side])) for a in angles.values()]
        maxes = [float(np.max(a[side])) for a in angles.values()]
        out[f"{prefix}{side}_mean"] = float(np.mean(means))
        out[f"{prefix}{side}_max_mean"] = float(np.mean(maxes))
        out[f"{prefix}{side}_max"] = float(np.max(maxes))
    return out


def alignment_summary(
    adapters: Mapping[str, Mapping[str, jax.Array]],
    subspaces: Mapping[str, Mapping[str, np.ndarray]],
    *,
    prefix: str = "align/",
) -> dict[str, float]:
    """``summarize_angles`` of ``adapter_angles``: how aligned the adapters are now with the initial gradient's
    top-r subspaces, as a flat dict of floats in degrees (0: inside them, 90: orthogonal) to log at every
    evaluation. A LoRA B = 0 counts its missing row space as 90 degrees.

    Example:
        >>> g = {"fc": jax.random.normal(jax.random.key(0), (8, 6))}
        >>> cfg = lj.LoraConfig(rank=2)
        >>> out = alignment_summary(lj.spectral_init(g, cfg), gradient_subspaces(g, cfg))
        >>> len(out), out["align/left_max"] < 0.01, out["align/right_max"] < 0.01
        (6, True, True)
    """
    return summarize_angles(adapter_angles(adapters, subspaces), prefix)


def gradient_stability(
    grads_1: Mapping[str, jax.Array],
    grads_2: Mapping[str, jax.Array],
    config: LoraConfig,
    *,
    svd: str = "auto",
    key: jax.Array | None = None,
    prefix: str = "grad_stability/",
) -> dict[str, float]:
    """How far G's top-r subspaces move between two gradient estimates from disjoint examples: the principal
    angles (degrees) between their left and between their right subspaces, summarised like
    ``summarize_angles``. Small angles: the init's directions are a property of the task, not of the few
    examples. Estimating ``grads_1`` and ``grads_2`` on the two halves of the gradient examples costs nothing
    extra: their mean is the full estimate.

    Example:
        >>> g = jax.random.normal(jax.random.key(0), (8, 6))
        >>> cfg = lj.LoraConfig(rank=2)
        >>> gradient_stability({"fc": g}, {"fc": 3.0 * g}, cfg)["grad_stability/left_max"] < 0.01  # same subspaces
        True
    """
    if set(grads_1) != set(grads_2):
        raise ValueError(
            f"the two gradient estimates cover different modules: {sorted(set(grads_1) ^ set(grads_2))[:10]}"
        )
    s1 = gradient_subspaces(grads_1, config, svd=svd, key=key)
    s2 = gradient_subspaces(grads_2, config, svd=svd, key=key)
    return summarize_angles(subspace_shifts(s1, s2), prefix)


def subspace_shifts(
    subspaces_1: Mapping[str, Mapping[str, np.ndarray]], subspaces_2: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """Per module, the principal angles (degrees, ascending) between the ``"left"`` and between the ``"right"``
    subspaces of two ``gradient_subspaces`` results: what ``gradient_stability`` summarises.

    Example:
        >>> cfg = lj.LoraConfig(rank=1)
        >>> s1 = gradient_subspaces({"fc": jnp.diag(jnp.array([3.0, 1.0]))}, cfg)
        >>> s2 = gradient_subspaces({"fc": jnp.diag(jnp.array([1.0, 3.0]))}, cfg)
        >>> {k: v.round(3).tolist() for k, v in subspace_shifts(s1, s2)["fc"].items()}
        {'left': [90.0], 'right': [90.0]}
    """
    if set(subspaces_1) != set(subspaces_2):
        raise ValueError(
            f"the two sets of subspaces cover different modules: {sorted(set(subspaces_1) ^ set(subspaces_2))[:10]}"
        )
    one, two = subspaces_1, subspaces_2
    return {p: {side: principal_angles(one[p][side], two[p][side]) for side in ("left", "right")} for p in one}
