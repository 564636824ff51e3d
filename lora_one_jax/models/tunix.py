"""tunix's Flax NNX models (Llama 3, Qwen 3, Gemma 3): building, loading SmolLM2, and Hugging Face names.

* ``import_tunix(family)`` imports ``tunix.models.<family>.model`` without changing flax's global
  ``flax_always_shard_variable`` for the rest of the process (tunix sets it to False on import; it is
  False only while ``tunix_flags()`` builds a model), and fixes tunix 0.1.7's Llama 3 / Qwen 3
  attention, which ignores ``ModelConfig.rope_theta`` (it always uses 1,000,000): ``_fix_rope`` makes
  ``apply_rope`` use the config's base. Llama 3.1 / 3.2 rope *scaling* is not implemented by tunix.
* ``toy_tunix(family)``: tiny random models for tests; ``load_nnx("smollm2-135m")``: SmolLM2-135M from our GGUF as
  tunix's ``Llama3`` (``weight_tying=True``, ``rope_theta=100000``); ``tunix_from_linen`` maps the params
  of a Hugging Face ``FlaxLlamaForCausalLM`` onto tunix's ``Llama3``.
* ``hf_name(path)`` / ``nnx_path(name)``: adapter paths of tunix models <-> Hugging Face module names
  (``layers/3/attn/q_proj`` <-> ``model/layers/3/self_attn/q_proj``), one to one, so ``save_peft`` /
  ``load_peft`` and PyTorch exports work with ``to_hf_adapters`` / ``from_hf_adapters``.

Needs the ``nnx`` extra (``pip install -e ".[nnx]"``: ``google-tunix==0.1.7``).

Example:
    >>> model, params = toy_tunix("llama3")
    >>> type(model).__name__, hf_name("layers/0/attn/q_proj")
    ('Llama3', 'model/layers/0/self_attn/q_proj')
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
import threading
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_one_jax.nnx import kernels, nnx_split, to_matrix

FAMILIES = ("llama3", "qwen2", "qwen3", "gemma3")
CLASSES = {"llama3": "Llama3", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3"}
_FLAG = "flax_always_shard_variable"
_ROPE = threading.local()  # the rope base of the attention block being traced (see _fix_rope)


@contextlib.contextmanager
def tunix_flags():
    """flax's ``flax_always_shard_variable`` False inside (as tunix builds its models), restored after.

    Example:
        >>> with tunix_flags():
        ...     flax.config.flax_always_shard_variable
        False
    """
    before = getattr(flax.config, _FLAG)
    flax.config.update(_FLAG, False)
    try:
        yield
    finally:
        flax.config.update(_FLAG, before)


def import_tunix(family: str):
    """``tunix.models.<family>.model``, imported with flax's global flags left as they were, rope fixed.

    Example:
        >>> before = flax.config.flax_always_shard_variable
        >>> import_tunix("llama3").Llama3.__name__, flax.config.flax_always_shard_variable == before
        ('Llama3', True)
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tunix family {family!r}; supported: {list(FAMILIES)}")
    name = f"tunix.models.{family}.model"
    if name not in sys.modules:
        with tunix_flags():
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ImportError(
                    f"{name} needs tunix: pip install -e '.[nnx]' (google-tunix==0.1.7); {type(e).__name__}: {e}"
                ) from e
    module = sys.modules[name]
    if family in ("llama3", "qwen3"):
        _fix_rope(module)
    return module


def _fix_rope(module) -> None:
    """Make ``module``'s attention pass ``config.rope_theta`` to ``apply_rope`` (tunix 0.1.7 drops it). Idempotent.

    The attention block records its config's base while it runs; ``apply_rope`` (looked up in the module at
    call time) uses it. Patched once per process, like ``lora_one_jax.models.compat`` for transformers.
    """
    if getattr(module, "_lora_one_rope_fixed", False):
        return
    apply_rope, block = module.apply_rope, module.Attention.block

    def apply_rope_with_base(inputs, positions, head_dim, rope_theta=None):
        theta = getattr(_ROPE, "theta", None) if rope_theta is None else rope_theta
        return apply_rope(inputs, positions, head_dim=head_dim, **({} if theta is None else {"rope_theta": theta}))

    def block_with_base(self, *args, **kwargs):
        before, _ROPE.theta = getattr(_ROPE, "theta", None), self.config.rope_theta
        try:
            return block(self, *args, **kwargs)
        finally:
            _ROPE.theta = before

    module.apply_rope, module.Attention.block = apply_rope_with_base, block_with_base
    module._lora_one_rope_fixed = True


