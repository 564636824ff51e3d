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
import numpy as np

from lora_one_jax._hf import is_hf_model
from lora_one_jax.config import LoraConfig, Target
from lora_one_jax.head import HEAD, head_logprobs, supervised_loss
from lora_one_jax.nnx import is_nnx_module, logits_of, nnx_forward, tunix_inputs
from lora_one_jax.remat import check_remat, remat_layers
from lora_one_jax.transform import with_lora


def mean_nll(nll, count):
    """The mean negative log-likelihood per token: ``sum(nll) / max(sum(count), 1)`` (0 when nothing is counted).

    ``nll`` and ``count`` are per-row sums (or any arrays of one shape); jax arrays (also under ``jax.jit``)
    give a jax scalar, numpy arrays a Python float computed in numpy's precision.

    Example:
        >>> mean_nll(np.array([2.0, 4.0]), np.array([1, 3]))
        1.5
        >>> float(mean_nll(jnp.zeros(2), jnp.zeros(2)))
        0.0
    """
    if isinstance(nll, jax.Array) or isinstance(count, jax.Array):
        return jnp.sum(nll) / jnp.maximum(jnp.sum(count), 1.0)
    return float(np.sum(nll) / max(np.sum(count), 1))


def label_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``log p(labels[..., t])`` under ``logits[..., t, :]`` (float32): an encoder-decoder's decoder logits at
    position ``t`` predict ``labels[t]``.

    Example:
        >>> [round(float(x), 4) for x in label_logprobs(jnp.zeros((1, 2, 4)), jnp.array([[1, 3]]))[0]]
        [-1.3863, -1.3863]
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


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
    return mean_nll(-token_logprobs(logits, batch["input_ids"]) * mask, mask)


def seq2seq_loss(logits: jax.Array, batch) -> jax.Array:
    """Mean negative log-likelihood of an encoder-decoder's ``labels`` per ``loss_mask`` token (the decoder
    logits at position ``t`` predict ``labels[t]``); 0 for an empty mask.

    Example:
        >>> b = {"labels": jnp.array([[1, 2]]), "loss_mask": jnp.array([[1.0, 0.0]])}
        >>> round(float(seq2seq_loss(jnp.zeros((1, 2, 4)), b)), 4)  # uniform over 4 tokens: log 4
        1.3863
    """
    mask = batch["loss_mask"]
    return mean_nll(-label_logprobs(logits, batch["labels"]) * mask, mask)


def seq2seq_sequence_logprob(logits: jax.Array, batch) -> jax.Array:
    """Per-row sum of the log-probabilities of an encoder-decoder's ``loss_mask`` labels, shape (batch,).

    Example:
        >>> b = {"labels": jnp.array([[1, 2]]), "loss_mask": jnp.array([[1.0, 1.0]])}
        >>> [round(float(x), 4) for x in seq2seq_sequence_logprob(jnp.zeros((1, 2, 4)), b)]  # 2 * log(1/4)
        [-2.7726]
    """
    return (label_logprobs(logits, batch["labels"]) * batch["loss_mask"]).sum(-1)


def is_seq2seq(batch) -> bool:
    """Whether ``batch`` is an encoder-decoder batch (``lora_one_jax.data.pad_seq2seq_batch``).

    Example:
        >>> is_seq2seq({"input_ids": 0, "decoder_input_ids": 0}), is_seq2seq({"input_ids": 0})
        (True, False)
    """
    return "decoder_input_ids" in batch


