"""Logits only where the loss is: the output head applied at the supervised positions, optionally chunked.

A fine-tuning loss reads the log-probabilities of the answer tokens only (a tweet label is 2 tokens of
64), yet a plain forward computes ``batch x length x vocab`` logits and keeps them for the backward
pass. ``head_logprobs`` runs the model with an interceptor on its output head: the final hidden states
are gathered at the positions that predict a ``loss_mask`` token (``batch["loss_positions"]``, made on the
host by ``with_loss_positions``: a static shape, rounded up to a bucket) before the head sees them, so
the logits are ``batch x K x vocab`` with ``K`` the bucket. With ``vocab_chunk`` the head's matmul and the
log-sum-exp run over the vocabulary in chunks (recomputed in the backward pass), so no buffer as wide as
the vocabulary is kept at all: for 128k-256k vocabularies.

The losses (``full_loss_fn``, ``lora_loss_fn``) use this path when a batch holds ``loss_positions`` or a
``vocab_chunk`` is given, and equal the full-logits loss (same maths, float32 log-softmax).

Example:
    >>> mask = np.array([[0, 0, 1, 1, 0, 0, 0, 0, 0, 0.0]])
    >>> b = with_loss_positions({"input_ids": np.arange(10)[None], "loss_mask": mask})
    >>> b["loss_positions"].tolist()  # the supervised tokens, padded with -1 up to a multiple of 8
    [[2, 3, -1, -1, -1, -1, -1, -1]]
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: The name of the output head module in Hugging Face's causal LMs (Llama, Mistral, Gemma, GPT-2, T5).
HEAD = "lm_head"


def _is_seq2seq(batch) -> bool:
    return "decoder_input_ids" in batch


def with_loss_positions(batch, *, multiple: int = 8, size: int | None = None):
    """``batch`` with ``loss_positions`` added: per row, the indices of its ``loss_mask`` tokens (from
    position 1 for a causal batch, whose token 0 is never predicted), padded with -1 to ``K`` columns, ``K``
    the largest count over the rows rounded up to ``multiple`` (so few shapes compile), or ``size`` when
    given (one shape for every batch, e.g. the micro-batches of one step; raises if a row has more). Computed
    on the host.

    Example:
        >>> b = {"input_ids": np.zeros((2, 5), int), "loss_mask": np.array([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1]])}
        >>> with_loss_positions(b, multiple=2)["loss_positions"].tolist()
        [[1, 2], [3, 4]]
        >>> with_loss_positions(b, size=3)["loss_positions"].tolist()
        [[1, 2, -1], [3, 4, -1]]
    """
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if "loss_mask" not in batch:
        raise KeyError("with_loss_positions needs the batch's loss_mask (batches from lora_one_jax.data have one)")
    mask = np.asarray(batch["loss_mask"])
    if mask.ndim != 2:
        raise ValueError(f"loss_mask must be (batch, length), got shape {mask.shape}")
    scored = mask != 0
    if not _is_seq2seq(batch):
        scored[:, 0] = False  # token 0 has no prediction: the full-logits loss scores it 0 as well
    most = int(scored.sum(1).max(initial=0))
    if size is not None:
        if most > size:
            raise ValueError(f"a row has {most} loss_mask tokens, more than size={size}; raise size (or pass None)")
        k = size
    else:
        k = min(-(-max(most, 1) // multiple) * multiple, mask.shape[1])
    positions = np.full((mask.shape[0], k), -1, np.int32)
    for row, cols in enumerate(scored):
        where = np.flatnonzero(cols)
        positions[row, : len(where)] = where
    return {**batch, "loss_positions": positions}


def supervised_positions(batch):
    """``(hidden-state index, label, weight, consistent)`` at every position ``loss_positions`` lists (all
    positions without them): the final hidden state that predicts each listed token, the token, its
    ``loss_mask`` weight (0 for padding), and whether the list holds every scored token exactly once.

    Example:
        >>> b = with_loss_positions({"input_ids": jnp.array([[5, 6, 7]]), "loss_mask": jnp.array([[0, 1, 1.0]])})
        >>> index, tokens, weight, ok = supervised_positions(b)
        >>> index[0, :3].tolist(), tokens[0, :2].tolist(), weight[0, :3].tolist(), bool(ok)
        ([0, 1, 0], [6, 7], [1.0, 1.0, 0.0], True)
    """
    seq2seq = _is_seq2seq(batch)
    labels = batch["labels"] if seq2seq else batch["input_ids"]
    mask = batch["loss_mask"]
    positions = batch.get("loss_positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(labels.shape[1]), labels.shape)
    shift = 0 if seq2seq else 1  # a causal LM's token t is predicted by the hidden state at t - 1
    index = jnp.maximum(positions, 0)  # -1 pads the list
    weight = jnp.take_along_axis(mask, index, axis=1).astype(jnp.float32) * (positions >= shift)
    tokens = jnp.take_along_axis(labels, index, axis=1)
    # listed positions must hold every scored token exactly once: otherwise the loss is NaN, never quietly wrong
    scored = jnp.sum(mask.astype(jnp.float32) * (jnp.arange(mask.shape[1]) >= shift))
    consistent = jnp.abs(jnp.sum(weight) - scored) <= 1e-6 * jnp.maximum(scored, 1.0)
    return jnp.maximum(index - shift, 0), tokens, weight, consistent


def _head_weights(module: nn.Module, method: str):
    """(kernel (d, vocab), bias or None, compute dtype) of an ``nn.Dense``-like head or an ``Embed.attend``."""
    params = module.variables.get("params", {})
    if method == "attend":
        return params["embedding"].T, None, module.dtype
    if "kernel" not in params or set(params) - {"kernel", "bias"}:
        raise ValueError(
            f"vocab_chunk needs a dense output head (a 'kernel' and maybe a 'bias'); {module.name!r} holds "
            f"{sorted(params)}: use vocab_chunk=None"
        )
    return params["kernel"], params.get("bias"), module.dtype


def chunked_logprobs(
    hidden: jax.Array, kernel: jax.Array, tokens: jax.Array, chunk: int, *, bias=None, dtype=None
) -> jax.Array:
    """``log_softmax(hidden @ kernel + bias)[..., tokens]`` in float32, the vocabulary taken ``chunk`` columns
    at a time (a running log-sum-exp; each chunk's logits are recomputed in the backward pass), so no
    ``(..., vocab)`` buffer exists. ``dtype`` is the matmul's compute dtype (the head's), default promoted.

    Example:
        >>> h, w = jax.random.normal(jax.random.key(0), (3, 4)), jax.random.normal(jax.random.key(1), (4, 10))
        >>> tokens = jnp.array([0, 5, 9])
        >>> full = jnp.take_along_axis(jax.nn.log_softmax(h @ w), tokens[:, None], 1)[:, 0]
        >>> bool(jnp.allclose(chunked_logprobs(h, w, tokens, 3), full, atol=1e-5))
        True
    """
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"vocab_chunk must be a positive integer, got {chunk!r}")
    dtype = jnp.result_type(hidden, kernel) if dtype is None else dtype
    shape, width = tokens.shape, kernel.shape[1]
    chunk = min(int(chunk), width)
    h = hidden.reshape(-1, hidden.shape[-1]).astype(dtype)
    labels = tokens.reshape(-1)

    def logits(start, size):
        z = (h @ jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1).astype(dtype)).astype(jnp.float32)
        if bias is not None:
            z = z + jax.lax.dynamic_slice_in_dim(bias, start, size).astype(dtype).astype(jnp.float32)
        return z

    @jax.checkpoint
    def step(carry, i):
        top, total = carry
        start = jnp.minimum(i * chunk, width - chunk)  # the last chunk overlaps its predecessor: mask the overlap
        z = jnp.where(start + jnp.arange(chunk) >= i * chunk, logits(start, chunk), -jnp.inf)
        new_top = jax.lax.stop_gradient(jnp.maximum(top, z.max(-1)))  # any shift is exact: no gradient needed
        total = total * jnp.exp(top - new_top) + jnp.exp(z - new_top[:, None]).sum(-1)
        return (new_top, total), None

    start = (jnp.full(labels.shape, -jnp.inf), jnp.zeros(labels.shape, jnp.float32))
    (top, total), _ = jax.lax.scan(step, start, jnp.arange(-(-width // chunk)))
    picked = jnp.sum(h * jnp.take(kernel, labels, axis=1).T.astype(dtype), axis=-1).astype(jnp.float32)
    if bias is not None:
        picked = picked + jnp.take(bias, labels).astype(dtype).astype(jnp.float32)
    return (picked - top - jnp.log(total)).reshape(shape)


def _intercepted(forward: Callable[[], object], source: jax.Array, length: int, head: str, apply: Callable):
    """``forward()`` with the output head (the module named ``head``, or a tied embedding's ``attend``) given the
    final hidden states gathered at ``source`` (batch, K): ``apply(next_fun, picked, args, kwargs, context)``
    computes the head's output. Raises unless the head is called exactly once on (batch, length, d)."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        is_head = context.method_name == "__call__" and context.module.name == head
        if not (is_head or context.method_name == "attend"):
            return next_fun(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        if x.ndim != 3 or x.shape[:2] != (source.shape[0], length):
            raise ValueError(
                f"the output head {context.module.name!r} got hidden states of shape {x.shape}, not (batch, length, "
                f"d) = {(source.shape[0], length, '...')}; use the full-logits loss for this model"
            )
        calls.append(context.module.name)
        picked = jnp.take_along_axis(x, source[..., None], axis=1)  # (batch, K, d)
        return apply(next_fun, picked, args, kwargs, context)

    with nn.intercept_methods(interceptor):
        out = forward()
    if len(calls) != 1:
        raise ValueError(
            f"the model called its output head {head!r} {len(calls)} times (expected once); name its head "
            "module with head=..., or use the full-logits loss (no loss_positions, vocab_chunk=None)"
        )
    return out


def logits_at(forward: Callable[[], object], index: jax.Array, *, length: int, head: str = HEAD) -> jax.Array:
    """The logits of ``forward()`` (a model's forward on ``length`` positions) at the final hidden states
    ``index`` (batch, K) only: ``(batch, K, vocab)``, the output head never applied elsewhere (no
    ``batch x length x vocab`` buffer). Anything the model does to the head's output (soft-capping) is kept.

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, _ = load_model("toy-llama")
        >>> ids = jnp.array([[5, 6, 7, 8]])
        >>> z = logits_at(lambda: model(ids, params=params), jnp.array([[3, 1]]), length=4)
        >>> bool(jnp.allclose(z, model(ids, params=params).logits[:, jnp.array([3, 1])], atol=1e-5)), z.shape[:2]
        (True, (1, 2))
    """
    out = _intercepted(
        forward, index, length, head, lambda next_fun, picked, args, kwargs, _: next_fun(picked, *args[1:], **kwargs)
    )
    return out.logits if hasattr(out, "logits") else out


def head_logprobs(
    forward: Callable[[], object], batch, *, head: str = HEAD, vocab_chunk: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run ``forward()`` (the model's forward on ``batch``) with its output head applied only at the supervised
    positions; returns ``(logprobs, weights, consistent)``, each ``(batch, K)`` but the last: log-probabilities
    of the listed tokens (float32), their ``loss_mask`` weights (0 for padding), and whether
    ``loss_positions`` lists every scored token once (no ``loss_positions``: every position is listed).

    The head is the module named ``head`` (its ``__call__``) or a tied embedding's ``attend``. Raises if the
    model never calls it, calls it on other shapes, or (with ``vocab_chunk``) changes its output afterwards.

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, _ = load_model("toy-llama")
        >>> b = with_loss_positions({"input_ids": jnp.array([[5, 6, 7]]), "attention_mask": jnp.ones((1, 3), int),
        ...                          "position_ids": jnp.arange(3)[None], "loss_mask": jnp.array([[0, 0, 1.0]])})
        >>> lp, w, ok = head_logprobs(lambda: model(b["input_ids"], params=params), b)
        >>> full = jax.nn.log_softmax(model(b["input_ids"], params=params).logits[0, 1])[7]
        >>> bool(jnp.isclose(lp[0, 0], full, atol=1e-5)), w[0, :2].tolist(), bool(ok)
        (True, [1.0, 0.0], True)
    """
    source, tokens, weight, consistent = supervised_positions(batch)
    length = batch["loss_mask"].shape[1]
    if vocab_chunk is None:
        logits = logits_at(forward, source, length=length, head=head)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], weight, consistent
    chunked = []

    def apply(next_fun, picked, args, kwargs, context):
        kernel, bias, dtype = _head_weights(context.module, context.method_name)
        chunked.append(chunked_logprobs(picked, kernel, tokens, vocab_chunk, bias=bias, dtype=dtype)[..., None])
        return chunked[0]

    out = _intercepted(forward, source, length, head, apply)
    logits = out.logits if hasattr(out, "logits") else out
    if logits is not chunked[0]:
        raise ValueError(
            "the model transforms its head's output (e.g. soft-capping or scaling), so vocab_chunk cannot "
            "compute its log-probabilities; use vocab_chunk=None"
        )
    return logits[..., 0], weight, consistent


def supervised_loss(logprobs: jax.Array, weight: jax.Array, consistent: jax.Array, batch) -> jax.Array:
    """Mean negative log-likelihood per ``loss_mask`` token from ``head_logprobs``'s outputs (the same value as
    ``causal_lm_loss`` / ``seq2seq_loss`` on the full logits); NaN if ``loss_positions`` missed a scored token.

    Example:
        >>> b = {"input_ids": jnp.zeros((1, 3), int), "loss_mask": jnp.array([[0, 1.0, 1.0]])}
        >>> float(supervised_loss(jnp.array([[-1.0, -3.0]]), jnp.array([[1.0, 1.0]]), jnp.array(True), b))
        2.0
    """
    loss = -jnp.sum(logprobs * weight) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    return jnp.where(consistent, loss, jnp.nan)
