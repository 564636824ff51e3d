"""lora-one-jax: LoRA-One fine-tuning (spectral init + preconditioned training) for Flax models.

Example:
    >>> import lora_one_jax as lj
    >>> lj.LoraConfig(rank=8, targets=["q_proj", "v_proj"]).rank
    8
"""

from lora_one_jax.compat import patch_transformers
from lora_one_jax.config import LoraConfig, Target, find_targets, linear_kernels, matches
from lora_one_jax.adapters import init_adapters, lora_init, merge, unmerge
from lora_one_jax.transform import lora_delta, with_lora

patch_transformers()

__all__ = [
    "LoraConfig",
    "Target",
    "find_targets",
    "init_adapters",
    "linear_kernels",
    "lora_delta",
    "lora_init",
    "matches",
    "merge",
    "patch_transformers",
    "unmerge",
    "with_lora",
]
