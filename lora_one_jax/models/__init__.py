"""The model zoo: pretrained models fetched offline, loaders, tokenizers and the Hugging Face fixes.

Importing this package changes nothing in transformers: the loaders apply the Hugging Face Flax fixes
(``patch_transformers``) to the models they build; call ``patch_transformers()`` yourself before building an
HF Flax model with transformers directly (it is idempotent).

Example:
    >>> from lora_one_jax.models import load_model
    >>> model, params, tok = load_model("toy-llama")
    >>> type(model).__name__
    'FlaxLlamaForCausalLM'
"""

from lora_one_jax.models.assets import ASSETS, AssetError, asset_path, cache_dir, fetch_asset
from lora_one_jax.models.compat import patch_transformers
from lora_one_jax.models.gguf import load_gguf
from lora_one_jax.models.loaders import (
    HUB_IDS,
    KNOWN_MODELS,
    LoadedModel,
    cast_params,
    hub_id,
    load_hf,
    load_model,
    merge_safetensors_shards,
    toy_llama,
    toy_t5,
)
from lora_one_jax.models.tokenizer import bpe_tokenizer, toy_tokenizer

__all__ = [
    "ASSETS",
    "AssetError",
    "HUB_IDS",
    "KNOWN_MODELS",
    "LoadedModel",
    "asset_path",
    "bpe_tokenizer",
    "cache_dir",
    "cast_params",
    "fetch_asset",
    "hub_id",
    "load_gguf",
    "load_hf",
    "load_model",
    "merge_safetensors_shards",
    "patch_transformers",
    "toy_llama",
    "toy_t5",
    "toy_tokenizer",
]