def build(family: str, config, *, seed: int = 0):
    """A tunix model of ``family`` for ``config`` (random init, flags contained); ``(model, params)`` with
    ``params`` from ``lora_one_jax.nnx_split``.

    Example:
        >>> lm = import_tunix("llama3")
        >>> model, params = build("llama3", toy_config("llama3"))
        >>> params["layers"][0]["attn"]["q_proj"]["w"].shape
        (32, 4, 8)
    """
    module = import_tunix(family)
    with tunix_flags():
        model = getattr(module, CLASSES[family])(config, rngs=nnx.Rngs(seed))
    return model, nnx_split(model)[1]


def toy_config(family: str, **overrides):
    """A tiny tunix ``ModelConfig``: 2 layers, width 32, 4 heads of 8, 2 KV heads, vocabulary 64.

    Example:
        >>> toy_config("qwen3").num_kv_heads
        2
    """
    module = import_tunix(family)
    sizes = dict(num_layers=2, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8, num_kv_heads=2)
    if family == "gemma3":
        sizes.update(num_embed=64, param_dtype=jnp.float32, sliding_window_size=4)
    else:
        sizes.update(vocab_size=64, rope_theta=10_000, norm_eps=1e-6)
    sizes.update(overrides)
    return module.ModelConfig(**sizes)


def toy_tunix(family: str, *, seed: int = 0, std: float = 0.1, **overrides):
    """A tiny random tunix model and its params: every weight normal(``std``), norm scales around their
    init (so no kernel is zero, unlike tunix's zero-initialised MLPs).

    Example:
        >>> model, params = toy_tunix("gemma3")
        >>> type(model).__name__
        'Gemma3'
    """
    model, params = build(family, toy_config(family, **overrides), seed=seed)
    rng = np.random.default_rng(seed)

    def draw(x):
        noise = rng.normal(0.0, std, np.shape(x)).astype(np.float32)
        return jnp.asarray(noise if np.ndim(x) >= 2 else np.asarray(x, np.float32) + noise, x.dtype)

    params = jax.tree.map(draw, params)
    nnx.update(model, params)
    return model, params


# ----------------------------------------------------------------------------- SmolLM2 and FlaxLlama params


def llama_config_from_hf(hf_config):
    """tunix ``llama3.ModelConfig`` of a transformers ``LlamaConfig`` (plain rotary embeddings only).

    Example:
        >>> from transformers import LlamaConfig
        >>> c = llama_config_from_hf(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=1e5))
        >>> c.head_dim, c.rope_theta
        (16, 100000.0)
    """
    _no_rope_scaling(hf_config, "Llama3")
    return import_tunix("llama3").ModelConfig(
        **_decoder_fields(hf_config), weight_tying=bool(hf_config.tie_word_embeddings)
    )


