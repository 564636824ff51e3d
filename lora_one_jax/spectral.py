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
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_one_jax.config import OUTPUT_HEADS, Adapters, LoraConfig, Target, find_targets, matches
from lora_one_jax.gradient import estimate_gradient
from lora_one_jax.sharding import mesh_of, to_numpy
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


def _gamma(gamma) -> float:
    """``gamma`` as a Python float: any real number (Python, numpy or a 0-d array) that is finite and > 0."""
    scalar_array = isinstance(gamma, (np.ndarray, jax.Array)) and gamma.shape == ()
    real = isinstance(gamma, numbers.Real) or (scalar_array and jnp.issubdtype(gamma.dtype, jnp.floating))
    if isinstance(gamma, (bool, np.bool_)) or not real:
        raise TypeError(f"gamma must be a real number (e.g. 128.0), got {gamma!r} ({type(gamma).__name__})")
    value = float(gamma)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"gamma must be a finite number > 0 (e.g. 128.0), got {value!r}")
    return value


def _targeted(mats: dict[str, jax.Array], config: LoraConfig) -> dict[str, jax.Array]:
    """``mats`` itself if ``config`` targets every module in it; a ``ValueError`` naming the others."""
    if config.targets == "all-linear":
        stray = [p for p in mats if any(p == h or p.endswith("/" + h) for h in OUTPUT_HEADS)]
    else:
        stray = [p for p in mats if not matches(config.targets, p)]
    if config.exclude is not None:
        stray += [p for p in mats if p not in stray and matches(config.exclude, p)]
    if stray:
        raise ValueError(
            f"gradients for {len(stray)} module(s) the config does not target: {sorted(stray)[:10]}"
            f"{' ...' if len(stray) > 10 else ''} (targets={config.targets!r}, exclude={config.exclude!r}); "
            "estimate the gradients with the same LoraConfig, or drop those modules from grads"
        )
    return mats


def _plan(mats: dict[str, jax.Array], ranks: dict[str, int], what: str, factor: int = 1) -> tuple:
    """Groups of equal (shape up to a transpose, rank) as a static ``((rank, (path, ...), (transposed, ...)), ...)``.

    A matrix taller than wide is taken transposed (its SVD swaps u and v), so (d, k) and (k, d) matrices
    (e.g. a Llama's down_proj and up_proj) share one stack and one compiled program. Too-small matrices raise.
    """
    groups: dict[tuple, list[str]] = {}
    for path, m in mats.items():
        rank = ranks[path]
        if factor * rank > min(m.shape):
            need = f"{factor} * rank = {factor * rank}" if factor > 1 else f"{rank} singular triplets"
            raise ValueError(
                f"{what} of {path!r} has shape {tuple(m.shape)}, too small for {need}; "
                "lower the rank for this module (LoraConfig.rank or rank_pattern)"
            )
        groups.setdefault((min(m.shape), max(m.shape), rank), []).append(path)
    return tuple(
        (rank, tuple(paths), tuple(bool(mats[p].shape[0] > mats[p].shape[1]) for p in paths))
        for (_, _, rank), paths in sorted(groups.items())
    )


@partial(jax.jit, static_argnames=("index", "transposed", "negate", "pad", "sharding"))
def _stack(mats, key, *, index, transposed, negate, pad, sharding):
    """The group's matrices stacked (taller-than-wide ones transposed, negated for LoRA-One), padded with
    ``pad`` copies of the first one, laid out by ``sharding``; each matrix's largest |entry|; the group's key."""
    x = jnp.stack([(m.T if t else m).astype(jnp.float32) for m, t in zip(mats, transposed)])
    x = -x if negate else x
    peak = jnp.max(jnp.abs(x), axis=(-2, -1))
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
    if sharding is not None:
        x = jax.lax.with_sharding_constraint(x, sharding)
    return x, peak, jax.random.fold_in(key, index)


