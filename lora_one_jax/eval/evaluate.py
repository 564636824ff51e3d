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

import jax
import jax.numpy as jnp
import numpy as np

from lora_one_jax.config import LoraConfig
from lora_one_jax.data.batching import bucket_lengths, pad_batch, pad_id_of, pad_seq2seq_batch, truncate
from lora_one_jax.losses import sequence_logprob
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


def _forward(model, config: LoraConfig | None, with_adapters: bool) -> Callable:
    """``f(params, adapters, input_ids, **kwargs)`` -> model output, through ``with_lora`` when needed."""
    if not with_adapters:
        return lambda params, adapters, ids, **kw: model(ids, params=params, **kw)
    apply = with_lora(model, config)
    return lambda params, adapters, ids, **kw: apply({"params": params}, adapters, ids, **kw)


def _sequence_scores(forward, model):
    """Per row: the summed log-probability of the ``loss_mask`` tokens and their count (causal LM or, for a
    ``pad_seq2seq_batch`` batch, encoder-decoder)."""

    def run(params, adapters, batch):
        if "decoder_input_ids" in batch:
            out = forward(
                params,
                adapters,
                batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"],
                decoder_attention_mask=batch["decoder_attention_mask"],
            )
            logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
            return (picked * batch["loss_mask"]).sum(-1), batch["loss_mask"].sum(-1)
        out = forward(
            params,
            adapters,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
        return sequence_logprob(out.logits, batch), batch["loss_mask"].sum(-1)

    return run


def _next_token_scores(forward, model):
    """Log-probabilities of single-token candidates after position ``score_at`` of each row, and (for rows that
    continue with the gold answer) the summed log-probability of the ``loss_mask`` tokens: one forward pass
    gives the choice scores and the held-out answer loss."""

    def run(params, adapters, batch, candidates, score_at):
        out = forward(
            params,
            adapters,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
        logits = jnp.take_along_axis(out.logits, score_at[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        scores = jnp.take_along_axis(logp, jnp.maximum(candidates, 0), axis=-1)
        return scores, sequence_logprob(out.logits, batch), batch["loss_mask"].sum(-1)

    return run


def _greedy(forward, model, max_new_tokens):
    def run(params, adapters, input_ids, attention_mask):
        batch, length = input_ids.shape
        shapes = jax.eval_shape(lambda: model.init_cache(batch, length + max_new_tokens))
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
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


def _progress(iterable, total, desc, enabled):
    return progress_bar(iterable, total=total, desc=desc, enabled=enabled, leave=False)


def _chunks(n: int, size: int):
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


class Evaluator:
    """Held-out scoring of one model (with or without adapters), its jitted programs compiled once.

    Keep one ``Evaluator`` for repeated evaluation (the trainer does): each program (sequence scores,
    next-token scores, greedy decoding) is compiled on first use for each bucketed shape and reused
    after; params and adapters are arguments, never constants. The module-level functions
    (``evaluate``, ``score_choices``, ``answer_nll``, ``generate``) make a temporary one.

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, tok = load_model("toy-llama")
        >>> ev = Evaluator(model, tok, batch_size=4)
        >>> ev.score_choices(params, None, ["Q:"], [[" a", " b"]], progress=False).shape
        (1, 2)
    """

    def __init__(self, model, tokenizer, config: LoraConfig | None = None, *, batch_size: int = 16, max_len: int = 512):
        if tokenizer is None:
            raise ValueError("evaluation needs the model's tokenizer (load_model returns it)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        self._programs: dict = {}

    def _program(self, kind: str, with_adapters: bool, *static) -> Callable:
        if with_adapters and self.config is None:
            raise ValueError(
                "adapters were given without their LoraConfig; pass config=the LoraConfig they were made with"
            )
        key = (kind, with_adapters, static)
        if key not in self._programs:
            forward = _forward(self.model, self.config, with_adapters)
            self._programs[key] = jax.jit(_BUILDERS[kind](forward, self.model, *static))
        return self._programs[key]

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
        tokenizer, batch_size, max_len = self.tokenizer, self.batch_size, self.max_len
        n_choices = max((len(c) for c in choices), default=0)
        out = np.full((len(prompts), n_choices), -np.inf, np.float32)
        if not len(prompts) or not n_choices:
            return out if answers is None else (out, np.zeros(len(prompts)), np.zeros(len(prompts), np.int64))
        prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        flat = [c for cs in choices for c in cs]
        choice_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        per_example, k = [], 0
        for cs in choices:
            per_example.append(choice_ids[k : k + len(cs)])
            k += len(cs)
        buckets = bucket_lengths(max_len)
        pad = pad_id_of(tokenizer)
        with_adapters = adapters is not None

        if all(len(ids) == 1 for ids in choice_ids) and not self.seq2seq:  # one pass per prompt scores every candidate
            run = self._program("next_token", with_adapters)
            answer_ids = (
                tokenizer(list(answers), add_special_tokens=False)["input_ids"]
                if answers is not None
                else [[] for _ in prompts]
            )
            eos = [] if answers is None else [self._eos()]
            rows = []
            for p_ids, a_ids in zip(prompt_ids, answer_ids):
                ids, n = truncate(p_ids + (a_ids + eos if answers is not None else []), len(p_ids), max_len)
                if answers is None:
                    ids, n = ids[-max_len:], len(ids[-max_len:])
                rows.append({"input_ids": ids, "prompt_len": n})
            nll, count = np.zeros(len(rows), np.float64), np.zeros(len(rows), np.int64)
            order = np.argsort([-len(r["input_ids"]) for r in rows], kind="stable")
            groups = _chunks(len(order), batch_size)
            for group in _progress(groups, len(groups), "scoring", progress):
                idx = order[group]
                batch = pad_batch([rows[i] for i in idx], pad_id=pad, buckets=buckets, batch_size=batch_size)
                cand = np.full((batch_size, n_choices), -1, np.int32)
                score_at = np.zeros(batch_size, np.int32)
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

        run = self._program("sequence", with_adapters)
        pairs = [(i, j) for i, cs in enumerate(per_example) for j in range(len(cs))]
        rows = []
        for i, j in pairs:
            ids, n = truncate(prompt_ids[i] + per_example[i][j], len(prompt_ids[i]), max_len)
            rows.append({"input_ids": ids, "prompt_len": n})
        order = np.argsort([-len(r["input_ids"]) for r in rows], kind="stable")
        groups = _chunks(len(order), batch_size)
        for group in _progress(groups, len(groups), "scoring", progress):
            idx = order[group]
            batch = self._pad([rows[p] for p in idx], buckets)
            scores = to_numpy(run(params, adapters, batch)[0])
            for r, p in enumerate(idx):
                i, j = pairs[p]
                out[i, j] = scores[r]
        if answers is None:
            return out
        nll, count = self.answer_nll(params, adapters, prompts, answers, progress=progress)
        return out, nll, count

    def _pad(self, rows, buckets):
        """Rows (``input_ids`` = prompt + continuation, ``prompt_len``) as a batch for this model."""
        if self.seq2seq:
            start = self.model.config.decoder_start_token_id
            return pad_seq2seq_batch(
                rows,
                pad_id=pad_id_of(self.tokenizer),
                decoder_start_id=start,
                buckets=buckets,
                batch_size=self.batch_size,
            )
        return pad_batch(rows, pad_id=pad_id_of(self.tokenizer), buckets=buckets, batch_size=self.batch_size)

    def _eos(self) -> int:
        tok = self.tokenizer
        return pad_id_of(tok) if tok.eos_token_id is None else tok.eos_token_id

    def answer_nll(
        self, params, adapters, prompts: Sequence[str], answers: Sequence[str], *, progress: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per example: (summed NLL of answer + eos, number of those tokens)."""
        tokenizer = self.tokenizer
        eos = pad_id_of(tokenizer) if tokenizer.eos_token_id is None else tokenizer.eos_token_id
        p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        rows = []
        for p, a in zip(p_ids, a_ids):
            ids, n = truncate(p + a + [eos], len(p), self.max_len)
            rows.append({"input_ids": ids, "prompt_len": n})
        run = self._program("sequence", adapters is not None)
        nll, count = np.zeros(len(rows), np.float64), np.zeros(len(rows), np.int64)
        order = np.argsort([-len(r["input_ids"]) for r in rows], kind="stable")
        groups = _chunks(len(order), self.batch_size)
        buckets = bucket_lengths(self.max_len)
        for group in _progress(groups, len(groups), "answer NLL", progress):
            idx = order[group]
            batch = self._pad([rows[p] for p in idx], buckets)
            lp, n = (to_numpy(x) for x in run(params, adapters, batch))
            nll[idx], count[idx] = -lp[: len(idx)], n[: len(idx)]
        return nll, count

    def generate(
        self, params, adapters, prompts: Sequence[str], *, max_new_tokens: int = 16, progress: bool = True
    ) -> list[str]:
        """Greedy continuations (text after the prompt, cut at eos), jitted with a KV cache.

        Prompts are left-padded to a bucket length (at most ``max_len``, cut from the left), so few
        shapes are compiled. Needs a HF Flax causal LM with ``init_cache`` (Llama, Mistral, Gemma, GPT-2...).
        """
        model, tokenizer = self.model, self.tokenizer
        if self.seq2seq:
            raise NotImplementedError(
                f"greedy generation is implemented for causal LMs; {type(model).__name__} is an encoder-decoder: "
                "evaluate it on choice tasks (scored by likelihood) or by answer loss (eval.score: false)"
            )
        if not hasattr(model, "init_cache"):
            raise TypeError(f"{type(model).__name__} has no init_cache; generate needs a Hugging Face Flax causal LM")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        run = self._program("greedy", adapters is not None, int(max_new_tokens))
        ids = [p[-self.max_len :] for p in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        pad, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
        buckets = bucket_lengths(self.max_len)
        texts: list[str] = [""] * len(ids)
        order = np.argsort([-len(p) for p in ids], kind="stable")
        groups = _chunks(len(order), self.batch_size)
        for group in _progress(groups, len(groups), "generating", progress):
            idx = order[group]
            length = next(b for b in buckets if b >= max(len(ids[i]) for i in idx))
            tokens = np.full((self.batch_size, length), pad, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for r, i in enumerate(idx):
                if ids[i]:
                    tokens[r, -len(ids[i]) :], mask[r, -len(ids[i]) :] = ids[i], 1
            mask[len(idx) :, -1] = 1  # filler rows attend to one token
            new = to_numpy(run(params, adapters, jnp.asarray(tokens), jnp.asarray(mask)))
            for r, i in enumerate(idx):
                row = new[r].tolist()
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
        return texts

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
        start = time.perf_counter()
        loss = None
        if kind == "choice":
            choices = ds["choices"]
            scores = self.score_choices(
                params,
                adapters,
                ds["prompt"],
                choices,
                progress=progress,
                answers=ds["answer"] if answer_loss else None,
            )
            if answer_loss:
                scores, nll, count = scores
                loss = float(nll.sum() / max(count.sum(), 1))
            if length_normalize:
                lengths = np.ones_like(scores)
                for i, cs in enumerate(choices):
                    lengths[i, : len(cs)] = [max(len(c.encode()), 1) for c in cs]
                scores = scores / lengths
            predictions = scores.argmax(-1).tolist()
            correct = int(sum(p == gold for p, gold in zip(predictions, ds["label"])))
            metric = "accuracy_norm" if length_normalize else "accuracy"
            return EvalResult(
                metric, correct / len(ds), correct, len(ds), time.perf_counter() - start, predictions, loss
            )
        if kind == "number":
            texts = self.generate(params, adapters, ds["prompt"], max_new_tokens=max_new_tokens, progress=progress)
            correct = int(sum(number_match(t, a) for t, a in zip(texts, ds["answer"])))
            if answer_loss:
                nll, count = self.answer_nll(params, adapters, ds["prompt"], ds["answer"], progress=progress)
                loss = float(nll.sum() / max(count.sum(), 1))
            return EvalResult(
                "exact_match", correct / len(ds), correct, len(ds), time.perf_counter() - start, texts, loss
            )
        if kind == "text":
            nll, count = self.answer_nll(params, adapters, ds["prompt"], ds["answer"], progress=progress)
            value = float(nll.sum() / max(count.sum(), 1))
            return EvalResult(
                "nll", value, None, len(ds), time.perf_counter() - start, (nll / np.maximum(count, 1)).tolist(), value
            )
        raise ValueError(f"unknown example kind {kind!r}; expected 'choice', 'number' or 'text'")


# ----------------------------------------------------------------------------- functions


def score_choices(
    model,
    params,
    adapters,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    config: LoraConfig | None = None,
    *,
    tokenizer,
    batch_size: int = 16,
    max_len: int = 512,
    progress: bool = True,
) -> np.ndarray:
    """Summed log-likelihood of each candidate continuation given its prompt: (n_prompts, max_choices)
    float32, ``-inf`` where an example has fewer choices (``Evaluator.score_choices``, compiled afresh).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, tok = load_model("toy-llama")
        >>> score_choices(model, params, None, ["Q:"], [[" a", " bc"]], tokenizer=tok, progress=False).shape
        (1, 2)
    """
    ev = Evaluator(model, tokenizer, config, batch_size=batch_size, max_len=max_len)
    return ev.score_choices(params, adapters, prompts, choices, progress=progress)


def answer_nll(
    model,
    params,
    adapters,
    prompts: Sequence[str],
    answers: Sequence[str],
    config: LoraConfig | None = None,
    *,
    tokenizer,
    batch_size: int = 16,
    max_len: int = 512,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: (summed NLL of answer + eos, number of those tokens) (``Evaluator.answer_nll``).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> model, params, tok = load_model("toy-llama")
        >>> nll, n = answer_nll(model, params, None, ["Q:"], [" yes"], tokenizer=tok, progress=False)
        >>> n.tolist()  # ' ', 'y', 'e', 's', eos
        [5]
    """
    ev = Evaluator(model, tokenizer, config, batch_size=batch_size, max_len=max_len)
    return ev.answer_nll(params, adapters, prompts, answers, progress=progress)


def generate(
    model,
    params,
    adapters,
    prompts: Sequence[str],
    config: LoraConfig | None = None,
    *,
    tokenizer,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    max_len: int = 512,
    progress: bool = True,
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
    ev = Evaluator(model, tokenizer, config, batch_size=batch_size, max_len=max_len)
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


def evaluate(
    model,
    params,
    adapters,
    task_split,
    config: LoraConfig | None = None,
    *,
    tokenizer,
    batch_size: int = 16,
    max_len: int = 512,
    max_new_tokens: int = 16,
    limit: int | None = None,
    length_normalize: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Score a split of prompt/answer examples (see module doc); ``adapters=None`` is the base model.

    ``task_split`` is a ``datasets.Dataset`` with the ``lora_one_jax.data`` columns, or a ``Task``
    (its ``eval`` split). ``config`` is the ``LoraConfig`` the adapters were made with. ``limit``
    takes the first examples only. ``length_normalize`` divides each candidate's log-likelihood by
    its length in UTF-8 bytes before comparing (lm-eval's ``acc_norm``; metric ``"accuracy_norm"``).
    Returns an ``EvalResult`` (``print`` shows ``0.412 (412/1000)``).

    Example:
        >>> from lora_one_jax.models import load_model
        >>> from lora_one_jax.data import load_task
        >>> model, params, tok = load_model("smollm2-135m")  # doctest: +SKIP
        >>> print(evaluate(model, params, None, load_task("boolq").eval, tokenizer=tok, limit=200))  # doctest: +SKIP
        0.435 (87/200)
    """
    ev = Evaluator(model, tokenizer, config, batch_size=batch_size, max_len=max_len)
    return ev.evaluate(
        params,
        adapters,
        task_split,
        limit=limit,
        max_new_tokens=max_new_tokens,
        length_normalize=length_normalize,
        progress=progress,
    )
