"""The core's only contact with Hugging Face: recognise an HF Flax model, and apply our fixes to
transformers when (and only when) the user has imported it. The core never imports transformers.

Example:
    >>> import flax.linen as nn
    >>> is_hf_model(nn.Dense(2))
    False
"""

from __future__ import annotations

import sys

import flax.linen as nn


def is_hf_model(obj) -> bool:
    """Whether ``obj`` is a Hugging Face ``FlaxPreTrainedModel`` (a wrapper holding a linen ``.module``).

    Example:
        >>> is_hf_model(object())
        False
    """
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "module", None), nn.Module)


def apply_hf_fixes() -> None:
    """Patch transformers' Flax models (``lora_one_jax.models.compat``) if transformers is imported.

    Example:
        >>> apply_hf_fixes()  # a no-op without transformers; idempotent with it
    """
    if "transformers" in sys.modules:
        from lora_one_jax.models.compat import patch_transformers

        patch_transformers()
