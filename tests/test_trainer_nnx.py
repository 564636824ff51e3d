"""The trainer on an NNX model (issue 16): model.backend nnx trains, checkpoints, resumes and exports like linen."""

import json

import numpy as np
import pytest

pytest.importorskip("tunix")

from lora_one_train.config import RunConfig, load_config
from lora_one_train.run import run
from tests.test_trainer import tiny_config


def test_nnx_backend_trains_like_linen_and_exports_hf_names(tmp_path):
    over = {"methods": ["lora", "lora-one"], "train.steps": 3, "eval.every": 0, "checkpoint.every": 2}
    linen = run(RunConfig.from_dict(tiny_config(tmp_path, **{**over, "name": "linen"})), progress=False)
    cfg = tiny_config(tmp_path, **{**over, "name": "nnx", "model.backend": "nnx"})
    nnx = run(RunConfig.from_dict(cfg), progress=False)
    # LoRA-One's init is deterministic: the same model through tunix's Llama3 trains the same way
    losses = {
        k: [r["loss"] for r in out["methods"]["lora-one"]["history"] if "loss" in r]
        for k, out in (("linen", linen), ("nnx", nnx))
    }
    np.testing.assert_allclose(losses["nnx"], losses["linen"], rtol=1e-3)
    for key in ("answer_loss_before", "answer_loss_after"):
        assert nnx["methods"]["lora-one"][key] == pytest.approx(linen["methods"]["lora-one"][key], rel=1e-3)
    # LoRA's random A is drawn per module in path order (tunix's paths sort differently): only step 0 is equal
    assert nnx["methods"]["lora"]["answer_loss_before"] == pytest.approx(
        linen["methods"]["lora"]["answer_loss_before"], rel=1e-6
    )
    assert np.isfinite(nnx["methods"]["lora"]["answer_loss_after"])
    peft = json.loads((tmp_path / "runs" / "nnx" / "lora-one" / "peft" / "adapter_config.json").read_text())
    assert peft["r"] == 2
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "runs" / "nnx" / "lora-one" / "peft" / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A") for k in keys)
    again = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora-one"]  # finished: resumes, no training
    assert again["resumed_from"] == 3 and again["answer_loss_after"] == nnx["methods"]["lora-one"]["answer_loss_after"]


def test_the_shipped_nnx_config_uses_the_nnx_backend():
    cfg = load_config("nnx-smollm2")
    assert cfg.model.backend == "nnx" and cfg.model.spec == "smollm2-135m"


def test_nnx_backend_scores_a_number_task_by_exact_match_like_linen(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"q": f"{i} + {i % 7} =", "a": f" {i + i % 7}"}) + "\n" for i in range(40)))
    over = {
        "task.spec": f"jsonl:{path}",
        "task.options": {"fields": {"prompt": "q", "answer": "a"}, "kind": "number"},
        "train.steps": 2,
        "eval.every": 2,
        "eval.score": True,
        "eval.max_new_tokens": 4,
        "checkpoint.every": 0,
        "export.peft": False,
        "export.adapters": False,
    }
    out = {
        backend: run(
            RunConfig.from_dict(tiny_config(tmp_path, **over, name=backend, **{"model.backend": backend})),
            progress=False,
        )
        for backend in ("linen", "nnx")
    }
    results = {k: v["methods"]["lora-one"] for k, v in out.items()}
    evals = [r for r in results["nnx"]["history"] if "eval/score" in r]
    assert evals and all(r["eval/metric"] == "exact_match" for r in evals)
    for key in ("score_before", "score_after"):  # greedy generation through tunix's Llama3 = through linen
        assert results["nnx"][key] is not None and results["nnx"][key] == results["linen"][key]
    for key in ("answer_loss_before", "answer_loss_after"):
        assert results["nnx"][key] == pytest.approx(results["linen"][key], rel=1e-3)
