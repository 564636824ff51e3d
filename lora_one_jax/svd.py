"""Top-r SVDs, batched and jit-friendly, and principal angles between subspaces.

``top_svd`` works on a stack of matrices ``x`` of shape (..., m, n) and returns the r leading singular
triplets ``u`` (..., m, r), ``s`` (..., r) (descending) and ``v`` (..., n, r) with
``x ~= u @ diag(s) @ v^T``. Three methods:

* ``"exact"``: ``jnp.linalg.svd`` (thin), then the first r triplets.
* ``"randomized"``: a randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4): a Gaussian
  sketch with ``r + oversample`` columns, ``n_iter`` power iterations, each re-orthonormalised by QR,
  then the exact SVD of the small projected matrix. Error shrinks like ``(s_{k+1} / s_r)^(2 n_iter+1)``,
  so it agrees with ``"exact"`` on the top-r subspace whenever the spectrum has a gap after r.
* ``"auto"``: ``"exact"`` when ``min(m, n) <= AUTO_EXACT_MAX_DIM`` (1024) or when the sketch would
  not be smaller than the matrix, else ``"randomized"``.

All matmuls run at ``precision="highest"`` (no TF32/bf16 passes on accelerators).

Example:
    >>> x = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
    >>> u, s, v = top_svd(x, 2)
    >>> s.tolist()
    [3.0, 2.0]
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

SVD_METHODS = ("auto", "exact", "randomized")
AUTO_EXACT_MAX_DIM = 1024
_HI = jax.lax.Precision.HIGHEST


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _mm(x, y):
    return jnp.matmul(x, y, precision=_HI)


def resolve_svd_method(method: str, shape: tuple[int, ...], rank: int, oversample: int = 10) -> str:
    """The concrete method (``"exact"`` or ``"randomized"``) that ``method`` means for a matrix shape.

    Example:
        >>> resolve_svd_method("auto", (64, 32), 4), resolve_svd_method("auto", (4096, 4096), 16)
        ('exact', 'randomized')
    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown svd method {method!r}; choose one of {list(SVD_METHODS)}")
    small = min(shape[-2:])
    if method == "exact" or rank + oversample >= small:
        return "exact"
    if method == "randomized":
        return "randomized"
    return "exact" if small <= AUTO_EXACT_MAX_DIM else "randomized"


def _exact(x, rank):
    def one(m):
        u, s, vt = jnp.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank].T

    if x.ndim == 2:
        return one(x)
    # A stack goes through lax.map (one compiled loop), not a batched SVD: on CPU, XLA's batched SVD
    # of 4 x (576, 1536) took 20 s against 0.4 s per matrix (benchmarks/spectral_init_speed.py).
    u, s, v = jax.lax.map(one, x.reshape((-1,) + x.shape[-2:]))
    lead = x.shape[:-2]
    return u.reshape(lead + u.shape[1:]), s.reshape(lead + s.shape[1:]), v.reshape(lead + v.shape[1:])


def _randomized(x, rank, key, oversample, n_iter):
    m, n = x.shape[-2:]
    k = min(rank + oversample, m, n)
    omega = jax.random.normal(key, x.shape[:-2] + (n, k), x.dtype)
    q, _ = jnp.linalg.qr(_mm(x, omega))  # (..., m, k): an orthonormal basis of the sketched range
    for _ in range(n_iter):  # power iterations, re-orthonormalised each half-step
        z, _ = jnp.linalg.qr(_mm(_mT(x), q))
        q, _ = jnp.linalg.qr(_mm(x, z))
    ub, s, vt = jnp.linalg.svd(_mm(_mT(q), x), full_matrices=False)  # (..., k, n): small exact SVD
    return _mm(q, ub[..., :rank]), s[..., :rank], _mT(vt[..., :rank, :])


@partial(jax.jit, static_argnames=("rank", "method", "oversample", "n_iter"))
def top_svd(
    x: jax.Array,
    rank: int,
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    oversample: int = 10,
    n_iter: int = 4,
):
    """The ``rank`` leading singular triplets ``(u, s, v)`` of each matrix in ``x`` (..., m, n).

    Computed in float32; ``key`` seeds the randomized sketch (a fixed key when ``None``).

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (3, 40, 30))  # a stack of 3 matrices
        >>> u, s, v = top_svd(x, 4, method="randomized")
        >>> u.shape, s.shape, v.shape
        ((3, 40, 4), (3, 4), (3, 30, 4))
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2 or not 0 < rank <= min(x.shape[-2:]):
        raise ValueError(f"top_svd needs 0 < rank <= min(m, n); got rank {rank} for shape {x.shape}")
    if resolve_svd_method(method, x.shape, rank, oversample) == "exact":
        return _exact(x, rank)
    key = jax.random.key(0) if key is None else key
    return _randomized(x, rank, key, oversample, n_iter)


def best_rank(x, rank: int, *, method: str = "exact"):
    """The best rank-``rank`` approximation of ``x`` (Eckart–Young), in float32.

    Example:
        >>> best_rank(jnp.diag(jnp.array([3.0, 2.0, 1.0])), 1).tolist()
        [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    u, s, v = top_svd(x, rank, method=method)
    return _mm(u * s[..., None, :], _mT(v))


def _basis(x: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis of the column space of ``x`` (directions with tiny singular values dropped)."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return u[:, :0]
    return u[:, s > rtol * s[0]]


def principal_angles(x, y, *, degrees: bool = True) -> np.ndarray:
    """Principal angles between the column spaces of ``x`` (m, p) and ``y`` (m, q), ascending.

    Computed in float64 numpy, accurate for small angles too (sines for angles under 45 degrees,
    cosines above, after Knyazev & Argentati 2002). Returns ``max(p, q)`` angles; when the spaces
    differ in dimension (or one is rank-deficient, e.g. a LoRA ``B = 0``), the missing directions
    count as 90 degrees.

    Example:
        >>> principal_angles(np.eye(3)[:, :2], np.eye(3)[:, 1:]).round(6).tolist()
        [0.0, 90.0]
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"principal_angles needs two matrices with the same number of rows, got {x.shape} and {y.shape}"
        )
    want = max(x.shape[1], y.shape[1])
    qx, qy = _basis(x), _basis(y)
    if qx.shape[1] < qy.shape[1]:
        qx, qy = qy, qx
    k = qy.shape[1]  # angles between span(qy) and its nearest k-dim subspace in span(qx)
    if k == 0:
        angles = np.zeros(0)
    else:
        cos = np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)  # descending
        sin = np.clip(np.linalg.svd(qy - qx @ (qx.T @ qy), compute_uv=False), 0.0, 1.0)[::-1]  # ascending
        angles = np.where(cos**2 < 0.5, np.arccos(cos), np.arcsin(sin))
    angles = np.concatenate([np.sort(angles), np.full(want - k, np.pi / 2)])
    return np.degrees(angles) if degrees else angles
