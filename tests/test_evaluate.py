"""Evaluation: scoring checked on hand-made models where the answer is known and against a manual
log-probability computation; greedy generation against a naive decode; then the real model."""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_one_jax import init_adapters, merge
from lora_one_jax.config import LoraConfig
from lora_one_jax.eval import EvalResult, evaluate, generate, number_match, numbers_in, score_choices
from lora_one_jax.models import toy_llama

CFG = LoraConfig(rank=2, alpha=4.0, targets=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def toy():
    return toy_llama(seed=0)


def _certain(toy, token: str):
    """Toy-llama params under which the next token is ``token`` with probability ~1, whatever the input:
    attention and MLP outputs are zero, every embedding has 1.0 in dimension 0, the final norm keeps
    only that dimension and the head maps it to ``token`` alone."""
    model, params, tok = toy
    p = jax.tree.map(np.array, params)
    for layer in p["model"]["layers"].values():
        layer["self_attn"]["o_proj"]["kernel"][:] = 0.0
        layer["mlp"]["down_proj"]["kernel"][:] = 0.0
    p["model"]["embed_tokens"]["embedding"][:, 0] = 1.0
    p["model"]["norm"]["weight"][:] = 0.0
    p["model"]["norm"]["weight"][0] = 1.0
    p["lm_head"]["kernel"][:] = 0.0
    p["lm_head"]["kernel"][0, tok.convert_tokens_to_ids(token)] = 100.0
    return jax.tree.map(jnp.asarray, p)


def _choice_rows(n_first: int, n: int, choices):
    return datasets.Dataset.from_list(
        [
            {
                "prompt": f"Example {i}:",
                "answer": choices[int(i >= n_first)],
                "choices": choices,
                "label": int(i >= n_first),
                "kind": "choice",
            }
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("choices", [["a", "b"], ["aa", "ab"]], ids=["single-token", "multi-token"])
def test_accuracy_on_a_model_that_is_certain(toy, choices):
    model, _, tok = toy
    params = _certain(toy, "a")
    result = evaluate(model, params, None, _choice_rows(13, 20, choices), tokenizer=tok, batch_size=8, progress=False)
    assert (result.metric, result.correct, result.total, str(result)) == ("accuracy", 13, 20, "0.650 (13/20)")
    assert result.predictions == [0] * 20
    scores = score_choices(model, params, None, ["x"], [choices], tokenizer=tok, progress=False)[0]
    assert scores[0] > -1e-3 and scores[1] < -50.0


def test_uniform_model_scores_are_exact(toy):
    model, params, tok = toy
    params = {**params, "lm_head": {"kernel": jnp.zeros_like(params["lm_head"]["kernel"])}}
    scores = score_choices(model, params, None, ["Q: 1+1", "Q"], [[" 2", " 22"], [" x"]], tokenizer=tok, progress=False)
    log_v = np.log(len(tok))
    np.testing.assert_allclose(scores[0], [-2 * log_v, -3 * log_v], rtol=1e-5)
    assert scores[1, 0] == pytest.approx(-2 * log_v, rel=1e-5) and scores[1, 1] == -np.inf
    # all choices score the same per token: the shortest wins, ties go to the first
    ds = datasets.Dataset.from_list(
        [
            {"prompt": "p", "answer": " 22", "choices": [" 22", " 2", " 3"], "label": y, "kind": "choice"}
            for y in (0, 1, 2)
        ]
    )
    assert evaluate(model, params, None, ds, tokenizer=tok, progress=False).predictions == [1, 1, 1]
    # " x" is 2 tokens in 2 bytes, "   x" 3 tokens ("ĠĠ", "Ġ", "x") in 4 bytes: " x" is more likely, but
    # "   x" is more likely per byte
    assert tok.convert_ids_to_tokens(tok("   x").input_ids) == ["ĠĠ", "Ġ", "x"]
    two = datasets.Dataset.from_list(
        [{"prompt": "p", "answer": "   x", "choices": [" x", "   x"], "label": 1, "kind": "choice"}]
    )
    assert evaluate(model, params, None, two, tokenizer=tok, progress=False).predictions == [0]
    norm = evaluate(model, params, None, two, tokenizer=tok, length_normalize=True, progress=False)
    assert norm.predictions == [1] and norm.metric == "accuracy_norm" and str(norm) == "1.000 (1/1)"


_FORWARDS: dict = {}


def _fixed_length_forward(model, adapters=None, length=64):
    """One sequence at a time, right-padded to a fixed length (one compile): no batching, buckets or sorting."""
    from lora_one_jax.transform import with_lora

    def logits(params, ids, mask):
        if adapters is None:
            return model(ids, attention_mask=mask, params=params).logits
        return with_lora(model, CFG)({"params": params}, adapters, ids, attention_mask=mask).logits

    key = (id(model), adapters is None)
    if adapters is not None or key not in _FORWARDS:
        _FORWARDS[key] = (model, jax.jit(logits))
    run = _FORWARDS[key][1]

    def forward(params, ids):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(ids)] = ids
        mask = (np.arange(length) < len(ids)).astype(np.int32)[None]
        return run(params, jnp.asarray(padded), jnp.asarray(mask))[:, : len(ids)]

    return forward


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _manual_scores(model, params, tok, prompts, choices, adapters=None):
    forward = _fixed_length_forward(model, adapters)
    out = []
    for prompt, cs in zip(prompts, choices):
        p = tok(prompt, add_special_tokens=False).input_ids
        row = []
        for c in cs:
            ids = p + tok(c, add_special_tokens=False).input_ids
            logp = _log_softmax(forward(params, ids)[0])
            row.append(sum(logp[t - 1, ids[t]] for t in range(len(p), len(ids))))
        out.append(row)
    return np.array(out)


PROMPTS = ["Short", "A longer prompt that needs the next bucket of lengths", "Mid-size prompt here", "x"]


def test_scores_match_manual_computation(toy):
    model, params, tok = toy
    multi = [[" yes", " no way"], [" a", " bcd"], [" 12", " 3"], [" ok", " fine"]]
    single = [["1", "2", "3"]] * 4
    for choices in (multi, single):
        got = score_choices(model, params, None, PROMPTS, choices, tokenizer=tok, batch_size=3, progress=False)
        np.testing.assert_allclose(got, _manual_scores(model, params, tok, PROMPTS, choices), atol=2e-4)


def test_adapters_change_scores_like_merged_weights(toy):
    model, params, tok = toy
    _, adapters = init_adapters(params, CFG, key=jax.random.key(1))
    choices = [[" yes", " no"]] * 4
    base = score_choices(model, params, None, PROMPTS, choices, tokenizer=tok, progress=False)
    zero_b = score_choices(model, params, adapters, PROMPTS, choices, CFG, tokenizer=tok, progress=False)
    np.testing.assert_allclose(zero_b, base, atol=1e-5)  # B = 0: the base model
    keys = jax.random.split(jax.random.key(2), len(adapters))
    adapters = {
        k: {"a": v["a"], "b": 0.5 * jax.random.normal(kk, v["b"].shape)} for kk, (k, v) in zip(keys, adapters.items())
    }
    tuned = score_choices(model, params, adapters, PROMPTS, choices, CFG, tokenizer=tok, progress=False)
    merged = score_choices(model, merge(params, adapters, CFG), None, PROMPTS, choices, tokenizer=tok, progress=False)
    assert np.abs(tuned - base).max() > 1e-2
    np.testing.assert_allclose(tuned, merged, atol=2e-4)
    np.testing.assert_allclose(
        tuned[:2], _manual_scores(model, params, tok, PROMPTS[:2], choices[:2], adapters), atol=2e-4
    )
    with pytest.raises(ValueError, match="LoraConfig"):
        score_choices(model, params, adapters, PROMPTS, choices, tokenizer=tok)


def _naive_greedy(model, params, tok, prompts, n):
    forward = _fixed_length_forward(model)
    out = []
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False).input_ids
        for _ in range(n):
            ids.append(int(forward(params, ids)[0, -1].argmax()))
        out.append(ids[-n:])
    return out


def test_generate_matches_naive_greedy(toy):
    model, params, tok = toy
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)  # sharper, less tie-prone logits
    prompts = ["Hello", "A longer prompt, padded on the left by the others", "7+5="]
    got = generate(model, params, None, prompts, tokenizer=tok, max_new_tokens=6, batch_size=2, progress=False)
    for text, want in zip(got, _naive_greedy(model, params, tok, prompts, 6)):
        eos = tok.eos_token_id
        want = want[: want.index(eos)] if eos in want else want
        assert text == tok.decode(want, skip_special_tokens=True)


