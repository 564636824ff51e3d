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

from lora_one_jax._hf import apply_hf_fixes, is_hf_model
from lora_one_jax.adapters import check_adapters
from lora_one_jax.config import LoraConfig, Target, find_targets
from lora_one_jax.nnx import is_nnx_module, with_lora_nnx

#: Names of module classes that store their kernel as (d_out, d_in). ``lora_one_jax.models`` adds
#: Hugging Face's ``FlaxConv1D`` (GPT-2); add your own layer's class name here.
TRANSPOSED_MODULES: set[str] = set()


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _check_layout(module: nn.Module, path: str, target: Target) -> None:
    class_transposed = type(module).__name__ in TRANSPOSED_MODULES
    if class_transposed != target.transposed:
        what = "stores" if class_transposed else "does not store"
        raise ValueError(
            f"module {path!r} ({type(module).__name__}) {what} its kernel as (d_out, d_in), but "
            f"LoraConfig.transposed_kernels says otherwise; "
            + ("add it (GPT-2: transposed_kernels=['c_attn', 'c_proj', 'c_fc'])" if class_transposed else "remove it")
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
    return scale * ((x @ a) @ b)


def _params_of(variables) -> Any:
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = sorted(variables)[:5] if isinstance(variables, Mapping) else type(variables).__name__
        raise TypeError(
            f"apply's first argument is the variables dict {{'params': params, ...}} (as for module.apply); "
            f"got {got}. Call apply({{'params': params}}, adapters, ...)"
        )
    return variables["params"]


def with_lora(module, config: LoraConfig) -> Callable[..., Any]:
    """Wrap ``module`` so that ``apply(variables, adapters, *args, lora_rng=None, **kwargs)`` runs
    ``module.apply(variables, *args, **kwargs)`` with the adapters added to every targeted layer.

    ``module`` is a ``flax.linen.Module`` or a Hugging Face ``FlaxPreTrainedModel`` (then the call is
    ``model(*args, params=variables["params"], **kwargs)``), or a ``flax.nnx.Module``: then ``variables`` is the
    model's ``nnx.Param`` state (``lora_one_jax.nnx_split(model)[1]``) and a merged copy is called, never
    ``module`` itself (``lora_one_jax.nnx.with_lora_nnx``). LoRA dropout is active only when
    ``lora_rng`` is given. Differentiable w.r.t. ``adapters`` and usable under ``jax.jit``. Raises if an
    adapter does not fit the config (a module it does not target, another rank, wrong shapes) or if its
    module is never called.

    Example:
        >>> model = nn.Dense(2, name="fc")
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> ad = {"": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}}  # top-level module: path ''
        >>> apply = with_lora(model, LoraConfig(rank=1, alpha=1.0, targets=".*"))
        >>> (apply(variables, ad, jnp.ones((1, 3))) - model.apply(variables, jnp.ones((1, 3)))).tolist()
        [[3.0, 3.0]]
    """
    if is_nnx_module(module):
        return with_lora_nnx(module, config)
    hf = is_hf_model(module)
    if not hf and not isinstance(module, nn.Module):
        raise TypeError(
            "with_lora needs a flax.linen.Module, a HF FlaxPreTrainedModel or a flax.nnx.Module, "
            f"got {type(module).__name__}"
        )
    if not isinstance(config, LoraConfig):
        raise TypeError(f"with_lora needs a LoraConfig, got {type(config).__name__}")
    if hf:
        apply_hf_fixes()

    def apply(variables, adapters, *args, lora_rng: jax.Array | None = None, **kwargs):
        params = _params_of(variables)
        targets = find_targets(params, config)
        check_adapters(adapters, targets)
        order = {path: i for i, path in enumerate(sorted(adapters))}
        applied: set[str] = set()

        def interceptor(next_fun, call_args, call_kwargs, context):
            out = next_fun(*call_args, **call_kwargs)
            if context.method_name != "__call__":
                return out
            path = _module_path(context.module)
            if path not in adapters:
                return out
            target = targets[path]
            _check_layout(context.module, path, target)
            x = call_args[0] if call_args else next(iter(call_kwargs.values()))
            if x.shape[-1] != target.d_in or out.shape[-1] != target.d_out:
                raise ValueError(
                    f"module {path!r} maps {x.shape[-1]} to {out.shape[-1]} features, but its kernel says "
                    f"(d_in, d_out) = {(target.d_in, target.d_out)}; check LoraConfig.transposed_kernels"
                )
            rng = None
            if lora_rng is not None:
                rng = jax.random.fold_in(jax.random.fold_in(lora_rng, order[path]), len(applied))
            applied.add(path)
            delta = lora_delta(x, adapters[path], target.scale, dropout=config.dropout, rng=rng)
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