@partial(jax.jit, static_argnames=("rank", "transposed", "kind", "gamma", "dtype"))
def _factors(u, s, v, scales, *, rank, transposed, kind, gamma, dtype):
    """Adapter factors from each matrix's SVD and whether the SVD is finite (padding rows dropped).

    ``kind``: ``"lora-one"`` (balanced factors of -G scaled by 1/sqrt(gamma s1)), ``"pissa"`` (balanced
    factors of W over sqrt(scale)) or ``"lora-ga"`` (left 0..r / right r..2r singular vectors of G).
    """
    n = len(transposed)
    u, s, v = u[:n], s[:n], v[:n]
    ok = jnp.isfinite(s).all(-1) & jnp.isfinite(u).all((-2, -1)) & jnp.isfinite(v).all((-2, -1))
    out = []
    for k, t in enumerate(transposed):
        uk, vk = (v[k], u[k]) if t else (u[k], v[k])  # a transposed matrix's u and v trade places
        if kind == "lora-ga":
            c = vk.shape[0] ** 0.25 / math.sqrt(gamma)  # vk: (d_out, 2r)
            a, b = uk[:, :rank] * c, vk[:, rank:].T * c
        else:
            root = jnp.sqrt(s[k]) / jnp.sqrt(gamma * s[k, 0]) if kind == "lora-one" else jnp.sqrt(s[k] / scales[k])
            a, b = uk * root, (vk * root).T
        out.append((a.astype(dtype), b.astype(dtype)))
    return out, ok


def _svd_per_device(x, rank, *, method, key, tol):
    """The SVDs of a stack sharded over its first axis, each device computing its own shard with its own
    (single-device) program; the results are the shards of global arrays laid out like ``x``'s first axis.

    Plain per-device programs rather than ``shard_map``: on XLA:CPU, partitioned programs holding the
    SVD's while-loop could hang; this way no collective ever runs inside a loop, on any backend. On GPU/TPU
    the programs are dispatched asynchronously; on CPU one at a time (the simulated devices share the host's
    threads, and two randomized SVDs in flight at once hung XLA:CPU)."""
    local_keys = (
        {shard.device: shard.data for shard in key.addressable_shards} if hasattr(key, "addressable_shards") else {}
    )
    results = []
    with jax.set_mesh(None):  # single-device programs, also inside a user's `with jax.set_mesh(mesh):`
        for shard in x.addressable_shards:
            results.append(top_svd(shard.data, rank, method=method, key=local_keys.get(shard.device, key), tol=tol))
            if shard.device.platform == "cpu":
                jax.block_until_ready(results[-1])
    sharding = NamedSharding(x.sharding.mesh, P(*x.sharding.spec[:1]))
    return tuple(
        jax.make_array_from_single_device_arrays((x.shape[0], *part.shape[1:]), sharding, [r[i] for r in results])
        for i, part in enumerate(results[0])
    )


def _shard_mode(mesh, n: int, m: int) -> str | None:
    if mesh is None or mesh.size == 1:
        return None
    if n >= mesh.size:
        return "stack"
    return "rows" if m % mesh.size == 0 else None


