"""Held-out evaluation of a causal LM (optionally with LoRA adapters), batched and jitted.

How each kind of example (see ``lora_one_jax.data``) is scored:

* ``"choice"``: the summed log-likelihood of every candidate continuation given the prompt; the
  prediction is the most likely candidate (ties: the first); metric = accuracy (``length_normalize``:
  per-byte log-likelihood, lm-eval's ``acc_norm``). When every
  candidate is a single token (BoolQ, sentiment, news, MMLU letters) one forward pass of the prompt
  scores all candidates at once.
* ``"number"``: greedy generation of ``max_new_tokens`` tokens (jitted, fixed shapes, KV cache);
  correct when the numbers in the first line of the generation start with the gold answer's numbers
  (``9`` for ``"9 apples"``; commas in thousands ignored, ``2.50 == 2.5``); metric = exact match.
* ``"text"``: mean negative log-likelihood per answer token (answer + eos); lower is better.

Shapes are fixed (bucketed lengths, padded last batch), so ``jax.jit`` compiles a handful of
programs; an ``Evaluator`` keeps them for repeated evaluation of one model (no global cache).

Example:
    >>> from lora_one_jax.models import load_model
    >>> import datasets
    >>> model, params, tok = load_model("toy-llama")
    >>> ds = datasets.Dataset.from_list([{"prompt": "Is 2 even?", "answer": " yes", "choices": [" no", " yes"],
    ...                                   "label": 1, "kind": "choice"}] * 4)
    >>> result = evaluate(model, params, None, ds, tokenizer=tok, progress=False)
    >>> result.total, result.metric
    (4, 'accuracy')
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from lora_one_jax.config import LoraConfig, Target
from lora_one_jax.data.batching import bucket_lengths, pad_batch, pad_id_of, pad_seq2seq_batch, truncate
from lora_one_jax.head import HEAD, head_logprobs, logits_at, supervised_positions, with_loss_positions
from lora_one_jax.losses import (
    decoder_start_id,
    is_encoder_decoder,
    mean_nll,
    model_inputs,
    sequence_logprob,
    sequence_scores,
)
from lora_one_jax.nnx import cached_inputs, init_cache, is_nnx_module, nnx_call, tunix_inputs
from lora_one_jax.progress import progress_bar
from lora_one_jax.sharding import to_numpy
from lora_one_jax.transform import with_lora


@dataclasses.dataclass
class EvalResult:
    """A metric with its count; prints like ``0.412 (412/1000)``.

    Example:
        >>> print(EvalResult("accuracy", 0.412, 412, 1000))
        0.412 (412/1000)
        >>> print(EvalResult("nll", 1.25, None, 164))
        1.250 nats/token (164 examples)
    """

    metric: str  # "accuracy" | "accuracy_norm" | "exact_match" | "nll"
    value: float
    correct: int | None
    total: int
    seconds: float = 0.0
    predictions: list = dataclasses.field(default_factory=list, repr=False)
    answer_loss: float | None = None  # mean NLL per gold answer token (answer + eos), when asked for

    def __str__(self) -> str:
        if self.correct is None:
            return f"{self.value:.3f} nats/token ({self.total} examples)"
        return f"{self.value:.3f} ({self.correct}/{self.total})"


# ----------------------------------------------------------------------------- jitted programs


def _forward(model, config: LoraConfig | None, with_adapters: bool, targets: dict[str, Target] | None) -> Callable:
    """``f(params, adapters, input_ids, **kwargs)`` -> model output, through ``with_lora`` when needed."""
    if is_nnx_module(model):  # tunix's call convention; the output is wrapped to read like HF's
        return _forward_nnx(model, config, with_adapters, targets)
    if not with_adapters:
        return lambda params, adapters, ids, **kw: model(ids, params=params, **kw)
    apply = with_lora(model, config, targets=targets)
    return lambda params, adapters, ids, **kw: apply({"params": params}, adapters, ids, **kw)


def _forward_nnx(model, config, with_adapters: bool, targets) -> Callable:
    """``_forward`` for an NNX causal LM (tunix's call convention), read like a HF model: ``input_ids`` with
    ``attention_mask`` / ``position_ids`` keywords; with ``past_key_values`` (a tunix KV cache, ``init_cache``) the
    tokens are appended to the cache (``attention_mask`` then spans the whole cache) and the output carries the
    updated cache as ``past_key_values``."""
    apply = with_lora(model, config, targets=targets) if with_adapters else None
    call = nnx_call(model)

    def forward(params, adapters, ids, past_key_values=None, **kw):
        if past_key_values is None:
            args = tunix_inputs({"input_ids": ids, **kw})
        else:
            args = cached_inputs(ids, kw["attention_mask"], kw["position_ids"], past_key_values)
        out = apply(params, adapters, *args) if apply else call(params, *args)
        logits, cache = out if isinstance(out, tuple) else (out, None)
        return SimpleNamespace(logits=logits, past_key_values=cache)

    return forward


def _empty_cache(model, params, batch: int, size: int):
    """A zero KV cache of ``size`` slots: tunix's layout for NNX models, ``model.init_cache``'s for HF Flax ones."""
    if is_nnx_module(model):
        return init_cache(model, params, batch, size)
    shapes = jax.eval_shape(lambda: model.init_cache(batch, size))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _sequence_scores(forward, model):
    """Per row: the summed log-probability of the ``loss_mask`` tokens and their count (causal LM or, for a
    ``pad_seq2seq_batch`` batch, encoder-decoder). A batch with ``loss_positions`` gets its logits there only
    (``head_logprobs``); NaN if they miss a scored token."""

    def run(params, adapters, batch):
        call = lambda: forward(params, adapters, batch["input_ids"], **model_inputs(batch))
        if "loss_positions" in batch:
            logprobs, weight, consistent = head_logprobs(call, batch)
            scores = jnp.where(consistent, jnp.sum(logprobs * weight, axis=-1), jnp.nan)
        else:
            scores = sequence_scores(call().logits, batch)
        return scores, batch["loss_mask"].sum(-1)

    return run


def _next_token_scores(forward, model):
    """Log-probabilities of single-token candidates after position ``score_at`` of each row, and (for rows that
    continue with the gold answer) the summed log-probability of the ``loss_mask`` tokens: one forward pass
    gives the choice scores and the held-out answer loss. A batch with ``loss_positions`` gets its logits at
    ``score_at`` and those positions only (``logits_at``)."""

    def run(params, adapters, batch, candidates, score_at):
        call = lambda: forward(params, adapters, batch["input_ids"], **model_inputs(batch))
        if "loss_positions" in batch:
            source, tokens, weight, consistent = supervised_positions(batch)
            index = jnp.concatenate([score_at[:, None], source], axis=1)
            logp = jax.nn.log_softmax(logits_at(call, index, length=batch["input_ids"].shape[1]).astype(jnp.float32))
            answer = jnp.take_along_axis(logp[:, 1:], tokens[..., None], axis=-1)[..., 0]
            answer = jnp.where(consistent, jnp.sum(answer * weight, axis=-1), jnp.nan)
            logp = logp[:, 0]
        else:
            logits = call().logits
            answer = sequence_logprob(logits, batch)
            at = jnp.take_along_axis(logits, score_at[:, None, None], axis=1)[:, 0]
            logp = jax.nn.log_softmax(at.astype(jnp.float32), axis=-1)
        scores = jnp.take_along_axis(logp, jnp.maximum(candidates, 0), axis=-1)
        return scores, answer, batch["loss_mask"].sum(-1)

    return run


def _greedy(forward, model, max_new_tokens):
    """Greedy decoding with a KV cache of ``length + max_new_tokens`` slots (HF Flax's ``init_cache``, or tunix's
    layout for NNX models): the left-padded prompt fills it in one call, then ``lax.scan`` appends one token a step."""

    def run(params, adapters, input_ids, attention_mask):
        batch, length = input_ids.shape
        cache = _empty_cache(model, params, batch, length + max_new_tokens)
        mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), attention_mask.dtype)], axis=1)
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        out = forward(params, adapters, input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        first = out.logits[:, -1].argmax(-1)

        def step(carry, _):
            token, cache, pos = carry
            out = forward(
                params, adapters, token[:, None], attention_mask=mask, position_ids=pos[:, None], past_key_values=cache
            )
            nxt = out.logits[:, -1].argmax(-1)
            return (nxt, out.past_key_values, pos + 1), nxt

        _, rest = jax.lax.scan(
            step, (first, out.past_key_values, positions[:, -1] + 1), None, length=max_new_tokens - 1
        )
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return run


_BUILDERS = {"sequence": _sequence_scores, "next_token": _next_token_scores, "greedy": _greedy}


def _longest_first(lengths: Sequence[int], batch_size: int, desc: str, progress: bool):
    """Indices of rows in batches of ``batch_size``, longest rows first (so a batch's rows have similar lengths)."""
    order = np.argsort([-n for n in lengths], kind="stable")
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return progress_bar(groups, total=len(groups), desc=desc, enabled=progress, leave=False)


def _row(ids: list[int], prompt_len: int, max_len: int) -> dict:
    ids, n = truncate(ids, prompt_len, max_len)
    return {"input_ids": ids, "prompt_len": n}


class Evaluator:
    """Held-out scoring of one model (with or without adapters), its jitted programs compiled once.

    Keep one ``Evaluator`` for repeated evaluation (the trainer does): each program (sequence scores,
    next-token scores, greedy decoding) is compiled on first use for each bucketed shape and reused
    after; params and adapters are arguments, never constants. ``targets``: ``find_targets(params, config)``
    when the caller already has it (``with_lora`` resolves it on every trace otherwise). Scores and answer losses
    take the output head only at the scored positions (and, for single-token choices, at the prompt's last
    one): no ``batch x length x vocab`` logits, the same values; ``full_logits=True`` computes every position's
    (as NNX models, and adapters on the head, always do). The module-level functions
    (``evaluate``, ``score_choices``, ``answer_nll``, ``generate``) make a temporary one.

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, tok = load_model("toy-llama")
        >>> ev = Evaluator(model, tok, batch_size=4)
        >>> ev.score_choices(params, None, ["Q:"], [[" a", " b"]], progress=False).shape
        (1, 2)
    """

    def __init__(
        self,
        model,
        tokenizer,
        config: LoraConfig | None = None,
        *,
        batch_size: int = 16,
        max_len: int = 512,
        targets: dict[str, Target] | None = None,
        full_logits: bool = False,
    ):
        if tokenizer is None:
            raise ValueError("evaluation needs the model's tokenizer (load_model returns it)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, self.config, self.targets = model, tokenizer, config, targets
        self.seq2seq = is_encoder_decoder(model)
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        self.full_logits = bool(full_logits)
        self._programs: dict = {}

    def _program(self, kind: str, with_adapters: bool, *static) -> Callable:
        if with_adapters and self.config is None:
            raise ValueError(
                "adapters were given without their LoraConfig; pass config=the LoraConfig they were made with"
            )
        key = (kind, with_adapters, static)
        if key not in self._programs:
            forward = _forward(self.model, self.config, with_adapters, self.targets)
            self._programs[key] = jax.jit(_BUILDERS[kind](forward, self.model, *static))
        return self._programs[key]

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []

    def score_choices(
        self,
        params,
        adapters,
        prompts: Sequence[str],
        choices: Sequence[Sequence[str]],
        *,
        answers: Sequence[str] | None = None,
        progress: bool = True,
    ):
        """Summed log-likelihood of each candidate continuation given its prompt: (n_prompts, max_choices)
        float32, ``-inf`` where an example has fewer choices. With ``answers`` (the gold continuations) it
        returns ``(scores, nll, count)``, adding each example's answer NLL and token count (as ``answer_nll``),
        from the same forward passes when every candidate is a single token."""
        n_choices = max((len(c) for c in choices), default=0)
        out = np.full((len(prompts), n_choices), -np.inf, np.float32)
        if not len(prompts) or not n_choices:
            return out if answers is None else (out, np.zeros(len(prompts)), np.zeros(len(prompts), np.int64))
        prompt_ids, choice_ids = self._ids(prompts), iter(self._ids([c for cs in choices for c in cs]))
        per_example = [[next(choice_ids) for _ in cs] for cs in choices]
        if all(len(ids) == 1 for cs in per_example for ids in cs) and not self.seq2seq:
            return self._score_next_token(params, adapters, prompt_ids, per_example, answers, out, progress)
        self._score_sequences(params, adapters, prompt_ids, per_example, out, progress)
        if answers is None:
            return out
        return (out, *self.answer_nll(params, adapters, prompts, answers, progress=progress))

    def _score_next_token(self, params, adapters, prompt_ids, per_example, answers, out, progress):
        """Single-token candidates: one forward pass per prompt (+ gold answer) scores every candidate."""
        run = self._program("next_token", adapters is not None)
        if answers is None:
            rows = [_row(p[-self.max_len :], len(p[-self.max_len :]), self.max_len) for p in prompt_ids]
        else:
            tails = [a + [self._eos()] for a in self._ids(answers)]
            rows = [_row(p + a, len(p), self.max_len) for p, a in zip(prompt_ids, tails)]
        nll, count = np.zeros(len(rows), np.float64), np.zeros(len(rows), np.int64)
        for idx in _longest_first([len(r["input_ids"]) for r in rows], self.batch_size, "scoring", progress):
            batch = self._pad([rows[i] for i in idx], adapters)
            cand = np.full((self.batch_size, out.shape[1]), -1, np.int32)
            score_at = np.zeros(self.batch_size, np.int32)
            for r, i in enumerate(idx):
                cand[r, : len(per_example[i])] = [ids[0] for ids in per_example[i]]
                score_at[r] = max(rows[i]["prompt_len"] - 1, 0)
            scores, lp, n = (
                to_numpy(x) for x in run(params, adapters, batch, jnp.asarray(cand), jnp.asarray(score_at))
            )
            for r, i in enumerate(idx):
                out[i, : len(per_example[i])] = scores[r, : len(per_example[i])]
            nll[idx], count[idx] = -lp[: len(idx)], n[: len(idx)]
        return out if answers is None else (out, nll, count)

    def _score_sequences(self, params, adapters, prompt_ids, per_example, out, progress) -> None:
        """Candidates of several tokens: every (prompt, candidate) pair is a row; fills ``out`` in place."""
        run = self._program("sequence", adapters is not None)
        pairs = [(i, j) for i, cs in enumerate(per_example) for j in range(len(cs))]
        rows = [_row(prompt_ids[i] + per_example[i][j], len(prompt_ids[i]), self.max_len) for i, j in pairs]
        for idx in _longest_first([len(r["input_ids"]) for r in rows], self.batch_size, "scoring", progress):
            scores = to_numpy(run(params, adapters, self._pad([rows[p] for p in idx], adapters))[0])
            for r, p in enumerate(idx):
                out[pairs[p]] = scores[r]

    def _scored_only(self, adapters) -> bool:
        """Whether the scores take logits at the scored positions only: a linen model (NNX models' heads cannot
        be intercepted: full logits) whose output head has no adapter, unless ``full_logits``."""
        on_head = adapters is not None and any(p == HEAD or p.endswith("/" + HEAD) for p in adapters)
        return not (self.full_logits or on_head or is_nnx_module(self.model))

    def _pad(self, rows, adapters):
        """Rows (``input_ids`` = prompt + continuation, ``prompt_len``) as a bucketed batch for this model, with
        ``loss_positions`` (a power of two >= 8 of them, at most the length: few shapes) when ``_scored_only``."""
        sizes = dict(pad_id=pad_id_of(self.tokenizer), buckets=bucket_lengths(self.max_len), batch_size=self.batch_size)
        if self.seq2seq:
            batch = pad_seq2seq_batch(rows, decoder_start_id=decoder_start_id(self.model), **sizes)
        else:
            batch = pad_batch(rows, **sizes)
        if not self._scored_only(adapters):
            return batch
        mask = np.asarray(batch["loss_mask"])
        most = int((mask[:, 0 if self.seq2seq else 1 :] != 0).sum(1).max(initial=0))
        return with_loss_positions(batch, size=min(max(8, 1 << (most - 1).bit_length()), mask.shape[1]))

    def _eos(self) -> int:
        tok = self.tokenizer
        return pad_id_of(tok) if tok.eos_token_id is None else tok.eos_token_id

    def answer_nll(
        self, params, adapters, prompts: Sequence[str], answers: Sequence[str], *, progress: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per example: (summed NLL of answer + eos, number of those tokens)."""
        eos = self._eos()
        rows = [_row(p + a + [eos], len(p), self.max_len) for p, a in zip(self._ids(prompts), self._ids(answers))]
        run = self._program("sequence", adapters is not None)
        nll, count = np.zeros(len(rows), np.float64), np.zeros(len(rows), np.int64)
        for idx in _longest_first([len(r["input_ids"]) for r in rows], self.batch_size, "answer NLL", progress):
            lp, n = (to_numpy(x) for x in run(params, adapters, self._pad([rows[p] for p in idx], adapters)))
            nll[idx], count[idx] = -lp[: len(idx)], n[: len(idx)]
        return nll, count

    def _check_generation(self, max_new_tokens: int) -> None:
        model = self.model
        if self.seq2seq:
            raise NotImplementedError(
                f"greedy generation is implemented for causal LMs; {type(model).__name__} is an encoder-decoder: "
                "evaluate it on choice tasks (scored by likelihood) or by answer loss (eval.score: false)"
            )
        if not hasattr(model, "init_cache") and not is_nnx_module(model):
            raise TypeError(
                f"{type(model).__name__} has no init_cache; generate needs a Hugging Face Flax causal LM or an NNX "
                "causal LM with tunix's call convention"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")

    def _decode(self, tokens) -> str:
        row, eos = tokens.tolist(), self.tokenizer.eos_token_id
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        return self.tokenizer.decode(row, skip_special_tokens=True)

    def generate(
        self, params, adapters, prompts: Sequence[str], *, max_new_tokens: int = 16, progress: bool = True
    ) -> list[str]:
        """Greedy continuations (text after the prompt, cut at eos), jitted with a KV cache (``generate_ids``).

        Prompts are left-padded to a bucket length (at most ``max_len``, cut from the left), so few
        shapes are compiled. Needs a HF Flax causal LM with ``init_cache`` (Llama, Mistral, Gemma, GPT-2...) or
        an NNX causal LM with tunix's call convention ``model(tokens, positions, cache, mask) -> (logits, cache)``
        (tunix's Llama 3, Qwen 2.5, Qwen 3, Gemma 3: the KV cache in tunix's layout, ``lora_one_jax.nnx.init_cache``).
        """
        new = self.generate_ids(params, adapters, prompts, max_new_tokens=max_new_tokens, progress=progress)
        return [self._decode(row) for row in new]

    def generate_ids(
        self, params, adapters, prompts: Sequence[str], *, max_new_tokens: int = 16, progress: bool = True
    ) -> np.ndarray:
        """The greedy tokens after each prompt, ``(len(prompts), max_new_tokens)`` int32, not cut at eos (``generate``
        decodes them).

        Example:
            >>> from lora_one_jax.models import load_model
            >>> model, params, tok = load_model("toy-llama", backend="nnx")  # tunix's Llama3: its KV cache layout
            >>> Evaluator(model, tok, batch_size=2).generate_ids(params, None, ["Hi", "2+2="], max_new_tokens=3,
            ...                                                  progress=False).shape
            (2, 3)
        """
        self._check_generation(max_new_tokens)
        run = self._program("greedy", adapters is not None, int(max_new_tokens))
        ids = [p[-self.max_len :] for p in self._ids(prompts)]
        pad, buckets = pad_id_of(self.tokenizer), bucket_lengths(self.max_len)
        out = np.zeros((len(ids), int(max_new_tokens)), np.int32)
        for idx in _longest_first([len(p) for p in ids], self.batch_size, "generating", progress):
            length = next(b for b in buckets if b >= max(len(ids[i]) for i in idx))
            tokens = np.full((self.batch_size, length), pad, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for r, i in enumerate(idx):
                if ids[i]:
                    tokens[r, -len(ids[i]) :], mask[r, -len(ids[i]) :] = ids[i], 1
            mask[len(idx) :, -1] = 1  # filler rows attend to one token
            out[idx] = to_numpy(run(params, adapters, jnp.asarray(tokens), jnp.asarray(mask)))[: len(idx)]
        return out

    def evaluate(
        self,
        params,
        adapters,
        task_split,
        *,
        limit: int | None = None,
        max_new_tokens: int = 16,
        length_normalize: bool = False,
        answer_loss: bool = False,
        progress: bool = True,
    ) -> EvalResult:
        """Score a split (see ``evaluate``); ``answer_loss`` also measures the mean NLL per gold answer token
        (the fine-tuning loss on held-out data; for single-token choices from the same forward passes)."""
        ds, kind = _split_of(task_split, limit)
        start = time.perf_counter()
        if kind == "choice":
            result = self._evaluate_choices(params, adapters, ds, length_normalize, answer_loss, progress)
        elif kind == "number":
            result = self._evaluate_numbers(params, adapters, ds, max_new_tokens, answer_loss, progress)
        else:  # "text"
            nll, count = self.answer_nll(params, adapters, ds["prompt"], ds["answer"], progress=progress)
            value = mean_nll(nll, count)
            result = EvalResult("nll", value, None, len(ds), 0.0, (nll / np.maximum(count, 1)).tolist(), value)
        result.seconds = time.perf_counter() - start
        return result

    def _evaluate_choices(self, params, adapters, ds, length_normalize, answer_loss, progress) -> EvalResult:
        choices, loss = ds["choices"], None
        answers = ds["answer"] if answer_loss else None
        scores = self.score_choices(params, adapters, ds["prompt"], choices, progress=progress, answers=answers)
        if answer_loss:
            scores, nll, count = scores
            loss = mean_nll(nll, count)
        if length_normalize:
            lengths = np.ones_like(scores)
            for i, cs in enumerate(choices):
                lengths[i, : len(cs)] = [max(len(c.encode()), 1) for c in cs]
            scores = scores / lengths
        predictions = scores.argmax(-1).tolist()
        correct = int(sum(p == gold for p, gold in zip(predictions, ds["label"])))
        metric = "accuracy_norm" if length_normalize else "accuracy"
        return EvalResult(metric, correct / len(ds), correct, len(ds), 0.0, predictions, loss)

    def _evaluate_numbers(self, params, adapters, ds, max_new_tokens, answer_loss, progress) -> EvalResult:
        texts = self.generate(params, adapters, ds["prompt"], max_new_tokens=max_new_tokens, progress=progress)
        correct = int(sum(number_match(t, a) for t, a in zip(texts, ds["answer"])))
        loss = None
        if answer_loss:
            loss = mean_nll(*self.answer_nll(params, adapters, ds["prompt"], ds["answer"], progress=progress))
        return EvalResult("exact_match", correct / len(ds), correct, len(ds), 0.0, texts, loss)


def _split_of(task_split, limit: int | None):
    """``(dataset, kind)`` of a split (or a ``Task``'s eval split), its first ``limit`` examples."""
    ds = getattr(task_split, "eval", task_split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if not len(ds):
        raise ValueError("the split is empty")
    kinds = set(ds["kind"]) if "kind" in ds.column_names else set()
    if len(kinds) != 1:
        raise ValueError(
            f"the split must hold one kind of example ('choice', 'number' or 'text'), found {sorted(kinds)}; "
            "build it with lora_one_jax.data.load_task or data.from_records"
        )
    kind = kinds.pop()
    if kind not in ("choice", "number", "text"):
        raise ValueError(f"unknown example kind {kind!r}; expected 'choice', 'number' or 'text'")
    return ds, kind


# ----------------------------------------------------------------------------- functions
# Each makes a temporary Evaluator(model, tokenizer, config, **sizes) (``sizes``: batch_size=16, max_len=512)
# and calls its method of the same name: keep an Evaluator to evaluate one model repeatedly.


def score_choices(
    model,
    params,
    adapters,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    config=None,
    *,
    tokenizer,
    progress: bool = True,
    **sizes,
) -> np.ndarray:
    """Summed log-likelihood of each candidate continuation given its prompt: (n_prompts, max_choices)
    float32, ``-inf`` where an example has fewer choices (``Evaluator.score_choices``, compiled afresh).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, tok = load_model("toy-llama")
        >>> score_choices(model, params, None, ["Q:"], [[" a", " bc"]], tokenizer=tok, progress=False).shape
        (1, 2)
    """
    ev = Evaluator(model, tokenizer, config, **sizes)
    return ev.score_choices(params, adapters, prompts, choices, progress=progress)


def answer_nll(
    model,
    params,
    adapters,
    prompts: Sequence[str],
    answers: Sequence[str],
    config=None,
    *,
    tokenizer,
    progress: bool = True,
    **sizes,
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: (summed NLL of answer + eos, number of those tokens) (``Evaluator.answer_nll``).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, tok = load_model("toy-llama")
        >>> nll, n = answer_nll(model, params, None, ["Q:"], [" yes"], tokenizer=tok, progress=False)
        >>> n.tolist()  # ' ', 'y', 'e', 's', eos
        [5]
    """
    return Evaluator(model, tokenizer, config, **sizes).answer_nll(
        params, adapters, prompts, answers, progress=progress
    )


def generate(
    model,
    params,
    adapters,
    prompts: Sequence[str],
    config=None,
    *,
    tokenizer,
    max_new_tokens: int = 16,
    progress: bool = True,
    **sizes,
) -> list[str]:
    """Greedy continuations (text after the prompt, cut at eos), jitted with a KV cache (``Evaluator.generate``).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, tok = load_model("toy-llama")
        >>> out = generate(model, params, None, ["Hi", "2+2="], tokenizer=tok, max_new_tokens=4, progress=False)
        >>> len(out), all(isinstance(t, str) for t in out)
        (2, True)
        >>> model, params, tok = load_model("smollm2-135m")  # doctest: +SKIP
        >>> generate(model, params, None, ["The capital of"], tokenizer=tok, max_new_tokens=2)  # doctest: +SKIP
        [' Paris.']
    """
    ev = Evaluator(model, tokenizer, config, **sizes)
    return ev.generate(params, adapters, prompts, max_new_tokens=max_new_tokens, progress=progress)


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[:/]\d+)?")


def numbers_in(text: str) -> list[str]:
    """Normalised numbers in ``text``: thousands commas dropped, ``2.50`` -> ``2.5``, ``3:30`` and ``1/2`` kept.

    Example:
        >>> numbers_in("1,200 apples, 2.50 dollars, at 3:30, 7.0")
        ['1200', '2.5', '3:30', '7']
    """
    out = []
    for m in _NUMBER.findall(text):
        m = m.replace(",", "")
        if re.fullmatch(r"-?\d+(?:\.\d+)?", m):
            value = float(m)
            m = str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
        out.append(m)
    return out


def number_match(prediction: str, gold: str) -> bool:
    """Whether the numbers in the first line of ``prediction`` (the answer line) start with those of ``gold``.

    Example:
        >>> number_match(" 9 apples\\nQuestion: ...", " 9 apples"), number_match(" 12", " 9 apples")
        (True, False)
    """
    want = numbers_in(gold)
    got = numbers_in(prediction.lstrip(" \t").split("\n", 1)[0])
    return bool(want) and got[: len(want)] == want


# ----------------------------------------------------------------------------- evaluate


def evaluate(model, params, adapters, task_split, config=None, *, tokenizer, **options) -> EvalResult:
    """Score a split of prompt/answer examples (see module doc); ``adapters=None`` is the base model.

    ``task_split`` is a ``datasets.Dataset`` with the ``lora_one_jax.data`` columns, or a ``Task``
    (its ``eval`` split). ``config`` is the ``LoraConfig`` the adapters were made with. ``options``:
    ``batch_size=16`` and ``max_len=512`` (``Evaluator``), ``limit`` (the first examples only),
    ``max_new_tokens=16``, ``length_normalize=False`` (divide each candidate's log-likelihood by its length
    in UTF-8 bytes before comparing: lm-eval's ``acc_norm``, metric ``"accuracy_norm"``), ``answer_loss``,
    ``progress`` (``Evaluator.evaluate``). Returns an ``EvalResult`` (``print`` shows ``0.412 (412/1000)``).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> from lora_one_jax.data import load_task
        >>> model, params, tok = load_model("smollm2-135m")  # doctest: +SKIP
        >>> print(evaluate(model, params, None, load_task("boolq").eval, tokenizer=tok, limit=200))  # doctest: +SKIP
        0.435 (87/200)
    """
    sizes = {k: options.pop(k) for k in ("batch_size", "max_len") if k in options}
    return Evaluator(model, tokenizer, config, **sizes).evaluate(params, adapters, task_split, **options)
