"""The README's code runs as written."""

import pathlib
import re

import jax.numpy as jnp
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def run_block(index):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[index]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_ten_line_example_runs_and_starts_at_the_base_model():
    ns = run_block(0)
    assert (ns["logits"] == ns["model"](ns["ids"]).logits).all()
    assert set(ns["grads"]) == set(ns["adapters"])


def test_lora_one_recipe_runs_and_starts_aligned():
    ns = run_block(1)
    assert jnp.isfinite(ns["loss"])
    assert set(ns["grads"]) == set(ns["adapters"]) and len(ns["adapters"]) == 6
    lj, model, config = ns["lj"], ns["model"], ns["config"]
    _, at_init = lj.init_adapters(
        model.params, config, key=ns["jax"].random.key(0), method="lora-one", grads=ns["grads"]
    )
    angles = lj.alignment(at_init, ns["grads"])
    assert max(max(a.values()) for a in angles.values()) < 0.1


@pytest.mark.slow
def test_real_model_example_runs_on_a_slice():
    """The SmolLM2 + BoolQ example, on 20 examples instead of 200 to keep CI short."""
    code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[2]
    assert "limit=200" in code
    namespace = {}
    exec(compile(code.replace("limit=200", "limit=20"), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert re.fullmatch(r"0\.\d{3} \(\d+/20\)", str(result))