def _run(
    mats,
    config: LoraConfig,
    *,
    kind: str,
    method: str,
    key,
    what: str,
    gamma: float = 1.0,
    tol: float = 1e-3,
    mesh=None,
    plan: tuple | None = None,
) -> Adapters:
    """Plan, then per group stack, SVD and build factors, and check every module's matrix and SVD (errors name
    the module). Each group is its own few compiled programs (on CPU, XLA hung when one program held two of
    the SVD's while-loops). ``plan`` (``((index, group), ...)``, a part of a whole plan) runs only those groups,
    each with the sketch key of its index in the whole plan (the streamed init's passes)."""
    if plan is None:
        ranks = {p: config.rank_for(p) for p in mats}
        plan = tuple(enumerate(_plan(mats, ranks, what, factor=2 if kind == "lora-ga" else 1)))
    key = jax.random.key(0) if key is None else key  # (a new key array per call: no compile)
    mesh = mesh if mesh is not None else mesh_of(mats)
    adapters, checks = {}, []
    for i, (rank, paths, transposed) in plan:  # dispatch every group first (async), then check them
        scales = np.asarray([config.scale_for(p) for p in paths], np.float32)
        shard = _shard_mode(mesh, len(paths), min(mats[paths[0]].shape))
        pad = -len(paths) % mesh.size if shard == "stack" else 0
        axes = None if mesh is None else tuple(mesh.axis_names)  # every axis of the mesh, whatever its names
        layout = {"stack": P(axes), "rows": P(None, axes)}.get(shard)
        x, peak, group_key = _stack(
            [mats[p] for p in paths],
            key,
            index=i,
            transposed=transposed,
            negate=kind == "lora-one",
            pad=pad,
            sharding=None if layout is None else NamedSharding(mesh, layout),
        )
        svd_rank = 2 * rank if kind == "lora-ga" else rank
        if shard == "stack":  # every device its share of the stack
            u, s, v = _svd_per_device(x, svd_rank, method=method, key=group_key, tol=float(tol))
        else:  # one device, or rows split over the devices (GSPMD shards the matmuls)
            u, s, v = top_svd(x, svd_rank, method=method, key=group_key, tol=float(tol))
        factors, ok = _factors(
            u,
            s,
            v,
            scales,
            rank=rank,
            transposed=transposed,
            kind=kind,
            gamma=float(gamma),
            dtype=jnp.dtype(config.dtype).name,
        )
        adapters.update({p: {"a": a, "b": b} for p, (a, b) in zip(paths, factors)})
        checks.append((peak, ok))
    peak = np.concatenate([to_numpy(p) for p, _ in checks])
    ok = np.concatenate([to_numpy(o) for _, o in checks])
    for j, path in enumerate(p for _, (_, paths, _) in plan for p in paths):
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
    return {p: adapters[p] for p in mats}


def spectral_init(
    grads: Mapping[str, jax.Array],
    config: LoraConfig,
    *,
    gamma: float = 128.0,
    svd: str = "auto",
    key: jax.Array | None = None,
    tol: float = 1e-3,
    mesh=None,
) -> Adapters:
    """LoRA-One's spectral init from full fine-tuning gradients ``{module_path: G (d_in, d_out)}``.

    With ``-G = P diag(s) Q^T`` and ``s1 = s[0]``, each module gets
    ``A0 = P[:, :r] sqrt(s[:r]) / sqrt(gamma s1)`` and ``B0 = sqrt(s[:r]) Q[:, :r]^T / sqrt(gamma s1)``,
    so ``A0 @ B0 = best_rank_r(-G) / (gamma s1)`` and ``A0^T A0 = B0 B0^T = diag(s[:r]) / (gamma s1)``.
    ``r = config.rank_for(path)``. The LoRA scale is not part of the formula: a merged kernel is
    ``W + scale * A0 @ B0``. The base weights are not changed. ``svd`` is ``"auto"``, ``"exact"`` or
    ``"randomized"`` (see ``lora_one_jax.svd``); ``key`` seeds the randomized sketch and ``tol`` (radians) is its
    convergence tolerance on the top-r subspaces. Over a device ``mesh`` (default: the mesh ``grads`` are
    sharded over, if any) every group's stack of SVDs is spread over the devices.

    Example:
        >>> g = {"fc": jax.random.normal(jax.random.key(0), (6, 5))}
        >>> ad = spectral_init(g, LoraConfig(rank=2))
        >>> ad["fc"]["a"].shape, ad["fc"]["b"].shape
        ((6, 2), (2, 5))
        >>> s = jnp.linalg.svd(g["fc"], compute_uv=False)
        >>> bool(jnp.allclose(ad["fc"]["a"].T @ ad["fc"]["a"], jnp.diag(s[:2]) / (128 * s[0]), atol=1e-6))
        True
    """
    gamma = _gamma(gamma)
    mats = _targeted(_matrices(grads, "grads"), config)
    return _run(mats, config, kind="lora-one", method=svd, key=key, what="gradient", gamma=gamma, tol=tol, mesh=mesh)


