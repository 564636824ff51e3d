"""The module transform: run any Flax model with adapters, through ``flax.linen`` interception.

No model code is copied or rewritten and no ``W + A @ B`` is materialised: every targeted layer's
output gets ``scale * dropout(x) @ A @ B`` added, with the adapters looked up by module path. What is
targeted, each module's rank, scale and kernel layout all come from ``find_targets(params, config)``,
the same source ``merge`` uses, so a trained adapter means the same thing in both.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> model = nn.Dense(3, name="fc")
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> cfg = lj.LoraConfig(rank=2, targets=".*")
    >>> _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(1))
    >>> apply = with_lora(model, cfg)
    >>> bool(jnp.allclose(apply({"params": params}, adapters, jnp.ones((1, 4))),
    ...                   model.apply({"params": params}, jnp.ones((1, 4)))))  # B = 0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_one_jax._hf import is_hf_model
from lora_one_jax.adapters import check_adapters
from lora_one_jax.config import LoraConfig, Target, find_targets
from lora_one_jax.lowrank import low_rank_product
from lora_one_jax.nnx import is_nnx_module, with_lora_nnx

#: GPT-2's layers store their kernels (d_out, d_in); what to say when the config does not.
_GPT2_HINT = "GPT-2: transposed_kernels=['c_attn', 'c_proj', 'c_fc']"


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def check_layout(module: nn.Module, path: str, target: Target, d_in: int, d_out: int) -> None:
    """Raise unless the layer at ``path`` mapping ``d_in`` to ``d_out`` features fits ``target``.

    A kernel's layout comes from ``LoraConfig.transposed_kernels`` (``Target.transposed``), checked against
    what the layer does: a non-square kernel read in the wrong layout maps the wrong numbers of features
    (GPT-2's ``FlaxConv1D`` without ``transposed_kernels``), and a ``flax.linen.Dense`` always stores
    (d_in, d_out). A square kernel of another class cannot show its layout: list it right in the config.

    Example:
        >>> import flax.linen as nn
        >>> check_layout(nn.Dense(3), "fc", Target(4, 3, 1, 1.0, True), 4, 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: module 'fc' is a flax.linen.Dense, which stores its kernel as (d_in, d_out), ...; remove it
    """
    if (d_in, d_out) == (target.d_in, target.d_out):
        if target.transposed and isinstance(module, nn.Dense):
            raise ValueError(
                f"module {path!r} is a flax.linen.Dense, which stores its kernel as (d_in, d_out), but "
                "LoraConfig.transposed_kernels lists it; remove it"
            )
        return
    if (d_in, d_out) == (target.d_out, target.d_in):
        what, fix = ("does not store", "remove it") if target.transposed else ("stores", f"add it ({_GPT2_HINT})")
        raise ValueError(
            f"module {path!r} ({type(module).__name__}) {what} its kernel as (d_out, d_in): it maps {d_in} to "
            f"{d_out} features, but LoraConfig.transposed_kernels says otherwise; {fix}"
        )
    raise ValueError(
        f"module {path!r} maps {d_in} to {d_out} features, but its kernel says "
        f"(d_in, d_out) = {(target.d_in, target.d_out)}; check LoraConfig.transposed_kernels"
    )


def lora_delta(x: jax.Array, adapter, scale: float, *, dropout: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """``scale * dropout(x) @ A @ B`` in the adapter's dtype (dropout only when ``rng`` is given).

    Example:
        >>> ad = {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}
        >>> lora_delta(jnp.ones((1, 4)), ad, 0.5).tolist()
        [[4.0, 4.0, 4.0]]
    """
    a, b = adapter["a"], adapter["b"]
    x = x.astype(a.dtype)
    if rng is not None and dropout > 0.0:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0.0).astype(a.dtype)
    return scale * low_rank_product(x, a, b)


def _params_of(variables) -> Any:
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = sorted(variables)[:5] if isinstance(variables, Mapping) else type(variables).__name__
        raise TypeError(
            f"apply's first argument is the variables dict {{'params': params, ...}} (as for module.apply); "
            f"got {got}. Call apply({{'params': params}}, adapters, ...)"
        )
    return variables["params"]


def _layer_input(call_args, call_kwargs) -> jax.Array:
    return call_args[0] if call_args else next(iter(call_kwargs.values()))


def with_lora(module, config: LoraConfig, *, targets: dict[str, Target] | None = None) -> Callable[..., Any]:
    """Wrap ``module`` so that ``apply(variables, adapters, *args, lora_rng=None, **kwargs)`` runs
    ``module.apply(variables, *args, **kwargs)`` with the adapters added to every targeted layer.

    ``module`` is a ``flax.linen.Module`` or a Hugging Face ``FlaxPreTrainedModel`` (then the call is
    ``model(*args, params=variables["params"], **kwargs)``; build it through ``lora_one_jax.models`` or call
    ``lora_one_jax.models.patch_transformers()`` first for transformers' Flax fixes). LoRA dropout is active
    only when ``lora_rng`` is given. Differentiable w.r.t. ``adapters`` and usable under ``jax.jit``. Raises
    if an adapter does not fit the config (a module it does not target, another rank, wrong shapes), if a
    layer's kernel layout disagrees with ``LoraConfig.transposed_kernels`` (see ``check_layout``) or if its
    module is never called. ``targets``: ``find_targets(params, config)`` when the caller already has it
    (resolved from the params of each call otherwise). For a ``flax.nnx.Module`` the first argument is the
    model's ``nnx.Param`` state (``lora_one_jax.nnx_split(model)[1]``) and a merged copy runs, never ``module``
    itself (``lora_one_jax.nnx.with_lora_nnx``).

    Example:
        >>> model = nn.Dense(2, name="fc")
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> ad = {"": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}}  # top-level module: path ''
        >>> apply = with_lora(model, LoraConfig(rank=1, alpha=1.0, targets=".*"))
        >>> (apply(variables, ad, jnp.ones((1, 3))) - model.apply(variables, jnp.ones((1, 3)))).tolist()
        [[3.0, 3.0]]
    """
    if is_nnx_module(module):
        return with_lora_nnx(module, config, targets=targets)
    hf = is_hf_model(module)
    if not hf and not isinstance(module, nn.Module):
        raise TypeError(
            "with_lora needs a flax.linen.Module, a HF FlaxPreTrainedModel or a flax.nnx.Module, "
            f"got {type(module).__name__}"
        )
    if not isinstance(config, LoraConfig):
        raise TypeError(f"with_lora needs a LoraConfig, got {type(config).__name__}")
    resolved = targets

    def apply(variables, adapters, *args, lora_rng: jax.Array | None = None, **kwargs):
        params = _params_of(variables)
        targets = find_targets(params, config) if resolved is None else resolved
        check_adapters(adapters, targets)
        order = {path: i for i, path in enumerate(sorted(adapters))}
        applied: set[str] = set()

        def interceptor(next_fun, call_args, call_kwargs, context):
            out = next_fun(*call_args, **call_kwargs)
            path = _module_path(context.module)
            if context.method_name != "__call__" or path not in adapters:
                return out
            x = _layer_input(call_args, call_kwargs)
            check_layout(context.module, path, targets[path], x.shape[-1], out.shape[-1])
            rng = None
            if lora_rng is not None:
                rng = jax.random.fold_in(jax.random.fold_in(lora_rng, order[path]), len(applied))
            applied.add(path)
            delta = lora_delta(x, adapters[path], targets[path].scale, dropout=config.dropout, rng=rng)
            return out + delta.astype(out.dtype)

        with nn.intercept_methods(interceptor):
            if hf:
                result = module(*args, params=params, **kwargs)
            else:
                result = module.apply(variables, *args, **kwargs)
        unused = sorted(set(adapters) - applied)
        if unused:
            raise ValueError(f"adapters {unused[:10]} were never applied: no module with that path was called")
        return result

    return apply
