"""Adapters as data: ``{module_path: {"a": A (d_in, r), "b": B (r, d_out)}}``.

The effective kernel of a targeted module is ``W + scale * A @ B`` (Flax orientation, ``y = x @ W``).
For kernels stored (d_out, d_in) (GPT-2's ``FlaxConv1D``) the transpose is added.

Example:
    >>> import jax, numpy as np
    >>> params = {"fc": {"kernel": np.ones((4, 3), np.float32)}}
    >>> cfg = LoraConfig(rank=2, alpha=2.0, targets=["fc"])
    >>> adapters = lora_init(find_targets(params, cfg), np.float32, key=jax.random.key(0))
    >>> adapters["fc"]["a"].shape, adapters["fc"]["b"].shape
    ((4, 2), (2, 3))
    >>> bool((merge(params, adapters, cfg)["fc"]["kernel"] == params["fc"]["kernel"]).all())  # B = 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_one_jax.config import Adapters, LoraConfig, Target, find_targets, kernel_key
from lora_one_jax.nnx import is_nnx_state, shift_kernels


def lora_init(targets: dict[str, Target], dtype, *, key: jax.Array) -> Adapters:
    """PEFT's default init: A Kaiming-uniform over d_in (bound ``1/sqrt(d_in)``), B = 0.

    Example:
        >>> from lora_one_jax.config import Target
        >>> ad = lora_init({"m": Target(16, 8, 4, 1.0, False)}, jnp.float32, key=jax.random.key(0))
        >>> float(jnp.abs(ad["m"]["a"]).max()) <= 0.25, float(jnp.abs(ad["m"]["b"]).max())
        (True, 0.0)
    """
    keys = jax.random.split(key, max(len(targets), 1))
    out = {}
    for k, (path, t) in zip(keys, targets.items()):
        bound = 1.0 / math.sqrt(t.d_in)
        out[path] = {
            "a": jax.random.uniform(k, (t.d_in, t.rank), dtype, -bound, bound),
            "b": jnp.zeros((t.rank, t.d_out), dtype),
        }
    return out


def check_adapters(adapters: Adapters, targets: dict[str, Target]) -> Adapters:
    """``adapters`` itself if every entry fits a targeted module; otherwise a ``ValueError`` naming the module.

    Each adapter must belong to a module the config targets, hold ``"a"`` (d_in, r) and ``"b"`` (r, d_out)
    with r the rank the config gives that module (``LoraConfig.rank`` / ``rank_pattern``). ``merge`` and
    ``with_lora`` both check this, so an adapter is scaled the same way wherever it is used.

    Example:
        >>> targets = find_targets({"fc": {"kernel": np.zeros((4, 3))}}, LoraConfig(rank=2))
        >>> check_adapters({"fc": {"a": np.zeros((4, 1)), "b": np.zeros((1, 3))}}, targets)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: adapter 'fc' has A of shape (4, 1) and B of shape (1, 3), but the config gives ... rank 2: ...
    """
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a dict {{module_path: {{'a': A, 'b': B}}}}, got {type(adapters).__name__}")
    stray = sorted(set(adapters) - set(targets))
    if stray:
        raise ValueError(
            f"adapters for {stray[:10]} match no module targeted by the config; targeted: {sorted(targets)[:10]}"
            f"{' ...' if len(targets) > 10 else ''} (use the LoraConfig the adapters were made with)"
        )
    for path, adapter in adapters.items():
        if not isinstance(adapter, Mapping) or set(adapter) != {"a", "b"}:
            keys = sorted(adapter) if isinstance(adapter, Mapping) else type(adapter).__name__
            raise ValueError(f"adapter {path!r} must be a dict with exactly the keys 'a' and 'b', got {keys}")
        t = targets[path]
        shape_a, shape_b = tuple(np.shape(adapter["a"])), tuple(np.shape(adapter["b"]))
        want_a, want_b = (t.d_in, t.rank), (t.rank, t.d_out)
        if (shape_a, shape_b) != (want_a, want_b):
            rank_hint = (
                f"the config gives this module rank {t.rank}"
                if len(shape_a) == 2 and len(shape_b) == 2 and shape_a[1] == shape_b[0] != t.rank
                else f"its kernel is (d_in, d_out) = {(t.d_in, t.d_out)}"
            )
            fix = (
                "load the adapters with the LoraConfig they were made with"
                if "rank" in rank_hint
                else "the adapters were made for another model or layout"
            )
            raise ValueError(
                f"adapter {path!r} has A of shape {shape_a} and B of shape {shape_b}, but {rank_hint}: "
                f"expected A {want_a} and B {want_b}; {fix}"
            )
    return adapters


def _delta(adapter, target: Target) -> jax.Array:
    d = target.scale * (adapter["a"].astype(jnp.float32) @ adapter["b"].astype(jnp.float32))
    return d.T if target.transposed else d


def _shift_kernels(params, adapters: Adapters, config: LoraConfig, sign: float, targets: dict[str, Target] | None):
    targets = find_targets(params, config) if targets is None else targets
    check_adapters(adapters, targets)
    if is_nnx_state(params):
        return shift_kernels(params, adapters, targets, sign)
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, adapter in adapters.items():
        w = flat[kernel_key(path)]
        flat[kernel_key(path)] = (jnp.asarray(w, jnp.float32) + sign * _delta(adapter, targets[path])).astype(w.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def merge(params, adapters: Adapters, config: LoraConfig, *, targets: dict[str, Target] | None = None):
    """Params whose targeted kernels are ``W + scale * A @ B`` (computed in float32). ``targets``:
    ``find_targets(params, config)`` when the caller already has it.

    Example:
        >>> p = {"fc": {"kernel": np.zeros((2, 2), np.float32)}}
        >>> ad = {"fc": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}}
        >>> merge(p, ad, LoraConfig(rank=1, alpha=1.0))["fc"]["kernel"].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    from lora_one_jax.export import check_adapter_values  # NaN/Inf or integer adapters: an error naming the module

    return _shift_kernels(params, check_adapter_values(adapters, "merge"), config, +1.0, targets)


