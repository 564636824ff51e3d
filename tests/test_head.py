"""Logits only where the loss is (loss_positions, vocabulary chunks) and layer rematerialisation: the same
losses and gradients as the full-logits path, on tiny Llama / Gemma / GPT-2 (tied head) / T5 models."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_one_jax as lj
from lora_one_jax.data import pad_batch, pad_seq2seq_batch
from lora_one_jax.head import chunked_logprobs
from lora_one_jax.remat import remat_layers
from tests.families import VOCAB, make_family, random_adapters

TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "t5": ["q", "wi"],
}


def rows(seed=0, n=3):
    rng = np.random.default_rng(seed)
    out = []
    for k in (11, 7, 14)[:n]:
        out.append({"input_ids": rng.integers(3, VOCAB, size=k).tolist(), "prompt_len": int(k - rng.integers(1, 4))})
    return out


def batch_for(name):
    if name == "t5":
        return pad_seq2seq_batch(rows(), pad_id=0, decoder_start_id=0)
    return pad_batch(rows(), pad_id=0)


def test_loss_positions_against_numpy():
    mask = np.array([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], np.float32)
    batch = {"input_ids": np.zeros((3, 6), np.int32), "loss_mask": mask}
    got = lj.with_loss_positions(batch, multiple=2)["loss_positions"]
    assert got.tolist() == [[2, 3, 5, -1], [5, -1, -1, -1], [-1, -1, -1, -1]]  # token 0 is never predicted
    assert lj.with_loss_positions(batch, multiple=8)["loss_positions"].shape == (3, 6)  # never longer than the row
    seq2seq = {**batch, "decoder_input_ids": batch["input_ids"], "labels": batch["input_ids"]}
    assert lj.with_loss_positions(seq2seq, multiple=1)["loss_positions"].tolist() == [[0, 2, 3, 5], [5, -1, -1, -1]] + [
        [-1] * 4
    ]
    with pytest.raises(ValueError, match="multiple must be a positive integer"):
        lj.with_loss_positions(batch, multiple=0)
    assert lj.with_loss_positions(batch, size=5)["loss_positions"][0].tolist() == [2, 3, 5, -1, -1]
    with pytest.raises(ValueError, match="more than size=2"):
        lj.with_loss_positions(batch, size=2)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 64])
def test_chunked_logprobs_and_gradients_equal_log_softmax(chunk):
    k = jax.random.split(jax.random.key(0), 4)
    h, w, bias = jax.random.normal(k[0], (2, 5, 6)), jax.random.normal(k[1], (6, 10)), jax.random.normal(k[2], (10,))
    tokens = jax.random.randint(k[3], (2, 5), 0, 10)

    def full(h, w, bias):
        logp = jax.nn.log_softmax(h @ w + bias)
        return jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]

    def chunked(h, w, bias):
        return chunked_logprobs(h, w, tokens, chunk, bias=bias)

    np.testing.assert_allclose(chunked(h, w, bias), full(h, w, bias), rtol=1e-5, atol=1e-5)
    weights = jnp.linspace(0.5, 2.0, 10).reshape(2, 5)  # a weighted sum, so every position's gradient counts
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) * weights), argnums=(0, 1, 2))(h, w, bias)
    g_chunk = jax.grad(lambda *a: jnp.sum(chunked(*a) * weights), argnums=(0, 1, 2))(h, w, bias)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


MODES = {"positions": (True, None), "chunks": (False, 16), "positions+chunks": (True, 5)}


@pytest.mark.parametrize("name", list(TARGETS))
def test_losses_and_gradients_equal_the_full_logits_path(name):
    fam = make_family(name)
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=TARGETS[name], transposed_kernels=list(fam.transposed))
    adapters = random_adapters(fam.params, config)
    batch = batch_for(name)
    lora_ref = jax.jit(jax.value_and_grad(lj.lora_loss_fn(fam.model, config), argnums=(0, 1)))
    full_ref = jax.jit(jax.value_and_grad(lj.full_loss_fn(fam.model)))
    (want, (g_base, g_ad)), (want_full, g_full) = lora_ref(fam.params, adapters, batch), full_ref(fam.params, batch)
    modes = MODES if name == "llama" else {"positions+chunks": MODES["positions+chunks"]}  # (CPU time)
    for mode, (positions, chunk) in modes.items():
        b = lj.with_loss_positions(batch, multiple=4) if positions else batch
        lora = lj.lora_loss_fn(fam.model, config, vocab_chunk=chunk)
        got, (h_base, h_ad) = jax.jit(jax.value_and_grad(lora, argnums=(0, 1)))(fam.params, adapters, b)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{name} {mode}")
        for x, y in zip(jax.tree.leaves((h_base, h_ad)), jax.tree.leaves((g_base, g_ad))):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * float(jnp.abs(y).max()) + 1e-9)
    b = lj.with_loss_positions(batch, multiple=4)  # the full fine-tuning loss (the gradient estimate's)
    got_full, h_full = jax.jit(jax.value_and_grad(lj.full_loss_fn(fam.model, vocab_chunk=5)))(fam.params, b)
    np.testing.assert_allclose(got_full, want_full, rtol=1e-5, err_msg=name)
    for x, y in zip(jax.tree.leaves(h_full), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * float(jnp.abs(y).max()) + 1e-9)


def _shapes(hlo: str) -> set[str]:
    return set(re.findall(r"f32\[([\d,]+)\]", hlo))


def test_no_full_logits_buffer_in_the_compiled_step():
    fam = make_family("llama")
    config = lj.LoraConfig(rank=2, targets=TARGETS["llama"])
    adapters = random_adapters(fam.params, config)
    batch = batch_for("llama")
    full_shape = f"{batch['input_ids'].shape[0]},{batch['input_ids'].shape[1]},{VOCAB}"

    def compiled(loss, b):
        return jax.jit(jax.grad(loss, argnums=1)).lower(fam.params, adapters, b).compile().as_text()

    assert full_shape in _shapes(compiled(lj.lora_loss_fn(fam.model, config), batch))  # today's path has it
    for chunk in (None, 16):
        shapes = _shapes(compiled(lj.lora_loss_fn(fam.model, config, vocab_chunk=chunk), lj.with_loss_positions(batch)))
        assert full_shape not in shapes, chunk
    shapes = _shapes(compiled(lj.lora_loss_fn(fam.model, config, vocab_chunk=16), batch))  # chunks, every position
    rows, length = batch["input_ids"].shape
    assert not {full_shape, f"{rows * length},{VOCAB}", f"{rows},{length - 1},{VOCAB}"} & shapes, shapes


def test_missing_positions_give_nan_and_bad_heads_raise():
    fam = make_family("llama")
    batch = lj.with_loss_positions(batch_for("llama"))
    loss = jax.jit(lj.full_loss_fn(fam.model))  # jitted: eager dispatch took ~2 minutes
    assert np.isfinite(loss(fam.params, batch))
    stale = {**batch, "loss_positions": batch["loss_positions"][:, :1]}  # drops scored tokens: never quietly wrong
    assert np.isnan(loss(fam.params, stale))
    with pytest.raises(ValueError, match="called its output head 'nope' 0 times"):
        jax.jit(lj.full_loss_fn(fam.model, head="nope"))(fam.params, batch)
    config = lj.LoraConfig(rank=2, targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="output head 'lm_head' has an adapter"):
        jax.jit(lj.lora_loss_fn(fam.model, config))(fam.params, random_adapters(fam.params, config), batch)
    with pytest.raises(ValueError, match="vocab_chunk must be a positive integer"):
        lj.full_loss_fn(fam.model, vocab_chunk=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_remat_gives_the_same_loss_and_gradients(name):
    fam = make_family(name)
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=TARGETS[name], transposed_kernels=list(fam.transposed))
    adapters = random_adapters(fam.params, config)
    batch = lj.with_loss_positions(batch_for(name))
    want, g_want = jax.jit(jax.value_and_grad(lj.lora_loss_fn(fam.model, config), argnums=1))(
        fam.params, adapters, batch
    )
    for remat in ("layers", "dots"):
        step = jax.value_and_grad(lj.lora_loss_fn(fam.model, config, remat=remat), argnums=1)
        jaxpr = jax.make_jaxpr(step)(fam.params, adapters, batch).pretty_print()
        assert len(re.findall(r"\bremat\w*\[", jaxpr)) == 2, "not one rematerialised region per layer (2 layers)"
        got, g_got = jax.jit(step)(fam.params, adapters, batch)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for x, y in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_remat_needs_layers():
    fam = make_family("mlp")
    with pytest.raises(ValueError, match="found no layer"):
        remat_layers(lambda: fam.model.apply({"params": fam.params}, **fam.inputs), "layers")
    with pytest.raises(ValueError, match="remat must be one of"):
        lj.full_loss_fn(fam.model, remat="all")
