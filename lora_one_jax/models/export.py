"""A Hugging Face model folder from Flax params: ``config.json`` + ``model.safetensors`` (+ tokenizer).

The weights are written in PyTorch's layout and names (``lora_one_jax.export.pytorch_state_dict``) with
``{"format": "pt"}`` metadata, which is what both ``transformers.AutoModelForCausalLM.from_pretrained``
(PyTorch, natively) and ``FlaxAutoModelForCausalLM.from_pretrained`` / ``load_model(folder)`` (converted
on load) read. To export a fine-tuned model, merge the adapters first (``lora_one_jax.merge``).

Example:
    >>> import tempfile
    >>> from lora_one_jax.models import load_model
    >>> model, params, tok = load_model("toy-llama")
    >>> folder = save_pretrained(tempfile.mkdtemp(), model, params, tok)
    >>> sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors"))[:3]
    ['config.json', 'generation_config.json', 'model.safetensors']
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from lora_one_jax.export import pytorch_state_dict


def save_pretrained(folder: str | os.PathLike, model, params, tokenizer=None) -> Path:
    """Write ``params`` of the HF Flax ``model`` as a Hugging Face model folder (see module doc).

    A checkpoint with tied embeddings keeps ``tie_word_embeddings`` only if ``lm_head`` still equals the
    embedding (full fine-tuning updates them separately in Flax); otherwise the config says untied.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    state = pytorch_state_dict(params)
    prefix = getattr(model, "base_model_prefix", "model")
    embed = state.get(f"{prefix}.embed_tokens.weight")
    head = state.get("lm_head.weight")
    if getattr(config, "tie_word_embeddings", False) and embed is not None and head is not None:
        if np.array_equal(embed, head):
            del state["lm_head.weight"]  # PyTorch ties it back to the embedding
        else:
            config.tie_word_embeddings = False
    tmp = folder / f".model.safetensors.tmp-{os.getpid()}"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    config.architectures = [type(model).__name__.removeprefix("Flax")]
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
