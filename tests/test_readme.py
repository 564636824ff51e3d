"""The README's code runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_ten_line_example_runs_and_starts_at_the_base_model():
    code = python_blocks()[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    logits, model, ids = namespace["logits"], namespace["model"], namespace["ids"]
    assert (logits == model(ids).logits).all()
    assert set(namespace["grads"]) == set(namespace["adapters"])