#: tunix decoder ``ModelConfig`` field -> transformers config field (Llama 3, Qwen 2.5, Qwen 3), both directions.
_CONFIG_FIELDS = (
    ("num_layers", "num_hidden_layers"),
    ("vocab_size", "vocab_size"),
    ("embed_dim", "hidden_size"),
    ("hidden_dim", "intermediate_size"),
    ("num_heads", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
)


def _decoder_fields(hf) -> dict:
    """The tunix ``ModelConfig`` keywords Llama 3 and Qwen share, read from a transformers config."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return {**{ours: getattr(hf, theirs) for ours, theirs in _CONFIG_FIELDS}, "head_dim": head_dim}


def tunix_from_linen(hf_config, linen_params, *, dtype=jnp.float32):
    """tunix's ``Llama3`` holding the weights of a ``FlaxLlamaForCausalLM`` (``linen_params``): ``(model, params)``.

    q/k/v kernels (D, N*H) become (D, N, H), o_proj (N*H, D) becomes (N, H, D), MLP kernels and norms as they
    are; a tied checkpoint keeps only the embedding. Shardings of the linen params are kept.
    """
    config = llama_config_from_hf(hf_config)
    lm = import_tunix("llama3")
    with tunix_flags():
        abstract = nnx.eval_shape(lambda: lm.Llama3(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx_split(abstract)
    src = linen_params["model"]
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    cast = lambda x: jnp.asarray(x, dtype)
    values = {
        ("embedder", "input_embedding"): src["embed_tokens"]["embedding"],
        ("final_norm", "w"): src["norm"]["weight"],
    }
    if not config.weight_tying:
        values[("lm_head", "w")] = linen_params["lm_head"]["kernel"]
    shapes = {"q_proj": (-1, n, h), "k_proj": (-1, k, h), "v_proj": (-1, k, h), "o_proj": (n, h, -1)}
    for i in range(config.num_layers):
        layer = src["layers"][str(i)]
        for name, shape in shapes.items():
            values[("layers", i, "attn", name, "w")] = jnp.reshape(layer["self_attn"][name]["kernel"], shape)
        for name in ("gate_proj", "up_proj", "down_proj"):
            values[("layers", i, "mlp", name, "kernel")] = layer["mlp"][name]["kernel"]
        values[("layers", i, "input_layernorm", "w")] = layer["input_layernorm"]["weight"]
        values[("layers", i, "post_attention_layernorm", "w")] = layer["post_attention_layernorm"]["weight"]
    flat = []
    for keys, var in params.flat_state():
        keys = tuple(keys)
        if keys not in values:
            raise ValueError(f"no FlaxLlama weight for tunix param {'/'.join(map(str, keys))}")
        flat.append((keys, var.replace(value=cast(values[keys]))))
    params = nnx.State.from_flat_path(flat)
    return nnx.merge(graphdef, params, rest), params


# ----------------------------------------------------------------------------- Hugging Face names

# (tunix path regex, HF path template): one to one for Llama 3 and Qwen 3; Gemma 3's own names.
_TO_HF = (
    (r"layers/(\d+)/attn/(q|k|v|o)_proj", r"model/layers/\1/self_attn/\2_proj"),
    (r"layers/(\d+)/mlp/(gate|up|down)_proj", r"model/layers/\1/mlp/\2_proj"),
    (r"layers/(\d+)/attn/q_einsum", r"model/layers/\1/self_attn/q_proj"),
    (r"layers/(\d+)/attn/attn_vec_einsum", r"model/layers/\1/self_attn/o_proj"),
    (r"lm_head", r"lm_head"),
)


def hf_name(path: str) -> str:
    """The Hugging Face module path (``/``-separated) of a tunix module path.

    Example:
        >>> hf_name("layers/3/mlp/down_proj")
        'model/layers/3/mlp/down_proj'
    """
    for pattern, template in _TO_HF:
        if re.fullmatch(pattern, path):
            return re.sub(pattern, template, path)
    raise ValueError(
        f"tunix module {path!r} has no one-to-one Hugging Face module (fused einsums such as Gemma's kv_einsum "
        "or qkv_einsum hold several HF modules in one kernel); exclude it from the LoraConfig to export"
    )


def nnx_path(name: str, family: str = "llama3") -> str:
    """The tunix module path of a Hugging Face module path (inverse of ``hf_name``).

    Example:
        >>> nnx_path("model/layers/3/self_attn/q_proj"), nnx_path("model/layers/0/self_attn/o_proj", "gemma3")
        ('layers/3/attn/q_proj', 'layers/0/attn/attn_vec_einsum')
    """
    m = re.fullmatch(r"model/layers/(\d+)/(self_attn|mlp)/(\w+)", name)
    if name == "lm_head":
        return name
    if m is None:
        raise ValueError(f"{name!r} is not a Hugging Face decoder-layer module path (model/layers/i/...)")
    layer, block, module = m.groups()
    if block == "mlp":
        return f"layers/{layer}/mlp/{module}"
    if family == "gemma3":
        gemma = {"q_proj": "q_einsum", "o_proj": "attn_vec_einsum"}
        if module not in gemma:
            raise ValueError(f"{name!r}: tunix's Gemma 3 fuses k_proj and v_proj into kv_einsum; no one-to-one module")
        return f"layers/{layer}/attn/{gemma[module]}"
    return f"layers/{layer}/attn/{module}"


def to_hf_adapters(adapters):
    """Adapters keyed by Hugging Face module paths (for ``save_peft``); the matrices are unchanged.

    Example:
        >>> sorted(to_hf_adapters({"layers/0/attn/q_proj": {"a": 1, "b": 2}}))
        ['model/layers/0/self_attn/q_proj']
    """
    return {hf_name(p): ad for p, ad in adapters.items()}


def from_hf_adapters(adapters, family: str = "llama3"):
    """Inverse of ``to_hf_adapters`` (e.g. after ``load_peft``).

    Example:
        >>> sorted(from_hf_adapters({"model/layers/0/self_attn/q_proj": {"a": 1, "b": 2}}))
        ['layers/0/attn/q_proj']
    """
    return {nnx_path(p, family): ad for p, ad in adapters.items()}


def load_nnx(spec: str, *, dtype=jnp.float32, tokenizer=None):
    """``(model, params, tokenizer)`` with a tunix model: a local Hugging Face Llama / Qwen 2.5 / Qwen 3 / Gemma 3
    (text) folder is read straight into tunix's ``Llama3`` / ``Qwen2`` / ``Qwen3`` / ``Gemma3`` (``load_hf_nnx``);
    the other Llama-family specs ``load_model`` knows (``"smollm2-135m"``, ``"toy-llama"``, a ``.gguf`` file) are
    read as for the linen backend, then moved into tunix's ``Llama3`` layout (``tunix_from_linen``).

    Example:
        >>> model, params, tok = load_nnx("toy-llama")
        >>> type(model).__name__, model.config.rope_theta
        ('Llama3', 10000.0)
    """
    from lora_one_jax.models.loaders import load_model

    if (Path(spec).expanduser() / "config.json").is_file():
        return load_hf_nnx(Path(spec).expanduser(), dtype=dtype, tokenizer=tokenizer)
    linen, linen_params, tok = load_model(spec, dtype=dtype, tokenizer=tokenizer)
    if type(linen).__name__ != "FlaxLlamaForCausalLM":
        raise NotImplementedError(
            f"backend='nnx' builds tunix's Llama3 from Llama-family checkpoints; {spec!r} is a "
            f"{type(linen).__name__}. Qwen 2.5, Qwen 3 and Gemma 3 load from a local Hugging Face folder "
            "(load_model(folder, backend='nnx')); build other tunix models with tunix's own loaders and pass them to "
            "the core with lora_one_jax.nnx_split(model)"
        )
    model, params = tunix_from_linen(linen.config, linen_params, dtype=dtype)
    return model, params, tok


# tunix param (regex over its path) -> Hugging Face weight name, for the weights that are not adapter kernels
_OTHER_WEIGHTS = (
    (r"embedder/input_embedding", r"model/embed_tokens/weight"),
    (r"final_norm/(w|scale)", r"model/norm/weight"),
    (r"layers/(\d+)/(input_layernorm|post_attention_layernorm)/w", r"model/layers/\1/\2/weight"),
    (r"layers/(\d+)/attn/(q_norm|k_norm)/w", r"model/layers/\1/self_attn/\2/weight"),  # Qwen 3
    (r"layers/(\d+)/attn/(q|k|v)_bias", r"model/layers/\1/self_attn/\2_proj/bias"),  # Qwen 2.5
    (r"layers/(\d+)/pre_attention_norm/scale", r"model/layers/\1/input_layernorm/weight"),  # Gemma 3 from here
    (r"layers/(\d+)/post_attention_norm/scale", r"model/layers/\1/post_attention_layernorm/weight"),
    (r"layers/(\d+)/pre_ffw_norm/scale", r"model/layers/\1/pre_feedforward_layernorm/weight"),
    (r"layers/(\d+)/post_ffw_norm/scale", r"model/layers/\1/post_feedforward_layernorm/weight"),
    (r"layers/(\d+)/attn/_query_norm/scale", r"model/layers/\1/self_attn/q_norm/weight"),
    (r"layers/(\d+)/attn/_key_norm/scale", r"model/layers/\1/self_attn/k_norm/weight"),
)


def hf_state_dict(params) -> dict[str, np.ndarray]:
    """A tunix Llama 3 / Qwen 2.5 / Qwen 3 / Gemma 3 ``params`` state (e.g. merged with adapters) as a PyTorch
    ``state_dict`` of numpy arrays named as transformers' ``*ForCausalLM`` expects: every kernel is its ``(d_in,
    d_out)`` matrix transposed (``nnx.to_matrix``; Gemma's fused ``kv_einsum`` / ``qkv_einsum`` split into
    ``k_proj`` / ``v_proj`` (/ ``q_proj``)), norms, biases and the embedding as they are.

    Example:
        >>> model, params = toy_tunix("llama3")
        >>> sd = hf_state_dict(params)
        >>> sd["model.layers.0.self_attn.o_proj.weight"].shape, sd["model.embed_tokens.weight"].shape
        ((32, 32), (64, 32))
    """
    by_keys = {k.keys: k for k in kernels(params).values()}
    out = {}
    for keys, var in params.flat_state():
        keys, value = tuple(keys), var.get_value()
        names, k = _hf_weights(keys), by_keys.get(tuple(keys))
        parts = [value] if k is None else np.split(np.asarray(to_matrix(value, k.in_axes)).T, len(names))
        out.update({name: np.asarray(part, np.float32) for name, part in zip(names, parts)})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _hf_weights(keys) -> tuple[str, ...]:
    """The transformers state-dict name(s) of a tunix param: several for Gemma's fused einsums (stacked by rows)."""
    path = "/".join(map(str, keys))
    name = next((re.sub(p, t, path) for p, t in _OTHER_WEIGHTS if re.fullmatch(p, path)), None)
    if name is not None:
        return (name.replace("/", "."),)
    if str(keys[-1]) in ("w", "kernel"):
        return tuple(f"{m}/weight".replace("/", ".") for m in hf_modules("/".join(map(str, keys[:-1]))))
    raise ValueError(f"tunix param {path!r} has no Hugging Face weight name here (Llama 3, Qwen 2.5 / 3, Gemma 3)")


