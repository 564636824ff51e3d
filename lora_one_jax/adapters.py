"""Adapters as data: ``{module_path: {"a": A (d_in, r), "b": B (r, d_out)}}``.

The effective kernel of a targeted module is ``W + scale * A @ B`` (Flax orientation, ``y = x @ W``).
For kernels stored (d_out, d_in) (GPT-2's ``FlaxConv1D``) the transpose is added.

Example:
    >>> import jax, numpy as np
    >>> params = {"fc": {"kernel": np.ones((4, 3), np.float32)}}
    >>> cfg = LoraConfig(rank=2, alpha=2.0, targets=["fc"])
    >>> params, adapters = init_adapters(params, cfg, key=jax.random.key(0))
    >>> adapters["fc"]["a"].shape, adapters["fc"]["b"].shape
    ((4, 2), (2, 3))
    >>> bool((merge(params, adapters, cfg)["fc"]["kernel"] == params["fc"]["kernel"]).all())  # B = 0
    True
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_one_jax.config import LoraConfig, Target, find_targets

Adapters = dict[str, dict[str, jax.Array]]


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


def init_adapters(params, config: LoraConfig, *, key: jax.Array, method: str = "lora", **method_kwargs):
    """Create adapters for every module ``config`` targets; returns ``(base_params, adapters)``.

    ``base_params`` is ``params`` itself for methods that leave the base alone (``"lora"``) and the
    new frozen base for methods that move part of W into the adapters.

    Example:
        >>> params = {"fc": {"kernel": np.ones((4, 3), np.float32)}}
        >>> base, ad = init_adapters(params, LoraConfig(rank=1), key=jax.random.key(0))
        >>> base is params, sorted(ad)
        (True, ['fc'])
    """
    targets = find_targets(params, config)
    dtype = jnp.dtype(config.dtype)
    if method == "lora":
        if method_kwargs:
            raise TypeError(f"method 'lora' takes no extra arguments, got {sorted(method_kwargs)}")
        return params, lora_init(targets, dtype, key=key)
    raise ValueError(f"unknown init method {method!r}; available: ['lora']")


def _kernel_key(path: str) -> str:
    return f"{path}/kernel" if path else "kernel"


def _delta(adapter, target: Target) -> jax.Array:
    d = target.scale * (adapter["a"].astype(jnp.float32) @ adapter["b"].astype(jnp.float32))
    return d.T if target.transposed else d


def _shift_kernels(params, adapters: Adapters, config: LoraConfig, sign: float):
    targets = find_targets(params, config)
    missing = sorted(set(adapters) - set(targets))
    if missing:
        raise ValueError(f"adapters for {missing} match no module targeted by the config; targeted: {sorted(targets)}")
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, adapter in adapters.items():
        w = flat[_kernel_key(path)]
        flat[_kernel_key(path)] = (jnp.asarray(w, jnp.float32) + sign * _delta(adapter, targets[path])).astype(w.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def merge(params, adapters: Adapters, config: LoraConfig):
    """Params whose targeted kernels are ``W + scale * A @ B`` (computed in float32).

    Example:
        >>> p = {"fc": {"kernel": np.zeros((2, 2), np.float32)}}
        >>> ad = {"fc": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}}
        >>> merge(p, ad, LoraConfig(rank=1, alpha=1.0))["fc"]["kernel"].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    return _shift_kernels(params, adapters, config, +1.0)


def unmerge(params, adapters: Adapters, config: LoraConfig):
    """Inverse of ``merge``: kernels ``W - scale * A @ B``.

    Example:
        >>> p = {"fc": {"kernel": np.ones((2, 2), np.float32)}}
        >>> ad = {"fc": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}}
        >>> unmerge(p, ad, LoraConfig(rank=1, alpha=1.0))["fc"]["kernel"].tolist()
        [[0.0, 0.0], [0.0, 0.0]]
    """
    return _shift_kernels(params, adapters, config, -1.0)
