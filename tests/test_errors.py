"""Every silent wrong result a new user met (issue "One house") is now a clear error, message asserted."""

import gc
import json
import subprocess
import sys
import weakref

import datasets
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_one_jax as lj
from lora_one_jax.data import batches, load_task
from lora_one_jax.data.tasks import DataError
from lora_one_jax.models import toy_llama, toy_tokenizer


class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(6, name="hidden")(x)))


X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), jnp.float32)
MODEL = TwoLayers()
PARAMS = MODEL.init(jax.random.key(0), X)["params"]


def random_adapters(config, seed=0):
    _, adapters = lj.init_adapters(PARAMS, config, key=jax.random.key(seed))
    return {
        p: {"a": a["a"], "b": jax.random.normal(jax.random.key(seed + 1), a["b"].shape)} for p, a in adapters.items()
    }


# ----------------------------------------------------------------------------- the core


def test_import_of_the_core_is_light():
    code = (
        "import sys, lora_one_jax; heavy = ['transformers', 'datasets', 'pyarrow', 'tensorflow', "
        "'tensorflow_datasets', 'torch']; print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_adapters_of_another_rank_fail_in_with_lora_and_merge_alike():
    adapters = random_adapters(lj.LoraConfig(rank=2, alpha=8.0, targets=["hidden"]))
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=["hidden"])  # merge used alpha/4, with_lora alpha/2
    message = (
        r"adapter 'hidden' has A of shape \(4, 2\) and B of shape \(2, 6\), but the config gives this module rank 4"
    )
    with pytest.raises(ValueError, match=message):
        lj.with_lora(MODEL, config)({"params": PARAMS}, adapters, X)
    with pytest.raises(ValueError, match=message):
        lj.merge(PARAMS, adapters, config)


def test_adapter_for_an_untargeted_module_fails_in_with_lora_and_merge_alike():
    adapters = random_adapters(lj.LoraConfig(rank=2))  # both layers
    config = lj.LoraConfig(rank=2, targets=["hidden"])
    message = r"adapters for \['out'\] match no module targeted by the config; targeted: \['hidden'\]"
    with pytest.raises(ValueError, match=message):
        lj.with_lora(MODEL, config)({"params": PARAMS}, adapters, X)
    with pytest.raises(ValueError, match=message):
        lj.merge(PARAMS, adapters, config)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": float("inf")}, r"LoraConfig.alpha must be a finite number > 0, got inf"),
        ({"alpha": float("nan")}, r"LoraConfig.alpha must be a finite number > 0, got nan"),
        ({"dtype": "int32"}, r"LoraConfig.dtype 'int32' is not a floating-point dtype"),
        ({"alpha": "16"}, r"LoraConfig.alpha must be a number, got '16'"),
        ({"rank": True}, r"LoraConfig.rank must be a positive integer, got True"),
        ({"rslora": "yes"}, r"LoraConfig.rslora must be True or False"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        lj.LoraConfig(**kwargs)


def test_numpy_scalars_are_accepted_as_numbers():
    config = lj.LoraConfig(
        rank=np.int64(4),
        alpha=np.float32(8.0),
        dropout=np.float64(0.1),
        rank_pattern={"out": np.int32(2)},
        rslora=np.bool_(True),
    )
    assert type(config.rank) is int and type(config.alpha) is float and type(config.dropout) is float
    assert config == lj.LoraConfig(rank=4, alpha=8.0, dropout=0.1, rank_pattern={"out": 2}, rslora=True)
    assert hash(config) == hash(lj.LoraConfig.from_dict(config.to_dict()))
    assert config.scale_for("hidden") == 4.0  # 8 / sqrt(4)


def test_params_instead_of_variables():
    config = lj.LoraConfig(rank=2)
    with pytest.raises(TypeError, match=r"apply's first argument is the variables dict \{'params': params, \.\.\.\}"):
        lj.with_lora(MODEL, config)(PARAMS, random_adapters(config), X)


def test_adapter_with_the_wrong_d_out_names_the_module():
    config = lj.LoraConfig(rank=2)
    adapters = random_adapters(config)
    adapters["out"] = {"a": adapters["out"]["a"], "b": jnp.zeros((2, 5))}
    message = (
        r"adapter 'out' has A of shape \(6, 2\) and B of shape \(2, 5\), but its kernel is \(d_in, d_out\) = "
        r"\(6, 3\): expected A \(6, 2\) and B \(2, 3\); the adapters were made for another model or layout"
    )
    with pytest.raises(ValueError, match=message):
        lj.with_lora(MODEL, config)({"params": PARAMS}, adapters, X)
    with pytest.raises(ValueError, match=message):
        lj.merge(PARAMS, adapters, config)


def test_adapter_missing_b():
    config = lj.LoraConfig(rank=2)
    adapters = random_adapters(config)
    adapters["hidden"] = {"a": adapters["hidden"]["a"]}
    with pytest.raises(ValueError, match=r"cannot merge adapters: 'hidden' has no 'b'"):
        lj.merge(PARAMS, adapters, config)
    with pytest.raises(
        ValueError, match=r"adapter 'hidden' must be a dict with exactly the keys 'a' and 'b', got \['a'\]"
    ):
        lj.with_lora(MODEL, config)({"params": PARAMS}, adapters, X)


def test_find_targets_on_a_model_or_on_variables():
    model, params, _ = toy_llama(num_hidden_layers=1)
    with pytest.raises(TypeError, match=r"got FlaxLlamaForCausalLM \(it is a model: pass its params"):
        lj.find_targets(model, lj.LoraConfig())
    with pytest.raises(TypeError, match=r"params is a variables dict \{'params': \.\.\.\}; pass variables\['params'\]"):
        lj.find_targets({"params": params}, lj.LoraConfig())


@pytest.mark.parametrize("damping", [0, 0.0, -1e-6, float("inf"), float("nan")])
def test_precond_rejects_damping_that_gives_nan(damping):
    with pytest.raises(ValueError, match=r"damping must be a finite number > 0.*rank-deficient"):
        lj.lora_one_precond(damping=damping)


def test_precond_with_tiny_damping_on_a_rank_deficient_factor_stays_finite():
    params = {"fc": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3))}}  # B = 0: B B^T is singular
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = lj.lora_one_precond(damping=1e-6).update(grads, None, params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("method", ["lora", "lora-one", "pissa", "lora-ga"])
def test_merge_and_with_lora_agree_for_every_init_method(method):
    model, params, _ = toy_llama(num_hidden_layers=1, seed=3)
    config = lj.LoraConfig(
        rank=2, alpha=4.0, rslora=True, targets=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 3}
    )
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, size=(2, 9)), jnp.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": jnp.ones_like(ids),
        "position_ids": jnp.broadcast_to(jnp.arange(9), ids.shape),
        "loss_mask": jnp.ones(ids.shape, jnp.float32),
    }
    extra = {}
    if method in ("lora-one", "lora-ga"):
        extra["grads"] = lj.estimate_gradient(lj.full_loss_fn(model), params, [batch], config, progress=False)
    base, adapters = lj.init_adapters(params, config, key=jax.random.key(0), method=method, **extra)
    if method == "lora":  # B = 0 would make the check trivial
        adapters = {p: {"a": a["a"], "b": 0.05 * jnp.ones_like(a["b"])} for p, a in adapters.items()}
    with_adapters = lj.with_lora(model, config)({"params": base}, adapters, ids).logits
    merged = model(ids, params=lj.merge(base, adapters, config)).logits
    np.testing.assert_allclose(with_adapters, merged, atol=2e-5)
    if method in ("pissa", "lora-ga"):  # the residual base + adapters is the original model at step 0
        np.testing.assert_allclose(merged, model(ids, params=params).logits, atol=2e-5)