def is_encoder_decoder(model) -> bool:
    """Whether ``model`` (a Hugging Face Flax model or anything with a ``.config``) is an encoder-decoder
    (T5): its batches are ``pad_seq2seq_batch`` batches and its loss ``seq2seq_loss``.

    Example:
        >>> import types
        >>> is_encoder_decoder(types.SimpleNamespace(config=types.SimpleNamespace(is_encoder_decoder=True)))
        True
        >>> is_encoder_decoder(object())
        False
    """
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_start_id(model) -> int | None:
    """An encoder-decoder model's decoder start token (``config.decoder_start_token_id``); None for a causal LM.

    Example:
        >>> import types
        >>> decoder_start_id(types.SimpleNamespace(config=types.SimpleNamespace(
        ...     is_encoder_decoder=True, decoder_start_token_id=0)))
        0
        >>> decoder_start_id(object()) is None
        True
    """
    return model.config.decoder_start_token_id if is_encoder_decoder(model) else None


def sequence_scores(logits: jax.Array, batch) -> jax.Array:
    """Per-row summed log-probability of the ``loss_mask`` tokens of a causal or an encoder-decoder batch.

    Example:
        >>> b = {"input_ids": jnp.array([[0, 1, 2]]), "loss_mask": jnp.array([[0.0, 1.0, 1.0]])}
        >>> [round(float(x), 4) for x in sequence_scores(jnp.zeros((1, 3, 4)), b)]
        [-2.7726]
    """
    return seq2seq_sequence_logprob(logits, batch) if is_seq2seq(batch) else sequence_logprob(logits, batch)


def _logits(out) -> jax.Array:
    return out.logits if hasattr(out, "logits") else out


def model_inputs(batch) -> dict:
    """The keyword arguments of the model's forward call for ``batch`` (besides ``input_ids``).

    Example:
        >>> sorted(model_inputs({"input_ids": 0, "attention_mask": 1, "position_ids": 2, "loss_mask": 3}))
        ['attention_mask', 'position_ids']
    """
    if is_seq2seq(batch):
        keys = ("attention_mask", "decoder_input_ids", "decoder_attention_mask")
    else:
        keys = ("attention_mask", "position_ids")
    return {k: batch[k] for k in keys}


def _loss(logits, batch) -> jax.Array:
    return seq2seq_loss(logits, batch) if is_seq2seq(batch) else causal_lm_loss(logits, batch)


def _check_head_options(vocab_chunk, head: str) -> None:
    if vocab_chunk is not None and (
        isinstance(vocab_chunk, bool) or not isinstance(vocab_chunk, int) or vocab_chunk < 1
    ):
        raise ValueError(f"vocab_chunk must be a positive integer or None, got {vocab_chunk!r}")
    if not isinstance(head, str) or not head:
        raise ValueError(f"head must be the output head's module name (e.g. 'lm_head'), got {head!r}")


def _linen_only(vocab_chunk, remat: str) -> None:
    if vocab_chunk is not None or remat != "none":
        raise ValueError(
            "vocab_chunk and remat work through flax.linen interception, not yet on NNX models; "
            "use vocab_chunk=None and remat='none' with an NNX model"
        )


def _batch_loss(forward: Callable, batch, vocab_chunk, head: str, remat: str) -> jax.Array:
    """The loss of ``forward()`` on ``batch``: logits only at ``loss_positions`` / in vocabulary chunks when asked,
    layers rematerialised as ``remat`` says."""
    run = lambda: remat_layers(forward, remat)
    if "loss_positions" in batch or vocab_chunk is not None:
        return supervised_loss(*head_logprobs(run, batch, head=head, vocab_chunk=vocab_chunk), batch)
    return _loss(_logits(run()), batch)


