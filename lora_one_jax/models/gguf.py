"""Llama-family GGUF files (llama.cpp format) -> ``FlaxLlamaForCausalLM`` params + tokenizer.

What the conversion does (each step checked against a plain numpy forward pass and llama.cpp's
conventions):

* every tensor is dequantized with ``gguf.quants.dequantize`` (Q4_1, Q8_0, F16, ... -> float32) and
  reshaped to ``reversed(shape)``, i.e. PyTorch's (out, in); Flax kernels are the transpose;
* llama.cpp stores ``attn_q`` / ``attn_k`` rows permuted for its rope layout; we undo it per weight
  (``n_heads`` for q, ``n_kv_heads`` for k);
* tied embeddings (no ``output.weight``): ``lm_head`` = embedding transposed, because FlaxLlama
  does not tie them itself;
* ``rope_theta`` comes from ``llama.rope.freq_base`` (SmolLM2: 100000), which FlaxLlama honours
  thanks to ``lora_one_jax.models.compat``;
* the tokenizer is rebuilt from ``tokenizer.ggml.*`` (byte-level BPE, see ``lora_one_jax.models.tokenizer``)
  with its special tokens and chat template.

Example:
    >>> model, params, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np

from lora_one_jax.models.compat import patch_transformers
from lora_one_jax.models.tokenizer import bpe_tokenizer
from lora_one_jax.sharding import leaf_placer

_LAYER_NAMES = {
    "attn_norm.weight": ("input_layernorm", "weight"),
    "ffn_norm.weight": ("post_attention_layernorm", "weight"),
    "attn_q.weight": ("self_attn/q_proj", "kernel"),
    "attn_k.weight": ("self_attn/k_proj", "kernel"),
    "attn_v.weight": ("self_attn/v_proj", "kernel"),
    "attn_output.weight": ("self_attn/o_proj", "kernel"),
    "ffn_gate.weight": ("mlp/gate_proj", "kernel"),
    "ffn_up.weight": ("mlp/up_proj", "kernel"),
    "ffn_down.weight": ("mlp/down_proj", "kernel"),
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation of an (out, in) weight with ``n_heads`` heads.

    Example:
        >>> w = np.arange(8.0).reshape(4, 2)  # one head of size 4, rows stored [0, 2, 1, 3]
        >>> unpermute_qk(w, 1)[:, 0].tolist()
        [0.0, 4.0, 2.0, 6.0]
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (what ``convert_hf_to_gguf.py`` applies); inverse of ``unpermute_qk``.

    Example:
        >>> w = np.random.default_rng(0).normal(size=(8, 3))
        >>> bool((unpermute_qk(permute_qk(w, 2), 2) == w).all())
        True
    """
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


class _Metadata:
    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key):
        value = self.get(key)
        if value is None:
            raise ValueError(f"the GGUF file has no {key!r} metadata; it is not a complete llama.cpp model file")
        return value

    def supported(self, key: str, value: str, hint: str) -> None:
        """Raise ``NotImplementedError`` (naming the key, its value and ``hint``) unless ``key`` holds ``value``."""
        found = self.require(key)
        if found != value:
            raise NotImplementedError(f"GGUF {key} = {found!r} is not supported; {hint}")

    def token_id(self, name: str):
        """``tokenizer.ggml.<name>_token_id`` (None when absent)."""
        return self.get(f"tokenizer.ggml.{name}_token_id")