def unmerge(params, adapters: Adapters, config: LoraConfig, *, targets: dict[str, Target] | None = None):
    """Inverse of ``merge``: kernels ``W - scale * A @ B`` (``targets`` as for ``merge``).

    Example:
        >>> p = {"fc": {"kernel": np.ones((2, 2), np.float32)}}
        >>> ad = {"fc": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}}
        >>> unmerge(p, ad, LoraConfig(rank=1, alpha=1.0))["fc"]["kernel"].tolist()
        [[0.0, 0.0], [0.0, 0.0]]
    """
    from lora_one_jax.export import check_adapter_values  # NaN/Inf or integer adapters: an error naming the module

    return _shift_kernels(params, check_adapter_values(adapters, "unmerge"), config, -1.0, targets)


#: ``((group name, (module path, ...)), ...)``: how ``stack_adapters`` grouped the modules (static).
Layout = tuple[tuple[str, tuple[str, ...]], ...]


def stack_adapters(adapters: Adapters) -> tuple[dict[str, dict[str, jax.Array]], Layout]:
    """Adapters of equal shape and dtype stacked along a new leading axis, and the layout to undo it.

    Returns ``({group: {"a": (n, d_in, r), "b": (n, r, d_out)}}, layout)``. Training on the stacked form
    gives the optimizer a handful of leaves (one per shape: 7 for a Llama's projections) instead of two per
    module (420 for SmolLM2's 210 adapters): the compiled step is smaller and compiles faster, and
    ``lora_one_precond`` works on each stack at once. ``unstack_adapters(stacked, layout)`` inverts it,
    inside or outside ``jax.jit`` (the transpose of an unstack is a stack, so gradients flow back).

    Example:
        >>> ad = {f"l{i}/q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))} for i in range(3)}
        >>> stacked, layout = stack_adapters(ad)
        >>> {g: x["a"].shape for g, x in stacked.items()}, layout
        ({'4x2x3/float32': (3, 4, 2)}, (('4x2x3/float32', ('l0/q', 'l1/q', 'l2/q')),))
        >>> unstack_adapters(stacked, layout).keys() == ad.keys()
        True
    """
    groups: dict[str, list[str]] = {}
    for path in sorted(adapters):
        a, b = adapters[path]["a"], adapters[path]["b"]
        groups.setdefault(f"{a.shape[0]}x{a.shape[1]}x{b.shape[1]}/{jnp.dtype(a.dtype).name}", []).append(path)
    stacked = {
        group: {name: jnp.stack([jnp.asarray(adapters[p][name]) for p in paths]) for name in ("a", "b")}
        for group, paths in groups.items()
    }
    return stacked, tuple((group, tuple(paths)) for group, paths in groups.items())


def unstack_adapters(stacked: dict[str, dict[str, jax.Array]], layout: Layout) -> Adapters:
    """Inverse of ``stack_adapters``: ``{module_path: {"a", "b"}}`` in the original order of paths.

    Example:
        >>> stacked = {"g": {"a": jnp.zeros((2, 4, 1)), "b": jnp.zeros((2, 1, 3))}}
        >>> unstack_adapters(stacked, (("g", ("x", "y")),))["y"]["b"].shape
        (1, 3)
    """
    out: Adapters = {}
    for group, paths in layout:
        a, b = jnp.unstack(stacked[group]["a"]), jnp.unstack(stacked[group]["b"])
        out.update({p: {"a": a[i], "b": b[i]} for i, p in enumerate(paths)})
    return {p: out[p] for p in sorted(out)}
