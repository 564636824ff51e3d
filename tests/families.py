"""Tiny random models of every family we support, built the same way in Flax and (for PEFT
comparisons) PyTorch. Shared by several test modules."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers as tf

import lora_one_jax as lj
from lora_one_jax.models import patch_transformers

VOCAB = 64

#: The tiny decoder every test builds (Llama, Mistral, Gemma share these sizes).
DECODER_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama_config(**overrides) -> tf.LlamaConfig:
    """The tiny Llama config of the tests (``DECODER_SIZES`` with ``overrides``)."""
    return tf.LlamaConfig(**{**DECODER_SIZES, **overrides})


@dataclasses.dataclass
class Family:
    name: str
    model: Any  # flax.linen.Module or HF FlaxPreTrainedModel
    params: Any
    inputs: dict  # keyword arguments of the forward call
    transposed: tuple[str, ...] = ()
    torch_class: str | None = None  # transformers class name for the PEFT comparison
    hf_config: Any = None

    def logits(self, out):
        return out if isinstance(out, jax.Array) else out[0]

    def forward(self, params) -> jax.Array:
        if isinstance(self.model, nn.Module):
            return self.logits(self.model.apply({"params": params}, **self.inputs))
        return self.logits(self.model(**self.inputs, params=params))

    def forward_lora(self, params, adapters, config, **kwargs) -> jax.Array:
        return self.logits(lj.with_lora(self.model, config)({"params": params}, adapters, **self.inputs, **kwargs))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="up")(x))
        x = nn.relu(nn.Dense(16, name="mid")(x))
        return nn.Dense(5, name="head")(x)


def _ids(shape=(2, 8), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, VOCAB, size=shape), jnp.int32)


def build_hf(cls_name: str, config, **kwargs):
    """An HF Flax model built with transformers directly, after the explicit ``patch_transformers()`` (the
    loaders of ``lora_one_jax.models`` apply it themselves; importing the library patches nothing)."""
    patch_transformers()
    return getattr(tf, cls_name)(config, **kwargs)


def _hf(cls_name, config, torch_class, transposed=(), **inputs):
    model = build_hf(cls_name, config, seed=0)
    inputs = inputs or {"input_ids": _ids()}
    return dict(
        model=model,
        params=model.params,
        inputs=inputs,
        transposed=transposed,
        torch_class=torch_class,
        hf_config=config,
    )


def make_family(name: str) -> Family:
    """One tiny random model of the named family, with its example inputs."""
    decoder = DECODER_SIZES
    builders: dict[str, Callable[[], dict]] = {
        "llama": lambda: _hf("FlaxLlamaForCausalLM", tiny_llama_config(rope_theta=100000.0), "LlamaForCausalLM"),
        "mistral": lambda: _hf(
            "FlaxMistralForCausalLM", tf.MistralConfig(**decoder, sliding_window=None), "MistralForCausalLM"
        ),
        "gemma": lambda: _hf("FlaxGemmaForCausalLM", tf.GemmaConfig(**decoder, head_dim=8), "GemmaForCausalLM"),
        "gpt2": lambda: _hf(
            "FlaxGPT2LMHeadModel",
            tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
            "GPT2LMHeadModel",
            transposed=("c_attn", "c_proj", "c_fc"),
        ),
        "t5": lambda: _hf(
            "FlaxT5ForConditionalGeneration",
            tf.T5Config(
                vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0
            ),
            "T5ForConditionalGeneration",
            input_ids=_ids(),
            decoder_input_ids=_ids((2, 5), seed=1),
        ),
        "bert": lambda: _hf(
            "FlaxBertForMaskedLM",
            tf.BertConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
            ),
            "BertForMaskedLM",
        ),
        "mlp": lambda: dict(
            model=MLP(),
            params=MLP().init(jax.random.key(0), jnp.ones((1, 12)))["params"],
            inputs={"x": jnp.asarray(np.random.default_rng(0).normal(size=(3, 12)), jnp.float32)},
        ),
    }
    return Family(name=name, **builders[name]())


FAMILIES = ("llama", "mistral", "gemma", "gpt2", "t5", "bert", "mlp")


def random_adapters(params, config, seed=0, b_scale=0.1):
    """Adapters with random A and non-zero random B (so the adapters change the output)."""
    _, adapters = lj.init_adapters(params, config, key=jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(adapters))
    return {
        p: {"a": ad["a"], "b": b_scale * jax.random.normal(k, ad["b"].shape)}
        for k, (p, ad) in zip(keys, adapters.items())
    }


def feature_token_copies(fn, *args, tokens: int, widths) -> list[int]:
    """Widths of the (features, tokens) copies or transposes (fused or not) in ``fn``'s compiled program whose
    feature size is in ``widths``: what XLA:CPU made of every adapted layer's activations when the adapter
    products kept the batch dims (``benchmarks/speed.py --sections products`` counts the same)."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    found = re.findall(rf"%\w*(?:copy|transpose)\w*(?:\.\d+)? = f32\[(\d+),{tokens}\]", hlo)
    return [int(w) for w in found if int(w) in widths]
