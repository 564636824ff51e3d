"""The module transform: run any Flax model with adapters, through ``flax.linen`` interception.

No model code is copied or rewritten and no ``W + A @ B`` is materialised: every targeted layer's
output gets ``scale * dropout(x) @ A @ B`` added, with the adapters looked up by module path.

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

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_one_jax.compat import patch_transformers
from lora_one_jax.config import LoraConfig, matches

# Module classes known to store their kernel as (d_out, d_in).
_TRANSPOSED_CLASSES = ("FlaxConv1D",)


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _check_layout(module: nn.Module, path: str, config: LoraConfig) -> None:
    class_transposed = type(module).__name__ in _TRANSPOSED_CLASSES
    config_transposed = bool(config.transposed_kernels) and matches(config.transposed_kernels, path)
    if class_transposed != config_transposed:
        what = "stores" if class_transposed else "does not store"
        raise ValueError(
            f"module {path!r} ({type(module).__name__}) {what} its kernel as (d_out, d_in), but "
            f"LoraConfig.transposed_kernels={config.transposed_kernels!r} says otherwise; "
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


def with_lora(module, config: LoraConfig) -> Callable[..., Any]:
    """Wrap ``module`` so that ``apply(variables, adapters, *args, lora_rng=None, **kwargs)`` runs
    ``module.apply(variables, *args, **kwargs)`` with the adapters added to every targeted layer.

    ``module`` is a ``flax.linen.Module`` or a Hugging Face ``FlaxPreTrainedModel`` (then the call is
    ``model(*args, params=variables["params"], **kwargs)``). LoRA dropout is active only when
    ``lora_rng`` is given. Differentiable w.r.t. ``adapters`` and usable under ``jax.jit``.
    Raises if an adapter's module is never called (a path that does not exist in the model).

    Example:
        >>> model = nn.Dense(2, name="fc")
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> ad = {"": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}}  # top-level module: path ''
        >>> apply = with_lora(model, LoraConfig(rank=1, alpha=1.0, targets=".*"))
        >>> (apply(variables, ad, jnp.ones((1, 3))) - model.apply(variables, jnp.ones((1, 3)))).tolist()
        [[3.0, 3.0]]
    """
    patch_transformers()
    is_hf_wrapper = not isinstance(module, nn.Module) and isinstance(getattr(module, "module", None), nn.Module)
    if not is_hf_wrapper and not isinstance(module, nn.Module):
        raise TypeError(f"with_lora needs a flax.linen.Module or a HF FlaxPreTrainedModel, got {type(module).__name__}")

    def apply(variables, adapters, *args, lora_rng: jax.Array | None = None, **kwargs):
        order = {path: i for i, path in enumerate(sorted(adapters))}
        applied: set[str] = set()

        def interceptor(next_fun, call_args, call_kwargs, context):
            out = next_fun(*call_args, **call_kwargs)
            if context.method_name != "__call__":
                return out
            path = _module_path(context.module)
            if path not in adapters:
                return out
            _check_layout(context.module, path, config)
            adapter = adapters[path]
            x = call_args[0] if call_args else next(iter(call_kwargs.values()))
            if x.shape[-1] != adapter["a"].shape[0]:
                raise ValueError(
                    f"adapter {path!r} has A of shape {adapter['a'].shape} but the module's input has "
                    f"{x.shape[-1]} features; the adapters were made for another model or layout"
                )
            rng = None
            if lora_rng is not None:
                rng = jax.random.fold_in(jax.random.fold_in(lora_rng, order[path]), len(applied))
            scale = config.scale_for(path, adapter["a"].shape[1])
            applied.add(path)
            return out + lora_delta(x, adapter, scale, dropout=config.dropout, rng=rng).astype(out.dtype)

        with nn.intercept_methods(interceptor):
            if is_hf_wrapper:
                result = module(*args, params=variables["params"], **kwargs)
            else:
                result = module.apply(variables, *args, **kwargs)
        unused = sorted(set(adapters) - applied)
        if unused:
            raise ValueError(f"adapters {unused[:10]} were never applied: no module with that path was called")
        return result

    return apply
