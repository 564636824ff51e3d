"""The causal-LM fine-tuning loss, on the batches ``lora_one_jax.data.batches`` makes.

A batch is a dict of ``(batch, length)`` arrays: ``input_ids``, ``attention_mask``, ``position_ids``
and ``loss_mask`` (1 on the tokens the model must predict: the answer and eos). Token ``t`` is
predicted from the logits at ``t - 1``. ``causal_lm_loss`` is the mean negative log-likelihood per
``loss_mask`` token (the official LoRA-One / Hugging Face loss with prompt labels ``-100``);
``full_loss_fn`` and ``lora_loss_fn`` build it for a model, without and with adapters; for an
encoder-decoder batch (``pad_seq2seq_batch``: T5) they use ``seq2seq_loss`` instead.

Example:
    >>> b = {"input_ids": jnp.array([[0, 1, 2]]), "loss_mask": jnp.array([[0.0, 1.0, 1.0]])}
    >>> round(float(causal_lm_loss(jnp.zeros((1, 3, 4)), b)), 4)  # uniform over 4 tokens: log 4
    1.3863
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lora_one_jax._hf import is_hf_model
from lora_one_jax.config import LoraConfig
from lora_one_jax.nnx import is_nnx_module, logits_of, nnx_forward, tunix_inputs
from lora_one_jax.transform import with_lora


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``log p(input_ids[:, t] | input_ids[:, :t])`` for ``t >= 1`` (float32); 0 at ``t = 0``.

    Example:
        >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens
        >>> [[round(float(x), 4) for x in row] for row in token_logprobs(logits, jnp.array([[0, 1, 2]]))]
        [[0.0, -1.3863, -1.3863]]
    """
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    out = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.pad(out, ((0, 0), (1, 0)))


def sequence_logprob(logits: jax.Array, batch) -> jax.Array:
    """Per-row sum of log-probabilities of the ``loss_mask`` tokens, shape (batch,).

    Example:
        >>> b = {"input_ids": jnp.array([[0, 1, 2]]), "loss_mask": jnp.array([[0.0, 1.0, 1.0]])}
        >>> [round(float(x), 4) for x in sequence_logprob(jnp.zeros((1, 3, 4)), b)]  # 2 * log(1/4)
        [-2.7726]
    """
    return (token_logprobs(logits, batch["input_ids"]) * batch["loss_mask"]).sum(-1)


def causal_lm_loss(logits: jax.Array, batch) -> jax.Array:
    """Mean negative log-likelihood per ``loss_mask`` token (the fine-tuning loss); 0 for an empty mask.

    Example:
        >>> b = {"input_ids": jnp.array([[0, 1, 2]]), "loss_mask": jnp.array([[0.0, 0.0, 1.0]])}
        >>> round(float(causal_lm_loss(jnp.zeros((1, 3, 4)), b)), 4)
        1.3863
    """
    mask = batch["loss_mask"]
    return -(token_logprobs(logits, batch["input_ids"]) * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def seq2seq_loss(logits: jax.Array, batch) -> jax.Array:
    """Mean negative log-likelihood of an encoder-decoder's ``labels`` per ``loss_mask`` token (the decoder
    logits at position ``t`` predict ``labels[t]``); 0 for an empty mask.

    Example:
        >>> b = {"labels": jnp.array([[1, 2]]), "loss_mask": jnp.array([[1.0, 0.0]])}
        >>> round(float(seq2seq_loss(jnp.zeros((1, 2, 4)), b)), 4)  # uniform over 4 tokens: log 4
        1.3863
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    return -(picked * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def is_seq2seq(batch) -> bool:
    """Whether ``batch`` is an encoder-decoder batch (``lora_one_jax.data.pad_seq2seq_batch``)."""
    return "decoder_input_ids" in batch


def _logits(out) -> jax.Array:
    return out.logits if hasattr(out, "logits") else out


def _model_inputs(batch) -> dict:
    if is_seq2seq(batch):
        keys = ("attention_mask", "decoder_input_ids", "decoder_attention_mask")
    else:
        keys = ("attention_mask", "position_ids")
    return {k: batch[k] for k in keys}


def _loss(logits, batch) -> jax.Array:
    return seq2seq_loss(logits, batch) if is_seq2seq(batch) else causal_lm_loss(logits, batch)


def full_loss_fn(model) -> Callable:
    """``loss(params, batch)``: ``causal_lm_loss`` of a causal LM (HF Flax model or linen module taking
    ``(input_ids, attention_mask=, position_ids=)``), e.g. for ``estimate_gradient``.

    Example:
        >>> from lora_one_jax.models import load_model
        >>> from lora_one_jax.data import pad_batch
        >>> model, params, tok = load_model("toy-llama")
        >>> batch = pad_batch([{"input_ids": [5, 6, 7], "prompt_len": 1}], pad_id=0)
        >>> float(full_loss_fn(model)(params, batch)) > 0
        True
    """
    if is_nnx_module(model):  # tunix call convention: model(tokens, positions, cache, attention_mask)
        forward_nnx = nnx_forward(model)
        return lambda params, batch: _loss(forward_nnx(params, batch), batch)
    if is_hf_model(model):
        forward = lambda params, ids, **kw: model(ids, params=params, **kw)
    else:
        forward = lambda params, ids, **kw: model.apply({"params": params}, ids, **kw)

    def loss(params, batch):
        return _loss(_logits(forward(params, batch["input_ids"], **_model_inputs(batch))), batch)

    return loss


def lora_loss_fn(model, config: LoraConfig) -> Callable:
    """``loss(base_params, adapters, batch, lora_rng=None)``: the same loss with the adapters added
    (``with_lora``); differentiate it w.r.t. ``adapters`` (argument 1).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> from lora_one_jax.data import pad_batch
        >>> model, params, tok = load_model("toy-llama")
        >>> cfg = lj.LoraConfig(rank=2, targets=["q_proj"])
        >>> _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))  # B = 0: same loss as the base
        >>> batch = pad_batch([{"input_ids": [5, 6, 7], "prompt_len": 1}], pad_id=0)
        >>> bool(jnp.isclose(lora_loss_fn(model, cfg)(params, adapters, batch), full_loss_fn(model)(params, batch)))
        True
    """
    apply = with_lora(model, config)
    if is_nnx_module(model):
        return lambda base, adapters, batch, lora_rng=None: _loss(
            logits_of(apply(base, adapters, *tunix_inputs(batch), lora_rng=lora_rng)), batch
        )

    def loss(base, adapters, batch, lora_rng=None):
        out = apply({"params": base}, adapters, batch["input_ids"], lora_rng=lora_rng, **_model_inputs(batch))
        return _loss(_logits(out), batch)

    return loss
