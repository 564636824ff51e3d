"""What a method leaves behind: our adapter files, a PEFT folder, a merged Hugging Face model folder.

Every process gathers the (possibly sharded) arrays; the first one writes. PiSSA and LoRA-GA train on a
residual base, so their PEFT export folds the initial adapters in (PEFT adds adapters to the original W).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

import lora_one_jax as lj
from lora_one_jax.export import fold_residual, load_adapters, save_adapters, save_peft
from lora_one_jax.models import hub_id
from lora_one_jax.models.export import save_pretrained
from lora_one_jax.nnx import is_nnx_module
from lora_one_jax.sharding import to_numpy


def is_main_process() -> bool:
    """Whether this process writes the run's files (the first one; every process computes)."""
    return jax.process_index() == 0


def to_host(tree):
    """Numpy copies of (possibly sharded, possibly multi-host) arrays, the same on every process."""
    return jax.tree.map(to_numpy, tree)


def initial_adapters_dir(folder: Path) -> Path:
    """Where a residual method keeps its step-0 adapters (its frozen base is rebuilt from them on resume)."""
    return folder / "initial_adapters"


def export_full(ctx, folder: Path, params) -> dict:
    """Full fine-tuning: only a merged model folder makes sense."""
    cfg = ctx.cfg
    params = to_host(params)
    if not is_main_process() or not (cfg.export.merged or cfg.export.adapters or cfg.export.peft):
        return {}
    return {"merged": str(merged_folder(folder / "merged", ctx.model, params, ctx.tokenizer))}


def export_adapters(ctx, folder: Path, method: str, base, adapters) -> dict:
    """The method's exports as configured (``export`` section); returns ``{kind: path}``."""
    cfg, out = ctx.cfg, {}
    residual = lj.METHODS[method].residual_base
    adapters = jax.tree.map(np.asarray, to_host(adapters))
    host_base = to_host(base) if cfg.export.merged else None
    if not is_main_process():
        return out
    if cfg.export.adapters:
        meta = {"model": cfg.model.spec, "method": method, "residual_base": str(residual)}
        out["adapters"] = str(save_adapters(folder / "adapters", adapters, cfg.lora, metadata=meta))
    if cfg.export.peft:
        peft_adapters, peft_config = adapters, cfg.lora
        if residual:
            initial, _ = load_adapters(initial_adapters_dir(folder))
            peft_adapters, peft_config = fold_residual(adapters, initial, cfg.lora)
        if is_nnx_module(ctx.model):  # PEFT files name modules as Hugging Face does
            from lora_one_jax.models.tunix import to_hf_adapters

            peft_adapters = to_hf_adapters(peft_adapters)
        base_name = hub_name(cfg.model.spec)
        out["peft"] = str(save_peft(folder / "peft", peft_adapters, peft_config, base_model_name_or_path=base_name))
    if cfg.export.merged:
        merged = lj.merge(host_base, adapters, cfg.lora, targets=ctx.targets)
        out["merged"] = str(merged_folder(folder / "merged", ctx.model, merged, ctx.tokenizer))
    return out


def merged_folder(folder: Path, model, params, tokenizer) -> Path:
    """A Hugging Face model folder (``config.json`` + ``model.safetensors`` + tokenizer), linen or NNX."""
    if is_nnx_module(model):
        from lora_one_jax.models.tunix import save_pretrained_nnx

        return save_pretrained_nnx(folder, model, params, tokenizer)
    return save_pretrained(folder, model, params, tokenizer)


def hub_name(spec: str) -> str:
    """What a PEFT file names as its base: the hub id the weights came from (PyTorch resolves it), a local
    folder's path, else the spec itself (toy models and GGUF files have no hub id)."""
    return hub_id(spec) or spec
