"""Exports that PyTorch users load: PEFT adapter folders (both ways) and merged model folders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_one_jax as lj
from lora_one_jax.export import fold_residual, load_adapters, load_peft, pytorch_state_dict, save_adapters, save_peft
from lora_one_jax.models import load_model, toy_llama
from lora_one_jax.models.export import save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = np.array([[5, 17, 33, 9, 120, 44, 2, 7], [8, 8, 19, 200, 31, 6, 12, 90]], np.int32)
CONFIG = lj.LoraConfig(
    rank=2, alpha=4.0, rslora=True, targets=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 3}
)


def trained_like_adapters(params, config, seed=0):
    """Adapters with non-zero A and B everywhere, as after training."""
    _, adapters = lj.init_adapters(params, config, key=jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(adapters))
    return {
        p: {"a": a["a"], "b": 0.2 * jax.random.normal(k, a["b"].shape)} for k, (p, a) in zip(keys, adapters.items())
    }


def torch_base(model, params, folder):
    """The PyTorch model loaded the way a PyTorch user loads our merged/base export."""
    save_pretrained(folder, model, params)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def torch_logits(pt_model):
    with torch.no_grad():
        return pt_model(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()


def test_our_adapter_files_round_trip(tmp_path):
    model, params, _ = toy_llama()
    adapters = trained_like_adapters(params, CONFIG)
    save_adapters(tmp_path / "ad", adapters, CONFIG, metadata={"model": "toy-llama"})
    loaded, config = load_adapters(tmp_path / "ad")
    assert config == CONFIG
    for path in adapters:
        np.testing.assert_array_equal(loaded[path]["a"], adapters[path]["a"])
    with pytest.raises(FileNotFoundError, match="has no adapters.safetensors"):
        load_adapters(tmp_path)


def test_peft_export_loads_in_pytorch_with_the_same_logits(tmp_path):
    model, params, _ = toy_llama()
    adapters = trained_like_adapters(params, CONFIG)
    ours = np.asarray(lj.with_lora(model, CONFIG)({"params": params}, adapters, jnp.asarray(IDS)).logits)
    save_peft(tmp_path / "peft", adapters, CONFIG, base_model_name_or_path="toy-llama")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (2, 4.0, True)
    assert written["target_modules"] == ["down_proj", "q_proj", "v_proj"] and written["rank_pattern"] == {
        "down_proj": 3
    }
    pt = peft.PeftModel.from_pretrained(torch_base(model, params, tmp_path / "base"), tmp_path / "peft").eval()
    np.testing.assert_allclose(torch_logits(pt), ours, atol=1e-4)
    base_only = torch_logits(torch_base(model, params, tmp_path / "base2"))
    assert np.abs(base_only - ours).max() > 1e-2  # the adapters matter


def test_a_pytorch_peft_adapter_loads_into_ours(tmp_path):
    model, params, _ = toy_llama()
    torch.manual_seed(0)
    pt_base = torch_base(model, params, tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=False, init_lora_weights=False
    )  # random A and B: a non-trivial adapter
    pt = peft.get_peft_model(pt_base, config).eval()
    pt.save_pretrained(tmp_path / "theirs")
    adapters, ours_config = load_peft(tmp_path / "theirs")
    assert (ours_config.rank, ours_config.alpha) == (4, 8.0) and len(adapters) == 6
    ours = np.asarray(lj.with_lora(model, ours_config)({"params": params}, adapters, jnp.asarray(IDS)).logits)
    np.testing.assert_allclose(ours, torch_logits(pt), atol=1e-4)


def test_merged_export_reloads_with_identical_logits_in_flax_and_pytorch(tmp_path):
    model, params, tok = toy_llama()
    adapters = trained_like_adapters(params, CONFIG)
    merged = lj.merge(params, adapters, CONFIG)
    expected = np.asarray(model(jnp.asarray(IDS), params=merged).logits)
    folder = save_pretrained(tmp_path / "merged", model, merged, tok)
    flax_model = transformers.FlaxAutoModelForCausalLM.from_pretrained(folder)
    np.testing.assert_allclose(np.asarray(flax_model(jnp.asarray(IDS)).logits), expected, atol=1e-4)
    _, reloaded, tok2 = load_model(str(folder))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS), params=reloaded).logits), expected, atol=1e-5)
    assert tok2("Hello").input_ids == tok("Hello").input_ids
    pt = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(pt), expected, atol=1e-4)


def test_tied_embeddings_stay_tied_only_while_equal(tmp_path):
    model, params, _ = toy_llama(tie_word_embeddings=True)
    params = {**params, "lm_head": {"kernel": params["model"]["embed_tokens"]["embedding"].T}}
    save_pretrained(tmp_path / "tied", model, params)
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] + 1.0  # full fine-tuning moved the head alone
    save_pretrained(tmp_path / "untied", model, params)
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    pt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "untied", torch_dtype=torch.float32)
    np.testing.assert_allclose(pt.lm_head.weight.detach().numpy(), np.asarray(params["lm_head"]["kernel"]).T)


def test_residual_adapters_fold_into_a_standard_lora():
    model, params, _ = toy_llama()
    base, initial = lj.init_adapters(params, CONFIG, key=jax.random.key(0), method="pissa")
    trained = trained_like_adapters(params, CONFIG, seed=3)
    folded, config = fold_residual(trained, initial, CONFIG)
    assert (config.rank, config.rank_pattern) == (4, (("down_proj", 6),))
    on_residual = lj.merge(base, trained, CONFIG)
    on_original = lj.merge(params, folded, config)
    for a, b in zip(jax.tree.leaves(on_residual), jax.tree.leaves(on_original)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_pytorch_names():
    model, params, _ = toy_llama()
    names = set(pytorch_state_dict(params))
    pt = transformers.LlamaForCausalLM(model.config)
    assert names == set(pt.state_dict()) - {k for k in pt.state_dict() if "rotary" in k}
