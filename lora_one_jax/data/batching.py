"""Prompt/answer examples -> fixed-shape numpy batches for causal language models.

Each example becomes ``prompt_ids + answer_ids + [eos]`` (tokenized separately, so the prompt /
answer boundary is exact). A batch is a dict of numpy arrays, all of shape ``(batch, length)``:

* ``input_ids`` (int32), right-padded with the tokenizer's pad id;
* ``attention_mask`` (int32): 1 on real tokens;
* ``loss_mask`` (float32): 1 on the tokens the model must predict, i.e. the answer and eos;
  0 on the prompt and on padding. Token ``t`` is predicted from the logits at ``t - 1``
  (``lora_one_jax.causal_lm_loss`` does the shift);
* ``position_ids`` (int32): ``0, 1, 2, ...`` on real tokens (padding repeats the last position).

``length`` is the smallest of a few bucket lengths (powers of two up to ``max_len``) that fits the
longest example, and the last batch is filled with empty rows, so ``jax.jit`` compiles a handful of
shapes, not one per batch. Examples longer than ``max_len`` are truncated (the prompt is cut from
the left so the answer survives; an answer that alone fills ``max_len`` keeps its beginning and loses its
eos) and a ``TruncationWarning`` says how many of each.

Example:
    >>> from lora_one_jax.models.tokenizer import toy_tokenizer
    >>> tok = toy_tokenizer()
    >>> batch = pad_batch([encode(tok, "2+2=", " 4")], pad_id=tok.pad_token_id, buckets=(8,))
    >>> tok.convert_ids_to_tokens(batch["input_ids"][0])
    ['2', '+', '2', '=', 'Ġ', '4', '<|im_end|>', '<|im_end|>']
    >>> batch["loss_mask"].tolist(), batch["attention_mask"].tolist()
    ([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]], [[1, 1, 1, 1, 1, 1, 1, 0]])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import datasets
import numpy as np


class TruncationWarning(UserWarning):
    """Some examples were longer than ``max_len`` and were truncated."""


def bucket_lengths(max_len: int, *, min_len: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_len`` below ``max_len``, then ``max_len`` itself.

    Example:
        >>> bucket_lengths(200)
        (16, 32, 64, 128, 200)
    """
    if max_len < 2:
        raise ValueError(f"max_len={max_len} must be at least 2")
    out, n = [], min_len
    while n < max_len:
        out.append(n)
        n *= 2
    return tuple(out) + (max_len,)


