"""The core's only contact with Hugging Face: recognise an HF Flax model. The core never imports
transformers and never patches it (the fixes are ``lora_one_jax.models.patch_transformers``, which the
loaders apply and users call when they build an HF Flax model themselves).

Example:
    >>> import flax.linen as nn
    >>> is_hf_model(nn.Dense(2))
    False
"""

from __future__ import annotations

import flax.linen as nn


def is_hf_model(obj) -> bool:
    """Whether ``obj`` is a Hugging Face ``FlaxPreTrainedModel`` (a wrapper holding a linen ``.module``).

    Example:
        >>> is_hf_model(object())
        False
    """
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "module", None), nn.Module)