def test_exact_match_of_numbers(toy):
    model, _, tok = toy
    params = _certain(toy, "7")  # always generates "7777"
    ds = datasets.Dataset.from_list(
        [
            {"prompt": f"Q{i}", "answer": a, "choices": [], "label": -1, "kind": "number"}
            for i, a in enumerate([" 7777 apples", " 7", " 7,777", " 12"])
        ]
    )
    result = evaluate(model, params, None, ds, tokenizer=tok, max_new_tokens=4, progress=False)
    assert result.predictions == ["7777"] * 4
    assert (result.metric, str(result)) == ("exact_match", "0.500 (2/4)")


def test_text_kind_reports_answer_nll(toy):
    model, params, tok = toy
    ds = datasets.Dataset.from_list(
        [{"prompt": "def f():", "answer": " return 1", "choices": [], "label": -1, "kind": "text"}]
    )
    result = evaluate(model, params, None, ds, tokenizer=tok, progress=False)
    ids = tok("def f(): return 1").input_ids + [tok.eos_token_id]
    n_prompt = len(tok("def f():").input_ids)
    logp = _log_softmax(_fixed_length_forward(model)(params, ids)[0])
    manual = -np.mean([logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))])
    assert result.metric == "nll" and result.value == pytest.approx(manual, rel=1e-4)
    assert str(result).endswith("nats/token (1 examples)")


