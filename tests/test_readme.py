"""The README's code runs as written."""

import pathlib
import re

import jax.numpy as jnp
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def block(marker: str) -> str:
    """The README's python block that contains ``marker``."""
    found = [code for code in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if marker in code]
    assert len(found) == 1, f"expected one python block with {marker!r}, found {len(found)}"
    return found[0]


def run_block(marker: str, replace: tuple[str, str] | None = None) -> dict:
    code = block(marker)
    if replace:
        assert replace[0] in code
        code = code.replace(*replace)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_ten_line_example_runs_and_starts_at_the_base_model():
    ns = run_block("merged = lj.merge(params, adapters, config)")
    assert (ns["logits"] == ns["model"](ns["ids"]).logits).all()
    assert set(ns["grads"]) == set(ns["adapters"])


def test_lora_one_recipe_runs_and_starts_aligned():
    ns = run_block("lj.alignment(adapters, grads)")
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
    ns = run_block('load_task("boolq")', ("limit=200", "limit=20"))
    assert re.fullmatch(r"0\.\d{3} \(\d+/20\)", str(ns["result"]))


def test_the_readme_first_command_is_the_default_config():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "lora-one-train\n" in first or first.rstrip().endswith("lora-one-train")


def test_nnx_example_runs_on_tunix_llama3():
    pytest.importorskip("tunix")
    ns = run_block('load_model("toy-llama", backend="nnx")')
    assert jnp.isfinite(ns["loss"]) and "layers/0/attn/q_proj" in ns["adapters"]
    assert type(ns["model"]).__name__ == "Llama3"
