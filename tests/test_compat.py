"""The fixes in lora_one_jax.models.compat, each checked against a model that is known to be right."""

import ast
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import lora_one_jax
from lora_one_jax.models import patch_transformers
from tests.families import DECODER_SIZES, build_hf, tiny_llama_config

patch_transformers()  # these tests build HF Flax models (and their modules) with transformers directly

SIZES = {**DECODER_SIZES, "rope_theta": 50000.0}
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)


def test_mistral_without_sliding_window_equals_llama():
    """Mistral and Llama share one architecture: same weights must give the same logits."""
    llama = build_hf("FlaxLlamaForCausalLM", tiny_llama_config(rope_theta=50000.0), seed=0)
    mistral = build_hf("FlaxMistralForCausalLM", tf.MistralConfig(**SIZES, sliding_window=None), seed=1)
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
    model = build_hf(
        "FlaxT5ForConditionalGeneration",
        tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
        seed=0,
    )
    out = model(IDS, decoder_input_ids=IDS[:, :3]).logits
    assert out.shape == (2, 3, 64) and bool(jnp.isfinite(out).all())


def test_imports_and_the_core_patch_nothing_the_loaders_do():
    """No side effects: importing the library (after transformers) and running the core on an HF model leave
    transformers as it is; a loader applies the fixes, once (a second call replaces nothing)."""
    code = """
import jax, jax.numpy as jnp, transformers
from transformers.models.llama import modeling_flax_llama as mfl
from transformers.models.t5 import modeling_flax_t5 as mt5
original = (mfl.FlaxLlamaRotaryEmbedding.setup, mt5.jnp)
import lora_one_jax as lj, lora_one_jax.models, lora_one_jax.eval
model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16,
    intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16), seed=0)
cfg = lj.LoraConfig(rank=2, targets=["q_proj"])
_, adapters = lj.init_adapters(model.params, cfg, key=jax.random.key(0))
lj.with_lora(model, cfg)({"params": model.params}, adapters, jnp.ones((1, 4), "int32"))
loss = lambda p, b: model(b, params=p).logits.mean()
lj.estimate_gradient(loss, model.params, [jnp.ones((1, 4), "int32")], cfg, progress=False)
untouched = (mfl.FlaxLlamaRotaryEmbedding.setup, mt5.jnp) == original
lora_one_jax.models.load_model("toy-llama")
patched = (mfl.FlaxLlamaRotaryEmbedding.setup, mt5.jnp)
lora_one_jax.models.patch_transformers()
print(untouched, patched != original, (mfl.FlaxLlamaRotaryEmbedding.setup, mt5.jnp) == patched)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr[-2000:]


def test_no_global_statements_in_the_library():
    root = pathlib.Path(lora_one_jax.__file__).parent
    found = [
        f"{path.relative_to(root)}:{node.lineno}"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Global, ast.Nonlocal))
    ]
    assert found == []