def test_number_parsing():
    assert numbers_in("It costs $1,250.50 or 3/4 of 2.0") == ["1250.5", "3/4", "2"]
    assert number_match(" 5 years old; 15 years old", " 5 years old; 15 years old")
    assert not number_match(" 5 years", " 5 years old; 15 years old")
    assert number_match("16\nQuestion: 3", " 16 oranges") and not number_match("\n16", " 16")
    assert not number_match(" no idea", " 16")


def test_eval_result_and_bad_inputs(toy):
    model, params, tok = toy
    assert str(EvalResult("accuracy", 0.412, 412, 1000)) == "0.412 (412/1000)"
    mixed = datasets.Dataset.from_list(
        [{"prompt": "a", "answer": " b", "choices": [], "label": -1, "kind": k} for k in ("text", "number")]
    )
    with pytest.raises(ValueError, match="one kind"):
        evaluate(model, params, None, mixed, tokenizer=tok, progress=False)


# ---------------------------------------------------------------- the real model on real data (slow)


@pytest.mark.slow
def test_smollm2_on_a_20_example_piqa_slice():
    from lora_one_jax.data import load_task
    from tests.smollm import smollm2

    model, params, tok = smollm2()
    split = load_task("piqa").eval.select(range(20))
    result = evaluate(model, params, None, split, tokenizer=tok, progress=False)
    assert result.total == 20 and result.correct == sum(p == y for p, y in zip(result.predictions, split["label"]))
    assert str(result) == f"{result.correct / 20:.3f} ({result.correct}/20)"
    manual = _manual_scores(model, params, tok, split["prompt"][:2], split["choices"][:2])
    got = score_choices(model, params, None, split["prompt"][:2], split["choices"][:2], tokenizer=tok, progress=False)
    np.testing.assert_allclose(got, manual, atol=2e-3)
    assert result.predictions[:2] == manual.argmax(-1).tolist()


@pytest.mark.slow
def test_smollm2_generation_and_asdiv_slice():
    from lora_one_jax.data import load_task
    from tests.smollm import smollm2

    model, params, tok = smollm2()
    out = generate(
        model,
        params,
        None,
        ["The capital of France is", "Once upon a time, there was a little"],
        tokenizer=tok,
        max_new_tokens=8,
        batch_size=2,
        progress=False,
    )
    assert out[0].startswith(" Paris") and len(out[1].split()) >= 5
    split = load_task("asdiv").eval.select(range(4))
    result = evaluate(model, params, None, split, tokenizer=tok, batch_size=4, max_new_tokens=8, progress=False)
    assert result.total == 4 and result.correct == sum(
        number_match(t, a) for t, a in zip(result.predictions, split["answer"])
    )
    assert all(numbers_in(t) for t in result.predictions)  # it answers with numbers