def full_loss_fn(model, *, vocab_chunk: int | None = None, head: str = HEAD, remat: str = "none") -> Callable:
    """``loss(params, batch)``: ``causal_lm_loss`` of a causal LM (HF Flax model or linen module taking
    ``(input_ids, attention_mask=, position_ids=)``), e.g. for ``estimate_gradient``.

    A batch holding ``loss_positions`` (``with_loss_positions``) gets its output head (the module named
    ``head``) applied at those positions only; ``vocab_chunk`` also splits the head's matmul and softmax over
    the vocabulary (``lora_one_jax.head``). ``remat`` (``"none"``, ``"layers"``, ``"dots"``) recomputes the
    model's layers in the backward pass (``lora_one_jax.remat``). The value is the same.

    Example:
        >>> from lora_one_jax.models import load_model
        >>> from lora_one_jax.data import pad_batch
        >>> model, params, tok = load_model("toy-llama")
        >>> batch = pad_batch([{"input_ids": [5, 6, 7], "prompt_len": 1}], pad_id=0)
        >>> float(full_loss_fn(model)(params, batch)) > 0
        True
        >>> bool(jnp.isclose(full_loss_fn(model, vocab_chunk=100)(params, lj.with_loss_positions(batch)),
        ...                  full_loss_fn(model)(params, batch)))
        True
    """
    _check_head_options(vocab_chunk, head)
    check_remat(remat)
    if is_nnx_module(model):  # tunix call convention: model(tokens, positions, cache, attention_mask)
        _linen_only(vocab_chunk, remat)
        forward_nnx = nnx_forward(model)
        return lambda params, batch: _loss(forward_nnx(params, batch), batch)
    if is_hf_model(model):
        forward = lambda params, ids, **kw: model(ids, params=params, **kw)
    else:
        forward = lambda params, ids, **kw: model.apply({"params": params}, ids, **kw)

    def loss(params, batch):
        run = lambda: forward(params, batch["input_ids"], **model_inputs(batch))
        return _batch_loss(run, batch, vocab_chunk, head, remat)

    return loss


def lora_loss_fn(
    model,
    config: LoraConfig,
    *,
    targets: dict[str, Target] | None = None,
    vocab_chunk: int | None = None,
    head: str = HEAD,
    remat: str = "none",
) -> Callable:
    """``loss(base_params, adapters, batch, lora_rng=None)``: the same loss with the adapters added
    (``with_lora``, given ``targets`` when the caller has resolved them); differentiate it w.r.t. ``adapters``.
    ``vocab_chunk``, ``head``, ``remat`` and batches with ``loss_positions``: as ``full_loss_fn`` (the output
    head cannot be adapted then).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> from lora_one_jax.data import pad_batch
        >>> model, params, tok = load_model("toy-llama")
        >>> cfg = lj.LoraConfig(rank=2, targets=["q_proj"])
        >>> _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))  # B = 0: same loss as the base
        >>> batch = pad_batch([{"input_ids": [5, 6, 7], "prompt_len": 1}], pad_id=0)
        >>> bool(jnp.isclose(lora_loss_fn(model, cfg)(params, adapters, batch), full_loss_fn(model)(params, batch)))
        True
        >>> fast = lora_loss_fn(model, cfg, vocab_chunk=64, remat="layers")
        >>> bool(jnp.isclose(fast(params, adapters, lj.with_loss_positions(batch)), full_loss_fn(model)(params, batch)))
        True
    """
    _check_head_options(vocab_chunk, head)
    check_remat(remat)
    apply = with_lora(model, config, targets=targets)
    if is_nnx_module(model):  # (loss_positions are ignored: the full logits give the same loss)
        _linen_only(vocab_chunk, remat)
        return lambda base, adapters, batch, lora_rng=None: _loss(
            logits_of(apply(base, adapters, *tunix_inputs(batch), lora_rng=lora_rng)), batch
        )

    def loss(base, adapters, batch, lora_rng=None):
        if ("loss_positions" in batch or vocab_chunk is not None) and any(
            p == head or p.endswith("/" + head) for p in adapters
        ):
            raise ValueError(
                f"the output head {head!r} has an adapter: its logits need every position; drop loss_positions "
                "from the batch and use vocab_chunk=None"
            )

        def forward():
            return apply({"params": base}, adapters, batch["input_ids"], lora_rng=lora_rng, **model_inputs(batch))

        return _batch_loss(forward, batch, vocab_chunk, head, remat)

    return loss
