"""Rematerialisation of a model's layers, for any Flax linen model (Hugging Face's included).

A backward pass needs the forward pass's intermediate values; by default all of them are kept, so the
memory of a step grows with layers x batch x length. ``remat_layers`` runs the forward with every layer
(a module whose path matches ``LAYERS``: ``model/layers/3``, ``transformer/h/0``, ``encoder/block/1``)
wrapped in ``flax.linen.remat``: ``"layers"`` keeps only each layer's inputs and recomputes the layer in
the backward pass; ``"dots"`` also keeps its matrix products and recomputes only the cheap element-wise
operations. The values and gradients are unchanged. The losses take it as ``remat=``.

Example:
    >>> from lora_one_jax.models import load_model
    >>> model, params, _ = load_model("toy-llama")
    >>> ids = jnp.array([[5, 6, 7]])
    >>> f = lambda p: model(ids, params=p).logits.sum()
    >>> g = lambda p: remat_layers(lambda: model(ids, params=p), "layers").logits.sum()
    >>> bool(jnp.allclose(jax.grad(f)(params)["lm_head"]["kernel"], jax.grad(g)(params)["lm_head"]["kernel"]))
    True
"""

from __future__ import annotations

import re
from collections.abc import Callable

import flax.linen as nn
import jax

#: Rematerialisation choices: none, whole layers recomputed, or layers recomputed but their matmuls kept.
REMAT = ("none", "layers", "dots")
#: Module paths of the repeated layers of Llama / Mistral / Gemma (``layers/i``), GPT-2 (``h/i``), T5 (``block/i``).
LAYERS = r"(?:.*/)?(?:layers|h|block|blocks)/\d+"

_POLICIES = {"layers": None, "dots": jax.checkpoint_policies.dots_saveable}


def check_remat(remat: str) -> str:
    """``remat`` itself if it is one of ``REMAT``; else a ``ValueError`` listing them.

    Example:
        >>> check_remat("dots")
        'dots'
    """
    if remat not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, got {remat!r}")
    return remat


def remat_layers(forward: Callable[[], object], remat: str, *, layers: str = LAYERS):
    """``forward()`` (a linen model's forward, under ``jax.grad`` or not) with every layer whose module path
    fullmatches ``layers`` rematerialised as ``remat`` says (see the module docstring). Raises when
    ``remat != "none"`` and no module matched (name the model's layers with ``layers=``).

    Example:
        >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((1, 3))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> out = remat_layers(lambda: model.apply({"params": params}, x), "dots", layers=r"layers_\\d+")
        >>> bool(jnp.allclose(out, model.apply({"params": params}, x)))
        True
    """
    if check_remat(remat) == "none":
        return forward()
    pattern, policy = re.compile(layers), _POLICIES[remat]
    active: set[str] = set()
    matched = []

    def interceptor(next_fun, args, kwargs, context):
        path = "/".join(str(p) for p in context.module.path)
        if context.method_name != "__call__" or path in active or not pattern.fullmatch(path):
            return next_fun(*args, **kwargs)
        matched.append(path)
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
        static = {k: v for k, v in kwargs.items() if k not in arrays}  # flags (deterministic, ...) stay Python values

        def layer(module, args, arrays):
            active.add(path)  # the call below passes through this interceptor again: let it through
            try:
                return module(*args, **arrays, **static)
            finally:
                active.discard(path)

        return nn.remat(layer, policy=policy)(context.module, args, arrays)

    with nn.intercept_methods(interceptor):
        out = forward()
    if not matched:
        raise ValueError(
            f"remat={remat!r} found no layer: no module path fullmatches {layers!r}; pass the model's layer "
            "paths as a regex (layers=...) or use remat='none'"
        )
    return out