# ----------------------------------------------------------------------------- data


def write_jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QA = [{"q": f"question {i}", "a": str(i)} for i in range(12)]


def test_jsonl_row_without_answer(tmp_path):
    path = write_jsonl(tmp_path, QA[:5] + [{"q": "no answer here"}] + QA[5:])
    with pytest.raises(DataError, match=rf"jsonl:{path}, row 5: field 'answer' \(column 'a'\) is missing or null"):
        load_task(f"jsonl:{path}", fields={"prompt": "q", "answer": "a"})


def choice_rows(labels):
    return [
        {"q": f"question {i}", "options": ["red", "green", "blue"], "gold": label} for i, label in enumerate(labels)
    ]


def test_choice_label_out_of_range(tmp_path):
    path = write_jsonl(tmp_path, choice_rows([0, 1, 2, 3, 0, 1]))
    with pytest.raises(
        DataError, match=rf"jsonl:{path}, row 3: label 3 \(column 'gold'\) is not an index into its 3 choices"
    ):
        load_task(f"jsonl:{path}", fields={"prompt": "q", "choices": "options", "label": "gold"})


def test_choice_label_minus_one(tmp_path):
    path = write_jsonl(tmp_path, choice_rows([0, 1, -1, 2, 0, 1]))
    with pytest.raises(DataError, match=r"row 2: label -1 .* unlabelled rows must be removed"):
        load_task(f"jsonl:{path}", fields={"prompt": "q", "choices": "options", "label": "gold"})


def test_string_answer_not_among_choices(tmp_path):
    rows = [{"q": f"question {i}", "options": ["red", "green"], "a": "red"} for i in range(6)]
    rows[4]["a"] = "purple"
    path = write_jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=r"row 4: the answer 'purple' is not one of the choices \[' red', ' green'\]"):
        load_task(f"jsonl:{path}", fields={"prompt": "q", "choices": "options", "answer": "a"})


def test_malformed_and_empty_jsonl_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "a": "1"}\n{"q": "b", "a": \n')
    with pytest.raises(ValueError, match=rf"'{bad}' is not a valid JSON-lines file"):
        load_task(f"jsonl:{bad}", fields={"prompt": "q", "answer": "a"})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"'{empty}' holds no rows"):
        load_task(f"jsonl:{empty}", fields={"prompt": "q", "answer": "a"})


@pytest.mark.parametrize("eval_size", [0, -1, 12, 2.5])
def test_bad_eval_size(tmp_path, eval_size):
    path = write_jsonl(tmp_path, QA)
    with pytest.raises(ValueError, match=rf"eval_size={eval_size!r} must be an integer between 1 and 11"):
        load_task(f"jsonl:{path}", fields={"prompt": "q", "answer": "a"}, eval_size=eval_size)


def test_batches_of_nothing_or_of_size_zero():
    tok = toy_tokenizer()
    ds = datasets.Dataset.from_list([{"prompt": "Q", "answer": " A"}] * 3)
    with pytest.raises(ValueError, match="the dataset is empty: there is nothing to batch"):
        batches(ds.select([]), tok, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        batches(ds, tok, 0)
    with pytest.raises(ValueError, match=r"drop_remainder=True with 3 examples and batch_size=4 gives no batch"):
        batches(ds, tok, 4, drop_remainder=True)


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_holds_no_model_alive():
    from lora_one_jax.eval import evaluate

    model, params, tok = toy_llama(num_hidden_layers=1)
    ds = datasets.Dataset.from_list(
        [{"prompt": "Q", "answer": " a", "choices": [" a", " b"], "label": 0, "kind": "choice"}]
    )
    evaluate(model, params, None, ds, tokenizer=tok, batch_size=2, progress=False)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "a cache still holds the model after evaluate() returned"
