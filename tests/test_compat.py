"""The fixes in lora_one_jax.models.compat, each checked against a model that is known to be right."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import lora_one_jax.models  # noqa: F401  (applies the HF compat fixes)

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=50000.0,
)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)


def test_mistral_without_sliding_window_equals_llama():
    """Mistral and Llama share one architecture: same weights must give the same logits."""
    llama = tf.FlaxLlamaForCausalLM(tf.LlamaConfig(**SIZES), seed=0)
    mistral = tf.FlaxMistralForCausalLM(tf.MistralConfig(**SIZES, sliding_window=None), seed=1)
    np.testing.assert_allclose(mistral(IDS, params=llama.params).logits, llama(IDS).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["Llama", "Mistral", "Gemma"])
def test_rotary_table_uses_rope_theta(family):
    """sin/cos of position p at frequency i must be those of p * theta ** (-2i / head_dim)."""
    extra = {"head_dim": 8} if family == "Gemma" else {}
    config = getattr(tf, f"{family}Config")(**SIZES, **extra)
    module = getattr(tf.models, family.lower())
    rotary = getattr(getattr(module, f"modeling_flax_{family.lower()}"), f"Flax{family}RotaryEmbedding")(config)
    table = np.asarray(rotary.bind({}).sincos)  # (positions, 1, 2 * head_dim): sin | cos
    head_dim = 8
    angles = np.arange(64)[:, None] * 50000.0 ** (-np.arange(0, head_dim, 2) / head_dim)[None, :]
    np.testing.assert_allclose(table[:, 0, : head_dim // 2], np.sin(angles), atol=1e-5)
    np.testing.assert_allclose(table[:, 0, head_dim : head_dim + head_dim // 2], np.cos(angles), atol=1e-5)


def test_t5_runs_on_current_jax():
    model = tf.FlaxT5ForConditionalGeneration(
        tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4), seed=0
    )
    out = model(IDS, decoder_input_ids=IDS[:, :3]).logits
    assert out.shape == (2, 3, 64) and bool(jnp.isfinite(out).all())