def gguf_tokenizer(source):
    """The tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata (byte-level BPE only),
    as a ``PreTrainedTokenizerFast``. ``source``: a path, a ``gguf.GGUFReader`` or its metadata.

    Example:
        >>> from lora_one_jax.models.assets import asset_path
        >>> tok = gguf_tokenizer(asset_path("smollm2"))  # doctest: +SKIP
        >>> tok.convert_ids_to_tokens(tok("in 2024").input_ids)  # doctest: +SKIP
        ['in', 'Ġ', '2', '0', '2', '4']
    """
    if isinstance(source, (str, os.PathLike)):
        import gguf

        source = gguf.GGUFReader(os.fspath(source))
    meta = source if isinstance(source, _Metadata) else _Metadata(source)
    meta.supported(
        "tokenizer.ggml.model",
        "gpt2",
        "only byte-level BPE ('gpt2'); load the model's tokenizer yourself (e.g. transformers.AutoTokenizer) "
        "and pass it as load_model(..., tokenizer=...)",
    )
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    return bpe_tokenizer(
        tokens,
        meta.require("tokenizer.ggml.merges"),
        pre=meta.get("tokenizer.ggml.pre", "default"),
        special=[i for i, t in enumerate(types) if t == 3],  # CONTROL tokens
        bos_id=meta.token_id("bos"),
        eos_id=meta.token_id("eos"),
        pad_id=meta.token_id("padding"),
        unk_id=meta.token_id("unknown"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _llama_config(meta: _Metadata, tied: bool):
    from transformers import LlamaConfig

    meta.supported(
        "general.architecture",
        "llama",
        "only Llama-family ('llama': Llama, Mistral, SmolLM, ...) GGUF files convert to FlaxLlamaForCausalLM",
    )
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise NotImplementedError(
            f"rope scaling {scaling!r} is not supported by FlaxLlama; only plain rotary embeddings"
        )
    hidden, heads = int(meta.require("llama.embedding_length")), int(meta.require("llama.attention.head_count"))
    rope_dim = meta.get("llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != hidden // heads:
        raise NotImplementedError(
            f"rope dimension {rope_dim} != head dim {hidden // heads}: partial rotary is not supported"
        )
    vocab = meta.get("llama.vocab_size") or len(meta.require("tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta.require("llama.feed_forward_length")),
        num_hidden_layers=int(meta.require("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
        bos_token_id=meta.token_id("bos"),
        eos_token_id=meta.token_id("eos"),
        pad_token_id=meta.token_id("padding"),
    )


def _layer_weight(name: str, w: np.ndarray, config) -> tuple[str, str, np.ndarray]:
    """``(module, leaf, value)`` of a ``blk.N.<name>`` tensor: q/k rows un-permuted, kernels transposed."""
    module, leaf = _LAYER_NAMES[name]
    if name == "attn_q.weight":
        w = unpermute_qk(w, config.num_attention_heads)
    elif name == "attn_k.weight":
        w = unpermute_qk(w, config.num_key_value_heads)
    return module, leaf, (w.T if leaf == "kernel" else w)


def _read_tensors(reader, config, put) -> dict:
    """FlaxLlama params from the GGUF tensors, each dequantized and placed (``put``) as it is read."""
    import gguf

    params: dict = {"model": {"layers": {}}}
    tied = config.tie_word_embeddings
    embedding = None  # a host copy for a tied lm_head
    layer_re = re.compile(r"blk\.(\d+)\.(.+)")
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            list(reversed(t.shape.tolist()))
        )
        m = layer_re.fullmatch(t.name)
        if t.name == "token_embd.weight":
            embedding = w if tied else None
            params["model"]["embed_tokens"] = {"embedding": put("model/embed_tokens/embedding", w)}
        elif t.name == "output_norm.weight":
            params["model"]["norm"] = {"weight": put("model/norm/weight", w)}
        elif t.name == "output.weight":
            params["lm_head"] = {"kernel": put("lm_head/kernel", w.T)}
        elif m and m.group(2) in _LAYER_NAMES:
            module, leaf, w = _layer_weight(m.group(2), w, config)
            node = params["model"]["layers"].setdefault(m.group(1), {})
            for part in module.split("/"):
                node = node.setdefault(part, {})
            node[leaf] = put(f"model/layers/{m.group(1)}/{module}/{leaf}", w)
        else:
            raise NotImplementedError(
                f"GGUF tensor {t.name!r} has no FlaxLlama counterpart (biases, rope_freqs, "
                "MoE and other variants are not supported)"
            )
    if "lm_head" not in params and embedding is not None:
        params["lm_head"] = {"kernel": put("lm_head/kernel", embedding.T)}
    missing = [str(i) for i in range(config.num_hidden_layers) if len(params["model"]["layers"].get(str(i), {})) != 4]
    if missing or "embed_tokens" not in params["model"] or "norm" not in params["model"]:
        raise ValueError(f"the GGUF file lacks tensors (layers {missing[:5]} incomplete, or no embedding/norm)")
    return params


def load_gguf(path: str | os.PathLike, *, dtype=jnp.float32, tokenizer=None, mesh=None, rules=None):
    """``(FlaxLlamaForCausalLM, params, tokenizer)`` from a Llama-family GGUF file.

    ``dtype`` is the params' dtype and the model's computation dtype (float32 or bfloat16). Pass a
    ``tokenizer`` to skip rebuilding it from the file. Each tensor is placed as soon as it is dequantized
    (into its ``rules`` sharding over ``mesh`` when given, see ``lora_one_jax.sharding``).

    Example:
        >>> from lora_one_jax.models.assets import asset_path
        >>> model, params, tok = load_gguf(asset_path("smollm2"))  # doctest: +SKIP
        >>> model.config.rope_theta  # doctest: +SKIP
        100000.0
    """
    import gguf
    from transformers import FlaxLlamaForCausalLM

    patch_transformers()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    reader = gguf.GGUFReader(path)
    meta = _Metadata(reader)
    config = _llama_config(meta, tied="output.weight" not in {t.name for t in reader.tensors})
    params = _read_tensors(reader, config, leaf_placer(dtype, mesh, rules))
    model = FlaxLlamaForCausalLM(config, dtype=dtype, _do_init=False)
    if tokenizer is None:
        tokenizer = gguf_tokenizer(meta)
    return model, params, tokenizer