def _no_rope_scaling(hf, cls: str) -> None:
    scaling = getattr(hf, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise NotImplementedError(f"rope scaling {scaling} is not implemented by tunix 0.1.7's {cls}")


def _qwen_config(hf, family: str, dtype):
    """tunix ``ModelConfig`` of a transformers ``Qwen2Config`` / ``Qwen3Config``."""
    _no_rope_scaling(hf, CLASSES[family])
    if getattr(hf, "use_sliding_window", False):
        raise NotImplementedError(
            f"{CLASSES[family]} in tunix 0.1.7 has no sliding-window attention (use_sliding_window)"
        )
    return import_tunix(family).ModelConfig(
        **_decoder_fields(hf), use_tied_embedding=bool(hf.tie_word_embeddings), dtype=dtype, param_dtype=dtype
    )


def gemma3_config_from_hf(hf, dtype=jnp.float32):
    """tunix ``gemma3.ModelConfig`` of a transformers ``Gemma3TextConfig``; raises, naming the field, for what tunix
    0.1.7's ``Gemma3`` hard-codes otherwise (the 5 local : 1 global layer pattern, RMSNorm eps 1e-6, tied
    embeddings, tanh GELU, no softcapping, query scale 1/sqrt(head_dim) or 1/sqrt(hidden/heads), linear rope scaling
    of the global layers only).

    Example:
        >>> from transformers import Gemma3TextConfig
        >>> c = gemma3_config_from_hf(Gemma3TextConfig(num_hidden_layers=6, head_dim=8, query_pre_attn_scalar=8))
        >>> c.num_layers, c.sliding_window_size, c.global_base_frequency
        (6, 4096, 1000000.0)
    """
    gm = import_tunix("gemma3")
    n = hf.num_hidden_layers
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    scalings = {hf.head_dim: gm.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM}
    scalings.setdefault(
        hf.hidden_size // hf.num_attention_heads,
        gm.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS,
    )
    scaling = getattr(hf, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    problems = {
        "layer_types": list(getattr(hf, "layer_types", None) or pattern) != pattern,
        "rms_norm_eps": hf.rms_norm_eps != 1e-6,
        "tie_word_embeddings": not hf.tie_word_embeddings,
        "hidden_activation": hf.hidden_activation != "gelu_pytorch_tanh",
        "attn_logit_softcapping": hf.attn_logit_softcapping is not None,
        "final_logit_softcapping": hf.final_logit_softcapping is not None,
        "query_pre_attn_scalar": hf.query_pre_attn_scalar not in scalings,
        "attention_bias": bool(getattr(hf, "attention_bias", False)),
        "use_bidirectional_attention": bool(getattr(hf, "use_bidirectional_attention", False)),
        "rope_scaling": kind not in ("default", "linear"),
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise NotImplementedError(
            f"this Gemma 3 config sets {bad} to values tunix 0.1.7's Gemma3 cannot express (it hard-codes 5 sliding "
            "layers then 1 global, RMSNorm eps 1e-6, tied embeddings, tanh GELU, no logit softcapping, no attention "
            "bias, causal attention, a query scale of 1/sqrt(head_dim) or 1/sqrt(hidden/heads), linear rope scaling)"
        )
    return gm.ModelConfig(
        num_layers=n,
        num_embed=hf.vocab_size,
        embed_dim=hf.hidden_size,
        hidden_dim=hf.intermediate_size,
        num_heads=hf.num_attention_heads,
        head_dim=hf.head_dim,
        num_kv_heads=hf.num_key_value_heads,
        sliding_window_size=hf.sliding_window,
        local_base_frequency=hf.rope_local_base_freq,
        global_base_frequency=hf.rope_theta,
        global_scale_factor=float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0,
        query_pre_attn_norm=scalings[hf.query_pre_attn_scalar],
        param_dtype=dtype,
    )


def _tunix_config(hf, dtype):
    """``(family, tunix ModelConfig)`` of a transformers config (Llama, Qwen 2.5, Qwen 3, Gemma 3 text)."""
    if hf.model_type == "llama":
        return "llama3", llama_config_from_hf(hf)
    if hf.model_type in ("qwen2", "qwen3"):
        return hf.model_type, _qwen_config(hf, hf.model_type, dtype)
    if hf.model_type == "gemma3_text":
        return "gemma3", gemma3_config_from_hf(hf, dtype)
    if hf.model_type == "gemma3":
        raise NotImplementedError(
            "a multimodal Gemma 3 folder (Gemma3ForConditionalGeneration, model_type 'gemma3'): backend='nnx' reads "
            "text-only Gemma 3 folders (Gemma3ForCausalLM, model_type 'gemma3_text', e.g. gemma-3-1b / 270m)"
        )
    raise NotImplementedError(
        f"model_type {hf.model_type!r}: backend='nnx' reads Llama, Qwen 2.5, Qwen 3 and Gemma 3 (text) folders; build "
        "other tunix models with tunix's own loaders and pass them to lora_one_jax.nnx_split(model)"
    )


def _safetensors_tensors(folder):
    """``{name: numpy array}`` of a folder's ``model.safetensors`` or its shards (read lazily, one file open)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = [folder / f for f in files] or [folder / "model.safetensors"]
    if not files[0].is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors (or index); backend='nnx' reads safetensors")
    out = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                out[name] = handle.get_tensor(name)
    return out


def load_hf_nnx(folder, *, dtype=jnp.float32, tokenizer=None):
    """A local Hugging Face Llama / Qwen 2.5 / Qwen 3 / Gemma 3 (text) folder (safetensors, PyTorch names) as tunix's
    ``Llama3`` / ``Qwen2`` / ``Qwen3`` / ``Gemma3``: ``(model, params, tokenizer)``, each weight moved into tunix's
    layout (the inverse of ``hf_state_dict``; Gemma's ``k_proj`` / ``v_proj`` stacked into its ``kv_einsum``).

    Example:
        >>> model, params, tok = load_hf_nnx("path/to/Qwen2.5-0.5B")  # doctest: +SKIP
    """
    import transformers

    from lora_one_jax.nnx import from_matrix

    hf = transformers.AutoConfig.from_pretrained(folder)
    family, config = _tunix_config(hf, dtype)
    cls = CLASSES[family]
    with tunix_flags():
        abstract = nnx.eval_shape(lambda: getattr(import_tunix(family), cls)(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx_split(abstract)
    tensors = _safetensors_tensors(folder)
    by_keys = {k.keys: k for k in kernels(params).values()}
    flat = []
    for keys, var in params.flat_state():
        keys = tuple(keys)
        names = _hf_weights(keys)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{folder} lacks {missing} (tunix {'/'.join(map(str, keys))}); is it a {cls} checkpoint?")
        k = by_keys.get(keys)
        if k is None:
            value = tensors[names[0]]
        else:
            value = from_matrix(np.concatenate([tensors[n].T for n in names], axis=1), k.shape, k.in_axes)
        if tuple(np.shape(value)) != tuple(var.get_value().shape):
            raise ValueError(f"{names} has shape {np.shape(value)}, tunix expects {var.get_value().shape}")
        flat.append((keys, var.replace(value=jnp.asarray(value, dtype))))
    params = nnx.State.from_flat_path(flat)
    if tokenizer is None and any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return nnx.merge(graphdef, params, rest), params, tokenizer


def hf_modules(path: str) -> tuple[str, ...]:
    """The Hugging Face modules a tunix module stands for: one, or several for Gemma's fused einsums.

    Example:
        >>> hf_modules("layers/1/attn/kv_einsum")
        ('model/layers/1/self_attn/k_proj', 'model/layers/1/self_attn/v_proj')
    """
    m = re.fullmatch(r"layers/(\d+)/attn/(kv|qkv)_einsum", path)
    if m is None:
        return (hf_name(path),)
    return tuple(f"model/layers/{m.group(1)}/self_attn/{c}_proj" for c in m.group(2))


def load_peft_nnx(folder, family: str = "llama3"):
    """``(adapters, config)`` from a PEFT adapter folder, keyed by tunix module paths (``load_peft`` +
    ``from_hf_adapters``); the config targets exactly those modules.

    Example:
        >>> adapters, config = load_peft_nnx("path/to/peft-adapter")  # doctest: +SKIP
    """
    import dataclasses

    from lora_one_jax.export import load_peft

    hf_adapters, config = load_peft(folder)
    adapters = from_hf_adapters(hf_adapters, family)
    by_hf = {re.escape(p): re.escape(nnx_path(p, family)) for p in hf_adapters}
    return adapters, dataclasses.replace(
        config,
        targets="|".join(re.escape(p) for p in sorted(adapters)),
        rank_pattern=tuple((by_hf.get(k, k), v) for k, v in config.rank_pattern),
        alpha_pattern=tuple((by_hf.get(k, k), v) for k, v in config.alpha_pattern),
    )


def hf_config(model):
    """A transformers ``LlamaConfig`` / ``Qwen2Config`` / ``Qwen3Config`` describing a tunix Llama 3 / Qwen 2.5 /
    Qwen 3 model.

    Example:
        >>> model, _ = toy_tunix("qwen3")
        >>> type(hf_config(model)).__name__, hf_config(model).head_dim
        ('Qwen3Config', 8)
    """
    import transformers

    c = model.config
    name = type(model).__name__
    classes = {"Llama3": "Llama", "Qwen2": "Qwen2", "Qwen3": "Qwen3"}
    if name not in classes:
        raise NotImplementedError(
            f"no Hugging Face config for tunix {name} here (Llama3, Qwen2 and Qwen3 only): a merged {name} folder "
            "cannot be written; export PEFT adapters instead"
        )
    tied = c.weight_tying if name == "Llama3" else c.use_tied_embedding
    fields = {theirs: getattr(c, ours) for ours, theirs in _CONFIG_FIELDS}
    return getattr(transformers, f"{classes[name]}Config")(
        **{**fields, "rope_theta": float(c.rope_theta)},
        head_dim=c.head_dim,
        tie_word_embeddings=bool(tied),
        architectures=[f"{classes[name]}ForCausalLM"],
    )


def save_pretrained_nnx(folder, model, params, tokenizer=None):
    """Write tunix ``params`` (e.g. ``lj.merge(params, adapters, config)``) as a Hugging Face model folder
    (``model.safetensors`` + ``config.json``) that ``transformers`` loads in PyTorch.

    Example:
        >>> import tempfile
        >>> model, params = toy_tunix("llama3")
        >>> sorted(p.name for p in save_pretrained_nnx(tempfile.mkdtemp(), model, params).iterdir())
        ['config.json', 'model.safetensors']
    """
    import os
    from pathlib import Path

    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(model)
    state = hf_state_dict(params)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = folder / f".model.safetensors.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- qwix hand-off


def _constant(value, what: str):
    """A qwix initializer that returns ``value`` laid out in the shape qwix asks for (same element order)."""

    def init(rng, shape, dtype):
        del rng
        if int(np.prod(shape)) != value.size:
            raise ValueError(f"{what}: qwix asks for shape {tuple(shape)}, the adapter has {value.shape}")
        return jnp.reshape(value, shape).astype(dtype)

    return init


def to_qwix(model, params, adapters, config, *inputs, targets=None, **input_kwargs):
    """A copy of ``model`` (with ``params``, e.g. the base an init returned) carrying ``adapters`` the way qwix
    adapts NNX models: ``nnx.LoRAParam`` ``<w>_lora_a`` / ``<w>_lora_b`` on each targeted layer, so tunix's own
    trainers (``PeftTrainer``, RL) continue from a LoRA-One init. One ``qwix.LoraRule`` per module, with
    ``alpha = scale * rank`` (qwix scales by alpha / rank), so rsLoRA and per-module ranks / alphas keep their
    scale. qwix needs one call of the model to create its params: ``inputs`` / ``input_kwargs`` (default: the
    tunix model's ``get_model_input()``). Dropout is carried over (qwix draws it from the model's rngs).

    Example:
        >>> model, params = toy_tunix("llama3")
        >>> cfg = lj.LoraConfig(rank=2, targets=["q_proj"])
        >>> base, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
        >>> q = to_qwix(model, base, adapters, cfg)
        >>> q.layers[0].attn.q_proj.w_lora_a.shape, type(q.layers[0].attn.q_proj.w_lora_b).__name__
        ((32, 2), 'LoRAParam')
    """
    import qwix

    from lora_one_jax.config import find_targets

    resolved = find_targets(params, config) if targets is None else targets
    missing = sorted(set(adapters) - set(resolved))
    if missing:
        raise ValueError(
            f"adapters {missing[:5]} are not targets of this LoraConfig; pass the config they were made with"
        )
    rules = [
        qwix.LoraRule(
            module_path=re.escape(path),
            rank=resolved[path].rank,
            alpha=resolved[path].scale * resolved[path].rank,
            dropout=config.dropout,
            lora_a_initializer=_constant(jnp.asarray(ad["a"]), f"{path} A"),
            lora_b_initializer=_constant(jnp.asarray(ad["b"]), f"{path} B"),
        )
        for path, ad in sorted(adapters.items())
    ]
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    copy = nnx.merge(graphdef, params, rest)
    if not inputs and not input_kwargs:
        if not hasattr(copy, "get_model_input"):
            raise TypeError(
                f"{type(model).__name__} has no get_model_input(): pass example inputs for qwix's first call"
            )
        input_kwargs = copy.get_model_input()
    with tunix_flags():
        out = qwix.apply_lora_to_model(copy, qwix.LoraProvider(rules), *inputs, rngs=nnx.Rngs(0), **input_kwargs)
    made = {"/".join(map(str, k[:-1])) for k, _ in nnx.state(out, nnx.LoRAParam).flat_state()}
    unmatched = sorted(p for p in adapters if p not in made)
    if unmatched:
        raise ValueError(f"qwix did not adapt {unmatched[:5]}: their layers did not run in the example call")
    return out