@pytest.mark.parametrize("choices", [[" a", " b"], [" apple", " banana split"]])  # one-token and longer candidates
def test_answer_loss_comes_with_the_scores_and_equals_answer_nll(toy, choices):
    model, params, tok = toy
    split = _choice_rows(3, 6, choices)
    from lora_one_jax.eval import Evaluator

    ev = Evaluator(model, tok, batch_size=4)
    with_loss = ev.evaluate(params, None, split, answer_loss=True, progress=False)
    plain = ev.evaluate(params, None, split, progress=False)
    assert plain.answer_loss is None and with_loss.predictions == plain.predictions
    nll, count = ev.answer_nll(params, None, split["prompt"], split["answer"], progress=False)
    assert with_loss.answer_loss == pytest.approx(float(nll.sum() / count.sum()), rel=1e-5)


def test_one_helper_for_the_model_kind_and_the_mean_nll(toy):
    import lora_one_jax as lj
    from lora_one_jax.models import toy_t5

    t5, _, t5_tok = toy_t5()
    assert lj.is_encoder_decoder(t5) and lj.decoder_start_id(t5) == t5_tok.pad_token_id
    assert not lj.is_encoder_decoder(toy[0]) and lj.decoder_start_id(toy[0]) is None
    nll, count = np.array([3.5, 0.0, 7.25]), np.array([2, 0, 5])
    assert lj.mean_nll(nll, count) == 10.75 / 7 and lj.mean_nll(nll[1:2], count[1:2]) == 0.0
    traced = jax.jit(lj.mean_nll)(jnp.asarray(nll, jnp.float32), jnp.asarray(count))
    np.testing.assert_allclose(float(traced), 10.75 / 7, rtol=1e-6)


def _random_adapters(params, config, seed=1):
    _, adapters = init_adapters(params, config, key=jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(adapters))
    return {
        k: {"a": v["a"], "b": 0.5 * jax.random.normal(kk, v["b"].shape)} for kk, (k, v) in zip(keys, adapters.items())
    }


@pytest.mark.parametrize("kind", ["single-token", "multi-token", "number"])
def test_scores_with_logits_at_the_scored_positions_equal_the_full_logits(toy, kind):
    """The evaluator applies the head only where it scores (the answer tokens; for one-token choices also the
    prompt's last position): the same choice scores and answer NLLs as every position's logits, with adapters."""
    from lora_one_jax.eval import Evaluator

    model, params, tok = toy
    adapters = _random_adapters(params, CFG)
    answers = [" 12", " 7", " 345", " 0"]
    choices = {"single-token": [["1", "2", "3"]] * 4, "multi-token": [[" yes", " no way"], [" a", " bcd"]] * 2}
    lean, full = (Evaluator(model, tok, CFG, batch_size=3, full_logits=f) for f in (False, True))
    for ev in (lean, full):  # the programs are jitted: the batch structure decides the path
        assert ev._scored_only(adapters) is not ev.full_logits
    if kind == "number":
        got, want = (ev.answer_nll(params, adapters, PROMPTS, answers, progress=False) for ev in (lean, full))
    else:
        golds = [c[i % len(c)] for i, c in enumerate(choices[kind])]
        got, want = (
            ev.score_choices(params, adapters, PROMPTS, choices[kind], answers=golds, progress=False)
            for ev in (lean, full)
        )
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        got, want = got[1:], want[1:]
    np.testing.assert_array_equal(got[1], want[1])  # token counts
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert np.all(got[0] > 0)


def test_the_evaluators_programs_hold_no_full_logits(toy):
    """The compiled scoring program of the scored-positions path has no batch x length x vocab array; the full
    path has one (so the check can fail)."""
    from lora_one_jax.eval import Evaluator

    model, params, tok = toy
    vocab = params["lm_head"]["kernel"].shape[1]
    texts = {}
    for full in (False, True):
        ev = Evaluator(model, tok, batch_size=2, full_logits=full)
        rows = [{"input_ids": [5, 6, 7, 8, 9, 10], "prompt_len": 4}] * 2
        batch = ev._pad(rows, None)
        texts[full] = (ev._program("sequence", False).lower(params, None, batch).as_text(), batch["input_ids"].shape)
    (lean, shape), (whole, _) = texts[False], texts[True]
    buffer = f"{shape[0]}x{shape[1]}x{vocab}x"
    assert buffer in whole and buffer not in lean