def _pack(plan: tuple, sizes: dict[str, int], budget: int) -> list[tuple]:
    """The plan's groups packed, in order, into passes of total size <= ``budget``: whole groups while they
    fit, a group larger than the budget split into slices (at least one matrix each)."""
    passes, current, used = [], [], 0
    for i, (rank, paths, transposed) in enumerate(plan):
        cost = sum(sizes[p] for p in paths)
        if current and used + cost > budget:
            passes.append(tuple(current))
            current, used = [], 0
        if cost <= budget:
            current.append((i, (rank, paths, transposed)))
            used += cost
            continue
        per = max(1, budget // sizes[paths[0]])  # a group's matrices all have the same size
        passes.extend(((i, (rank, paths[j : j + per], transposed[j : j + per])),) for j in range(0, len(paths), per))
    if current:
        passes.append(tuple(current))
    return passes


def _free_bytes(params) -> int | None:
    """Free memory of the device holding the params (the host's available memory on CPU), if known."""
    leaf = next((x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)), None)
    device = next(iter(leaf.devices())) if leaf is not None else jax.devices()[0]
    stats = device.memory_stats()  # None where the backend keeps none (CPU)
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def gradient_passes(
    params,
    config: LoraConfig,
    *,
    kernels_per_pass: int | None = None,
    max_bytes: int | None = None,
    targets: dict[str, Target] | None = None,
) -> list[list[str]]:
    """The module paths whose gradients ``spectral_init_streamed`` computes together, one list per pass.

    Passes follow the SVD groups (matrices of one shape and rank; packed whole while they fit, so a pass
    runs the same SVDs as the one-pass init): at most ``kernels_per_pass`` kernels, or at most
    ``max_bytes`` of float32 gradients (per device when the params are sharded over a mesh), per pass.
    With neither, one pass when the gradients fit in half the free memory of the params' device (the
    host's available memory on CPU), else passes of that size.

    Example:
        >>> params = {f"l{i}": {"q": {"kernel": np.zeros((8, 8))}, "up": {"kernel": np.zeros((8, 16))}}
        ...           for i in range(2)}
        >>> gradient_passes(params, LoraConfig(rank=2), kernels_per_pass=2)
        [['l0/q', 'l1/q'], ['l0/up', 'l1/up']]
        >>> gradient_passes(params, LoraConfig(rank=2), max_bytes=8 * 16 * 4)
        [['l0/q', 'l1/q'], ['l0/up'], ['l1/up']]
    """
    return [
        [p for _, (_, paths, _) in group for p in paths]
        for group in _streamed_plan(params, config, kernels_per_pass, max_bytes, targets)
    ]


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _streamed_plan(params, config: LoraConfig, kernels_per_pass, max_bytes, targets=None) -> list[tuple]:
    targets = find_targets(params, config) if targets is None else targets
    shapes = {p: jax.ShapeDtypeStruct((targets[p].d_in, targets[p].d_out), jnp.float32) for p in sorted(targets)}
    plan = _plan(shapes, {p: t.rank for p, t in targets.items()}, "gradient")
    if kernels_per_pass is not None and max_bytes is not None:
        raise ValueError("give kernels_per_pass or max_bytes, not both")
    if kernels_per_pass is not None:
        return _pack(plan, dict.fromkeys(shapes, 1), _positive(kernels_per_pass, "kernels_per_pass"))
    mesh = mesh_of(params)
    devices = 1 if mesh is None else mesh.size
    sizes = {p: 4 * math.prod(s.shape) // devices for p, s in shapes.items()}
    if max_bytes is None:
        free = _free_bytes(params)
        max_bytes = sum(sizes.values()) if free is None else max(free // 2, 1)
    return _pack(plan, sizes, _positive(max_bytes, "max_bytes"))


def spectral_init_streamed(
    loss_fn: Callable[[Any, Any], jax.Array],
    params,
    batches: Iterable,
    config: LoraConfig,
    *,
    kernels_per_pass: int | None = None,
    max_bytes: int | None = None,
    gamma: float = 128.0,
    svd: str = "auto",
    key: jax.Array | None = None,
    tol: float = 1e-3,
    micro_batches_per_step: int = 8,
    progress: bool = True,
    targets: dict[str, Target] | None = None,
) -> Adapters:
    """LoRA-One's spectral init straight from the loss, its gradients held one group at a time.

    ``spectral_init(estimate_gradient(loss_fn, params, batches, config), config, ...)`` holds a float32
    gradient of every targeted kernel at once (Llama-2-7B, all linear layers: 26 GB). Here each pass
    (``gradient_passes``) differentiates one group's kernels over all micro-batches, runs their SVDs, keeps
    the rank-r factors and frees the gradients, so the peak memory is the params, one group's gradients and
    one forward/backward; each extra pass costs a forward/backward over the micro-batches. The maths is the
    one-pass init's: passes made of whole SVD groups (the default, and whenever a group fits the budget)
    give the same adapters, the randomized SVD included; a group split across passes gets the same
    adapters with ``svd="exact"`` and sketches of its own with ``"randomized"`` (same accuracy).
    Sharded params give gradients sharded like their kernels. Arguments: as ``estimate_gradient`` and
    ``spectral_init``; ``kernels_per_pass`` / ``max_bytes`` as ``gradient_passes``; ``targets``:
    ``find_targets(params, config)`` when the caller already has it.

    Example:
        >>> params = {"l0": {"kernel": jnp.eye(4)}, "l1": {"kernel": jnp.eye(4)[::-1]}}
        >>> loss_fn = lambda p, x: jnp.sum((x @ p["l0"]["kernel"] @ p["l1"]["kernel"]) ** 2)
        >>> x = [jnp.arange(8.0).reshape(2, 4)]
        >>> cfg = LoraConfig(rank=1)
        >>> one = spectral_init(estimate_gradient(loss_fn, params, x, cfg, progress=False), cfg, svd="exact")
        >>> two = spectral_init_streamed(loss_fn, params, x, cfg, kernels_per_pass=1, svd="exact", progress=False)
        >>> all(bool(jnp.allclose(one[p]["a"] @ one[p]["b"], two[p]["a"] @ two[p]["b"])) for p in one)
        True
    """
    gamma = _gamma(gamma)
    passes = _streamed_plan(params, config, kernels_per_pass, max_bytes, targets)
    batches = list(batches)
    adapters: Adapters = {}
    for group in passes:
        paths = [p for _, (_, ps, _) in group for p in ps]
        grads = estimate_gradient(
            loss_fn,
            params,
            batches,
            config,
            micro_batches_per_step=micro_batches_per_step,
            modules=paths,
            targets=targets,
            progress=progress,
        )
        adapters.update(
            _run(grads, config, kind="lora-one", method=svd, key=key, what="gradient", gamma=gamma, tol=tol, plan=group)
        )
        del grads  # _run has checked (and so waited for) every SVD: the group's gradients are free
    return {p: adapters[p] for p in sorted(adapters)}


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
    return _run(mats, config, kind="pissa", method=svd, key=key, what="kernel")


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
    gamma = _gamma(gamma)
    mats = _targeted(_matrices(grads, "grads"), config)
    return _run(mats, config, kind="lora-ga", method=svd, key=key, what="gradient", gamma=gamma)
