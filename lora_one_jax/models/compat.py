"""Fixes for Hugging Face Flax models (transformers 4.57) on current JAX, applied once.

Three known defects are fixed here and nowhere else (each has a test in ``tests/test_compat.py``):

* FlaxT5 / FlaxLongT5 call ``jnp.clip(x, a_min=..., a_max=...)``; JAX >= 0.10 removed those
  keywords. We give those two modules a ``jnp`` whose ``clip`` maps them to ``min``/``max``.
  Global ``jax.numpy`` is not touched.
* FlaxLlama / FlaxMistral / FlaxGemma hard-code the rotary base 10000 and ignore
  ``config.rope_theta`` (SmolLM2 uses 100000). Their rotary embedding ``setup`` is replaced by one
  that honours ``rope_theta``. Rope scaling variants are not implemented and raise.
* FlaxMistral with ``sliding_window=None`` (Mistral v0.2+, many fine-tunes) builds its causal mask as
  ``triu(causal, k=-0)``: every token attends only to itself. We rebuild the plain causal mask.

Nothing is patched as a side effect of an import or of the core's functions: the loaders that build HF
models (``load_model``, ``load_hf``, ``load_gguf``, ``toy_llama``, ``toy_t5``) call ``patch_transformers()``;
call it yourself before building an HF Flax model with transformers directly. It is idempotent without
global state: every replaced attribute carries a marker, and a marked attribute is left alone.

Example:
    >>> from lora_one_jax.models.compat import patch_transformers
    >>> patch_transformers()  # idempotent
"""

from __future__ import annotations

import importlib
import types

import jax.numpy as jnp
import numpy as np

#: The attribute that marks what ``patch_transformers`` put in place (so a second call changes nothing).
_MARK = "_lora_one_jax_fix"


def _clip(a, a_min=None, a_max=None, *, min=None, max=None, **kwargs):
    lo = min if min is not None else a_min
    hi = max if max is not None else a_max
    return jnp.clip(a, lo, hi, **kwargs)


class _JnpWithOldClip(types.ModuleType):
    """``jax.numpy`` proxy whose ``clip`` still accepts ``a_min``/``a_max``."""

    def __init__(self):
        super().__init__("jax.numpy")

    def __getattr__(self, name):
        return _clip if name == "clip" else getattr(jnp, name)


def rotary_sincos(num_pos: int, dim: int, theta: float) -> jnp.ndarray:
    """The (num_pos, 1, 2*dim) sin/cos table HF Flax Llama uses, with rotary base ``theta``.

    Example:
        >>> rotary_sincos(4, 8, 10000.0).shape
        (4, 1, 16)
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2)[: dim // 2] / dim))
    freqs = np.einsum("i,j->ij", np.arange(num_pos), inv_freq).astype("float32")
    emb = np.concatenate((freqs, freqs), axis=-1)
    return jnp.array(np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1))


def _rotary_setup(head_dim_of):
    def setup(self):
        scaling = getattr(self.config, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise NotImplementedError(
                f"rope_scaling={scaling!r} is not supported by the Flax {type(self).__name__}; "
                "only plain rotary embeddings (rope_scaling=None) give correct logits here."
            )
        theta = float(getattr(self.config, "rope_theta", 10000.0) or 10000.0)
        self.sincos = rotary_sincos(self.config.max_position_embeddings, head_dim_of(self.config), theta)

    return setup


def _mistral_attention_setup(original_setup):
    def setup(self):
        original_setup(self)
        if not self.config.sliding_window:
            from flax.linen import make_causal_mask

            ones = jnp.ones((1, self.config.max_position_embeddings), dtype="bool")
            self.causal_mask = make_causal_mask(ones, dtype="bool")

    return setup


def _replace(owner, name: str, new) -> None:
    """``owner.name = new`` marked as ours, unless ``owner.name`` already is ours."""
    if getattr(getattr(owner, name), _MARK, False):
        return
    setattr(new, _MARK, True)
    setattr(owner, name, new)


def patch_transformers() -> None:
    """Apply the fixes above to transformers' Flax models (idempotent; imports transformers).

    Example:
        >>> from transformers.models.llama import modeling_flax_llama
        >>> patch_transformers()
        >>> patch_transformers()  # a second call changes nothing
        >>> getattr(modeling_flax_llama.FlaxLlamaRotaryEmbedding.setup, _MARK)
        True
    """
    for name in ("transformers.models.t5.modeling_flax_t5", "transformers.models.longt5.modeling_flax_longt5"):
        _replace(importlib.import_module(name), "jnp", _JnpWithOldClip())
    hidden_over_heads = lambda c: c.hidden_size // c.num_attention_heads
    rotary = {
        "llama": ("FlaxLlamaRotaryEmbedding", hidden_over_heads),
        "mistral": ("FlaxMistralRotaryEmbedding", hidden_over_heads),
        "gemma": ("FlaxGemmaRotaryEmbedding", lambda c: c.head_dim),
    }
    for family, (cls_name, head_dim_of) in rotary.items():
        module = importlib.import_module(f"transformers.models.{family}.modeling_flax_{family}")
        _replace(getattr(module, cls_name), "setup", _rotary_setup(head_dim_of))
    attention = importlib.import_module("transformers.models.mistral.modeling_flax_mistral").FlaxMistralAttention
    _replace(attention, "setup", _mistral_attention_setup(attention.setup))