def encode(tokenizer, prompt: str, answer: str, *, add_eos: bool = True) -> dict:
    """``{"input_ids": prompt_ids + answer_ids (+ eos), "prompt_len": len(prompt_ids)}`` (no bos added).

    Example:
        >>> from lora_one_jax.models.tokenizer import toy_tokenizer
        >>> tok = toy_tokenizer()
        >>> row = encode(tok, "Q:", " A")
        >>> tok.convert_ids_to_tokens(row["input_ids"]), row["prompt_len"]
        (['Q', ':', 'Ġ', 'A', '<|im_end|>'], 2)
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if add_eos:
        a = a + [_eos_id(tokenizer)]
    return {"input_ids": p + a, "prompt_len": len(p)}


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token or pass add_eos=False")
    return tokenizer.eos_token_id


def pad_id_of(tokenizer) -> int:
    """The id used for padding: pad, else eos, else 0.

    Example:
        >>> from lora_one_jax.models.tokenizer import toy_tokenizer
        >>> pad_id_of(toy_tokenizer())
        2
    """
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def truncate(ids: Sequence[int], prompt_len: int, max_len: int) -> tuple[list[int], int]:
    """Fit ``ids`` into ``max_len``: cut the prompt from the left; if the answer alone is too long,
    keep the last prompt token and the answer's beginning.

    Example:
        >>> truncate([1, 2, 3, 4, 5, 6], 4, 4)  # prompt 1..4, answer 5 6
        ([3, 4, 5, 6], 2)
        >>> truncate([1, 2, 3, 4, 5, 6], 2, 3)
        ([2, 3, 4], 1)
    """
    ids = list(ids)
    if len(ids) <= max_len:
        return ids, prompt_len
    prompt, answer = ids[:prompt_len], ids[prompt_len:]
    if len(answer) >= max_len:
        keep = prompt[-1:]
        return keep + answer[: max_len - len(keep)], len(keep)
    keep = prompt[len(prompt) - (max_len - len(answer)) :]
    return keep + answer, len(keep)


def tokenize(
    ds: datasets.Dataset, tokenizer, *, max_len: int = 512, add_eos: bool = True, answer_column: str = "answer"
) -> datasets.Dataset:
    """Add ``input_ids`` and ``prompt_len`` columns (prompt + answer (+ eos), truncated to ``max_len``).

    Warns once (``TruncationWarning``) with the number of truncated examples.

    Example:
        >>> from lora_one_jax.models.tokenizer import toy_tokenizer
        >>> ds = datasets.Dataset.from_list([{"prompt": "Q:", "answer": " yes"}])
        >>> tokenize(ds, toy_tokenizer())[0]["prompt_len"]
        2
    """
    eos = [_eos_id(tokenizer)] if add_eos else []

    def fn(batch):
        prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
        answers = tokenizer(batch[answer_column], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "prompt_len": [], "truncated": [], "answer_cut": [], "length": []}
        for p, a in zip(prompts, answers):
            ids, n = truncate(p + a + eos, len(p), max_len)
            out["input_ids"].append(ids)
            out["prompt_len"].append(n)
            out["length"].append(len(p) + len(a) + len(eos))
            out["truncated"].append(len(p) + len(a) + len(eos) > max_len)
            out["answer_cut"].append(out["truncated"][-1] and len(a) + len(eos) >= max_len)
        return out

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        out = ds.map(fn, batched=True, batch_size=256)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    n = int(np.sum(out["truncated"]))
    if n:
        warnings.warn(
            truncation_message(n, int(np.sum(out["answer_cut"])), len(out), max_len, max(out["length"]), add_eos),
            TruncationWarning,
            stacklevel=2,
        )
    return out.remove_columns(["truncated", "answer_cut", "length"])


def truncation_message(n: int, answers_cut: int, total: int, max_len: int, longest: int, add_eos: bool = True) -> str:
    """What ``tokenize`` did to the ``n`` of ``total`` examples longer than ``max_len`` (see ``truncate``).

    Example:
        >>> import textwrap
        >>> print(textwrap.fill(truncation_message(3, 1, 10, 16, 40), 100))
        3 of 10 examples were longer than max_len=16 tokens (the longest has 40): 2 lost the start of their
        prompt (answer whole); 1 had an answer (+ eos) of 16 tokens or more: each keeps the last prompt
        token and the answer's first 15 tokens, and loses its end-of-sequence token (the model is not taught
        to stop there); raise max_len to keep them whole
    """
    parts = []
    if n - answers_cut:
        parts.append(f"{n - answers_cut} lost the start of their prompt (answer whole)")
    if answers_cut:
        end = ", and loses its end-of-sequence token (the model is not taught to stop there)" if add_eos else ""
        parts.append(
            f"{answers_cut} had an answer{' (+ eos)' if add_eos else ''} of {max_len} tokens or more: each keeps the "
            f"last prompt token and the answer's first {max_len - 1} tokens{end}"
        )
    return (
        f"{n} of {total} examples were longer than max_len={max_len} tokens (the longest has {longest}): "
        f"{'; '.join(parts)}; raise max_len to keep them whole"
    )


def _bucket(length: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"a sequence of {length} tokens does not fit the largest bucket {max(buckets)}; truncate first")


def pad_batch(
    rows: Sequence[dict], *, pad_id: int, buckets: Sequence[int] | None = None, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """Right-pad tokenized rows (``input_ids`` + ``prompt_len``) into one fixed-shape batch.

    The length is the smallest bucket that fits (``buckets=None``: the longest row); ``batch_size``
    adds empty rows (all masks 0).

    Example:
        >>> b = pad_batch([{"input_ids": [5, 6, 7], "prompt_len": 1}], pad_id=0, buckets=(4,), batch_size=2)
        >>> b["attention_mask"].tolist(), b["loss_mask"].tolist(), b["position_ids"].tolist()
        ([[1, 1, 1, 0], [0, 0, 0, 0]], [[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], [[0, 1, 2, 2], [0, 0, 0, 0]])
    """
    if not rows:
        raise ValueError("pad_batch needs at least one row")
    longest = max(len(r["input_ids"]) for r in rows)
    length = _bucket(longest, buckets) if buckets else longest
    n = batch_size or len(rows)
    if n < len(rows):
        raise ValueError(f"batch_size={batch_size} is smaller than the {len(rows)} rows given")
    ids = np.full((n, length), pad_id, np.int32)
    attention = np.zeros((n, length), np.int32)
    loss = np.zeros((n, length), np.float32)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = r["input_ids"]
        attention[i, :k] = 1
        loss[i, r["prompt_len"] : k] = 1.0
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, "position_ids": positions}


def pad_seq2seq_batch(
    rows: Sequence[dict],
    *,
    pad_id: int,
    decoder_start_id: int,
    buckets: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Encoder-decoder rows (``input_ids`` = prompt + answer + eos, ``prompt_len``, as ``tokenize`` makes
    them) as one batch for a seq2seq model (T5): the prompt is the encoder's input, the answer (+ eos) the
    decoder's target.

    ``input_ids`` / ``attention_mask`` (encoder), ``decoder_input_ids`` (the start token, then the target
    shifted right), ``decoder_attention_mask``, ``labels`` (the target) and ``loss_mask`` (1 on the target).
    Encoder and decoder lengths are bucketed separately.

    Example:
        >>> b = pad_seq2seq_batch([{"input_ids": [5, 6, 7, 8], "prompt_len": 2}], pad_id=0, decoder_start_id=0)
        >>> b["input_ids"].tolist(), b["decoder_input_ids"].tolist(), b["labels"].tolist()
        ([[5, 6]], [[0, 7]], [[7, 8]])
    """
    if not rows:
        raise ValueError("pad_seq2seq_batch needs at least one row")
    prompts = [list(r["input_ids"][: r["prompt_len"]]) or [pad_id] for r in rows]
    targets = [list(r["input_ids"][r["prompt_len"] :]) for r in rows]
    enc_len = max(len(p) for p in prompts)
    dec_len = max(max(len(t) for t in targets), 1)
    if buckets:
        enc_len, dec_len = _bucket(enc_len, buckets), _bucket(dec_len, buckets)
    n = batch_size or len(rows)
    if n < len(rows):
        raise ValueError(f"batch_size={batch_size} is smaller than the {len(rows)} rows given")
    out = {
        "input_ids": np.full((n, enc_len), pad_id, np.int32),
        "attention_mask": np.zeros((n, enc_len), np.int32),
        "decoder_input_ids": np.full((n, dec_len), pad_id, np.int32),
        "decoder_attention_mask": np.zeros((n, dec_len), np.int32),
        "labels": np.full((n, dec_len), pad_id, np.int32),
        "loss_mask": np.zeros((n, dec_len), np.float32),
    }
    for i, (p, t) in enumerate(zip(prompts, targets)):
        out["input_ids"][i, : len(p)], out["attention_mask"][i, : len(p)] = p, 1
        shifted = [decoder_start_id] + t[:-1]
        out["decoder_input_ids"][i, : len(shifted)] = shifted
        out["decoder_attention_mask"][i, : max(len(t), 1)] = 1
        out["labels"][i, : len(t)], out["loss_mask"][i, : len(t)] = t, 1.0
    out["decoder_attention_mask"][len(rows) :, 0] = 1  # filler rows attend to their start token
    return out


def batches(
    ds: datasets.Dataset,
    tokenizer,
    batch_size: int,
    *,
    max_len: int = 512,
    buckets: Sequence[int] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epochs: int | None = 1,
    drop_remainder: bool = False,
    add_eos: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape training/eval batches of a prompt/answer ``Dataset`` (see module doc).

    ``buckets`` defaults to ``bucket_lengths(max_len)``; ``shuffle`` reshuffles every epoch
    (``seed + epoch``); ``epochs=None`` repeats forever; the last partial batch is padded with empty
    rows unless ``drop_remainder``.

    Example:
        >>> from lora_one_jax.models.tokenizer import toy_tokenizer
        >>> ds = datasets.Dataset.from_list([{"prompt": "Q: 1+1", "answer": " 2"}] * 3)
        >>> [b["input_ids"].shape for b in batches(ds, toy_tokenizer(), 2, max_len=64)]
        [(2, 16), (2, 16)]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not len(ds):
        raise ValueError("the dataset is empty: there is nothing to batch (check the task's split and any filtering)")
    if drop_remainder and len(ds) < batch_size:
        raise ValueError(
            f"drop_remainder=True with {len(ds)} examples and batch_size={batch_size} gives no batch; "
            "lower batch_size or set drop_remainder=False"
        )
    buckets = tuple(buckets) if buckets is not None else bucket_lengths(max_len)
    if max(buckets) > max_len:
        raise ValueError(f"buckets {buckets} exceed max_len={max_len}")
    data = tokenize(ds, tokenizer, max_len=max_len, add_eos=add_eos)
    rows = [{"input_ids": i, "prompt_len": n} for i, n in zip(data["input_ids"], data["prompt_len"])]
    return _stream(rows, pad_id_of(tokenizer), batch_size, buckets, shuffle, seed, epochs, drop_remainder)


def _stream(rows, pad, batch_size, buckets, shuffle, seed, epochs, drop_remainder):
    epoch = 0
    while epochs is None or epoch < epochs:
        order = np.random.default_rng(seed + epoch).permutation(len(rows)) if shuffle else np.arange(len(rows))
        stop = len(order) - (len(order) % batch_size if drop_remainder else 0)
        for start in range(0, stop, batch_size):
            chunk = [rows[i] for i in order[start : start + batch_size]]
            yield pad_batch(chunk, pad_id=pad, buckets=buckets, batch_size=batch_size)
        epoch += 1
