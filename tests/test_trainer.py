"""The trainer (train/): configs, every method end to end on a tiny model, resume after SIGKILL, errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import lora_one_jax as lj
from lora_one_jax.export import load_adapters
from lora_one_train import checkpoint as ckpt_mod
from lora_one_train.config import CONFIG_DIR, METHODS, ConfigError, RunConfig, load_config, parse_overrides
from lora_one_train.errors import DataError
from lora_one_train.run import run

ROOT = Path(__file__).resolve().parents[1]


def parity_task(tmp_path, n=48):
    path = tmp_path / "parity.jsonl"
    rows = [{"q": f"Is {i} even?", "choices": ["no", "yes"], "label": int(i % 2 == 0)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tmp_path, **over) -> dict:
    cfg = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs" / "{name}"),
        "seed": 0,
        "methods": ["lora-one"],
        "model": {"spec": "toy-llama"},
        "task": {
            "spec": f"jsonl:{parity_task(tmp_path)}",
            "max_len": 32,
            "eval_size": 8,
            "options": {"fields": {"prompt": "q", "choices": "choices", "label": "label"}},
        },
        "lora": {"rank": 2, "alpha": 4.0, "rslora": True, "targets": ["q_proj", "v_proj", "down_proj"]},
        "init": {"grad_examples": 4},
        "optim": {"learning_rate": 5e-3, "warmup_steps": 1},
        "train": {"steps": 4, "batch_size": 4, "log_every": 2},
        "eval": {"every": 2, "limit": 8, "batch_size": 4},
        "checkpoint": {"every": 2, "keep": 2},
        "export": {"adapters": True, "peft": True, "merged": False},
    }
    for key, value in over.items():
        section, _, leaf = key.partition(".")
        if leaf:
            cfg.setdefault(section, {})[leaf] = value
        else:
            cfg[section] = value
    return cfg


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses_and_validates(path):
    cfg = load_config(str(path))
    assert cfg.methods and all(m in METHODS for m in cfg.methods)
    assert cfg.lora.rank >= 1 and cfg.optim.learning_rate > 0
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # round trip


@pytest.mark.parametrize("name, devices", [("pod-tpu-v5e-16", 16), ("pod-tpu-v4-32", 16), ("gpu-8", 8)])
def test_pod_configs_fill_their_machines(name, devices):
    cfg = load_config(name)
    m = cfg.mesh
    assert m.data * m.fsdp * m.tensor == devices
    assert cfg.train.batch_size % (m.data * m.fsdp) == 0
    assert m.distributed == name.startswith("pod")


def test_paper_setups_match_the_paper():
    math_cfg = load_config("math-llama2-7b")
    assert (math_cfg.lora.rank, math_cfg.lora.alpha, math_cfg.lora.rslora, math_cfg.lora.targets) == (
        8,
        16.0,
        True,
        "all-linear",
    )
    assert (math_cfg.optim.learning_rate, math_cfg.optim.warmup_steps, math_cfg.optim.schedule) == (2e-4, 100, "linear")
    assert (math_cfg.train.batch_size * math_cfg.train.grad_accum, math_cfg.train.epochs) == (32, 1)
    assert (math_cfg.init.grad_examples, math_cfg.init.grad_batch_size, math_cfg.init.gamma) == (8, 1, 128.0)
    cs = load_config("commonsense-llama2-7b")
    assert (cs.lora.rank, cs.lora.alpha, cs.lora.rslora, cs.lora.dropout) == (16, 16.0, True, 0.05)
    assert set(cs.lora.targets) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert (cs.optim.learning_rate, cs.train.epochs, cs.train.batch_size * cs.train.grad_accum) == (5e-5, 3, 16)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\] in section 'train'; valid keys: \['steps'"):
        RunConfig.from_dict({"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trian'\]; valid top-level keys"):
        RunConfig.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['lora-two'\]"):
        RunConfig.from_dict({"methods": ["lora-two"]})
    with pytest.raises(ConfigError, match=r"optim.learning_rate must be > 0"):
        RunConfig.from_dict({"optim": {"learning_rate": -1.0}})
    with pytest.raises(ConfigError, match=r"section 'lora': unknown LoraConfig key\(s\) \['rnak'\]"):
        RunConfig.from_dict({"lora": {"rnak": 4}})
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="neither a file nor a name"):
        load_config("no-such-config")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_every_method_end_to_end(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(tmp_path, methods=list(METHODS), **{"export.merged": True}))
    out = run(cfg, progress=False)
    folder = cfg.out_dir
    assert (folder / "summary.md").is_file() and (folder / "curves.png").stat().st_size > 1000
    for method in METHODS:
        r = out["methods"][method]
        assert r["steps"] == 4 and r["metric"] == "accuracy"
        assert np.isfinite(r["train_loss_last"]) and np.isfinite(r["answer_loss_after"])
        assert [e["step"] for e in r["history"] if "eval/score" in e] == [0, 2, 4]
        assert len(r["compiled_step_shapes"]) == 1  # every batch fits the 16-token bucket here
        logged = [json.loads(line) for line in (folder / method / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in logged if "loss" in x] == [1, 2, 3, 4]
        assert (folder / method / "merged" / "model.safetensors").is_file()
        if method != "full":
            adapters, config = load_adapters(folder / method / "adapters")
            assert config == cfg.lora and len(adapters) == 6  # 2 layers x 3 targets
            assert (folder / method / "peft" / "adapter_config.json").is_file()
    # identical data and seed: the methods with the same init start from the same step-0 evaluation
    first = {m: out["methods"][m]["history"][0]["eval/answer_loss"] for m in METHODS}
    assert first["lora"] == first["lora-precond"] == first["full"]  # B = 0: the base model
    assert first["lora-one"] == first["lora-one-init"] != first["lora"]  # the spectral init moves the model at step 0


@pytest.mark.slow
def test_residual_inits_export_what_was_trained(tmp_path):
    """PiSSA trains on a residual base; its merged model and its PEFT export (folded) must agree."""
    from lora_one_jax.export import load_peft
    from lora_one_jax.models import load_model

    cfg = RunConfig.from_dict(tiny_config(tmp_path, methods=["pissa"], **{"export.merged": True}))
    run(cfg, progress=False)
    model, params, _ = load_model("toy-llama")
    merged, _, _ = load_model(str(cfg.out_dir / "pissa" / "merged"))
    _, merged_params, _ = load_model(str(cfg.out_dir / "pissa" / "merged"))
    peft_adapters, peft_config = load_peft(cfg.out_dir / "pissa" / "peft")
    ids = jnp.asarray([[5, 9, 17, 33, 2, 8]])
    via_peft = lj.with_lora(model, peft_config)({"params": params}, peft_adapters, ids).logits
    via_merged = model(ids, params=merged_params).logits
    np.testing.assert_allclose(via_peft, via_merged, atol=1e-5)


def test_missing_dataset_and_unwritable_output(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(tmp_path, **{"task.spec": f"jsonl:{tmp_path / 'missing.jsonl'}"}))
    with pytest.raises(DataError, match=r"task 'jsonl:.*missing.jsonl' could not be loaded: .* does not exist"):
        run(cfg, progress=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ckpt_mod.CheckpointError, match=r"checkpoint folder .*a-file.* is not writable"):
        ckpt_mod.Checkpointer(blocker / "checkpoints")


def test_a_failed_save_raises_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = ckpt_mod.Checkpointer(tmp_path / "ckpt", keep=2)
    state = {"w": np.arange(4, dtype=np.float32)}
    ckpt.save(1, state, {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", disk_full)
    with pytest.raises(
        ckpt_mod.CheckpointError, match=r"saving checkpoint 2 .* No space left on device.*step 1\) is intact"
    ):
        ckpt.save(2, {"w": state["w"] + 1}, {"step": 2})
    monkeypatch.undo()
    restored, record = ckpt.restore({"w": np.zeros(4, np.float32)})
    assert record["step"] == 1 and restored["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------- resume after SIGKILL


def cli(config_path, *extra):
    env = {**os.environ, "LORA_ONE_PROGRESS": "0", "XLA_FLAGS": ""}
    return [sys.executable, "-m", "lora_one_train", str(config_path), *extra], env


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    base = tiny_config(
        tmp_path,
        methods=["lora-one"],
        **{"train.steps": 14, "train.log_every": 1, "checkpoint.every": 2, "eval.every": 0},
    )
    base["lora"]["dropout"] = 0.1  # the RNG must resume too
    paths = {}
    for name in ("killed", "straight"):
        cfg = {**base, "name": name}
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    cmd, env = cli(paths["killed"])
    log = tmp_path / "runs" / "killed" / "lora-one" / "metrics.jsonl"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines()] if log.exists() else []
        if steps and max(steps) >= 7 and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # mid-training, between checkpoints 6 and 8
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the run never reached step 7")
    proc.wait()
    assert not (tmp_path / "runs" / "killed" / "lora-one" / "adapters").exists()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)  # the same command again: resumes
    cmd, env = cli(paths["straight"])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    killed, _ = load_adapters(tmp_path / "runs" / "killed" / "lora-one" / "adapters")
    straight, _ = load_adapters(tmp_path / "runs" / "straight" / "lora-one" / "adapters")
    for path in straight:
        np.testing.assert_array_equal(killed[path]["a"], straight[path]["a"])
        np.testing.assert_array_equal(killed[path]["b"], straight[path]["b"])
    summary = json.loads((tmp_path / "runs" / "killed" / "lora-one" / "summary.json").read_text())
    assert summary["resumed_from"] in (6, 8)
    logged = [json.loads(x)["step"] for x in log.read_text().splitlines() if "loss" in json.loads(x)]
    assert logged == list(range(1, 15)), "the log holds every step exactly once"


def test_rerun_with_another_config_refuses_to_resume(tmp_path):
    cfg = tiny_config(tmp_path, methods=["lora"], **{"train.steps": 2, "eval.every": 0})
    run(RunConfig.from_dict(cfg), progress=False)
    cfg["optim"]["learning_rate"] = 1e-2
    cfg["train"]["steps"] = 4
    with pytest.raises(ConfigError, match="holds checkpoints of another configuration"):
        run(RunConfig.from_dict(cfg), progress=False)


@pytest.mark.slow
def test_an_encoder_decoder_trains_end_to_end(tmp_path):
    """T5-style: the prompt goes into the encoder, the label word comes out of the decoder."""
    path = tmp_path / "sentiment.jsonl"
    rows = [{"text": f"review {i}: {'great' if i % 2 else 'awful'} film", "label": i % 2} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path, methods=["lora", "lora-one"], **{"model.spec": "toy-t5", "export.merged": True})
    cfg["task"] = {
        "spec": f"jsonl:{path}",
        "max_len": 32,
        "eval_size": 8,
        "options": {
            "template": "sst2 sentence: {text}",
            "fields": {"label": "label"},
            "choices": ["negative", "positive"],
        },
    }
    cfg["lora"]["targets"] = "all-linear"
    out = run(RunConfig.from_dict(cfg), progress=False)
    for method in ("lora", "lora-one"):
        r = out["methods"][method]
        assert r["metric"] == "accuracy" and np.isfinite(r["answer_loss_after"])
        assert r["train_loss_last"] < r["train_loss_first"]
        assert all(len(shape) == 2 for shape in r["compiled_step_shapes"])  # (encoder, decoder) lengths
    first = {m: out["methods"][m]["history"][0]["eval/answer_loss"] for m in ("lora", "lora-one")}
    assert first["lora-one"] < first["lora"]  # the spectral init already lowers the held-out loss at step 0


def test_bfloat16_compute_trains_float32_adapters(tmp_path):
    cfg = tiny_config(
        tmp_path,
        methods=["lora-one"],
        **{"model.dtype": "bfloat16", "train.steps": 2, "eval.every": 0, "checkpoint.every": 0},
    )
    out = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora-one"]
    trainable, _ = out["final_state"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))  # LoraConfig.dtype
    assert np.isfinite(out["train_loss_last"]) and np.isfinite(out["answer_loss_after"])


def test_logits_only_where_the_loss_is_and_remat_train_like_the_full_logits(tmp_path):
    """train.loss_positions (the head only at answer tokens), vocab_chunk and remat change memory, not the maths."""
    over = {"methods": ["lora-one"], "train.steps": 3, "eval.every": 0, "checkpoint.every": 0}
    full = tiny_config(tmp_path, **{**over, "name": "full", "train.loss_positions": False})
    lean = tiny_config(tmp_path, **{**over, "name": "lean", "train.vocab_chunk": 64, "train.remat": "layers"})
    losses = {}
    for cfg in (full, lean):
        history = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora-one"]["history"]
        losses[cfg["name"]] = [r["loss"] for r in history if "loss" in r]
    np.testing.assert_allclose(losses["lean"], losses["full"], rtol=1e-5)


# ----------------------------------------------------------------------------- the streamed gradient stage


@pytest.mark.parametrize("stream", [{"init.kernels_per_pass": 1}, {"init.max_bytes": 2 * 64 * 128 * 4}])
def test_streamed_gradient_stage_gives_the_one_pass_inits_and_diagnostics(tmp_path, monkeypatch, stream):
    """init.kernels_per_pass / init.max_bytes: one group of kernels per pass; the initial adapters (LoRA-One at a
    fixed gamma and at gamma: auto, LoRA-GA and its residual base), the diagnostics and the first losses are
    the one-pass run's."""
    from lora_one_jax import gradient_stage
    from lora_one_train.method import initial_adapters
    from lora_one_train.run import estimate_gradient, load

    held = []
    real = gradient_stage.estimate_gradient
    monkeypatch.setattr(gradient_stage, "estimate_gradient", lambda *a, **k: held.append(k["modules"]) or real(*a, **k))
    over = {
        "methods": ["lora-one", "lora-ga"],
        "init.svd": "exact",
        "train.steps": 2,
        "eval.every": 0,
        "eval.diagnostics": True,
        "checkpoint.every": 0,
        "export": {},
    }
    cfgs = {
        name: RunConfig.from_dict(tiny_config(tmp_path, name=name, **over, **extra))
        for name, extra in (("one", {}), ("streamed", stream))
    }
    stages, starts, runs = {}, {}, {}
    for name, cfg in cfgs.items():
        held.clear()
        ctx = load(cfg, progress=False)
        stages[name] = estimate_gradient(ctx)
        auto = dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, init=dataclasses.replace(cfg.init, gamma="auto")))
        starts[name] = {
            "lora-one": initial_adapters(ctx, "lora-one", stages[name]),
            "lora-ga": initial_adapters(ctx, "lora-ga", stages[name]),
            "auto": initial_adapters(auto, "lora-one", stages[name]),
        }
        # what one pass holds: every targeted kernel's gradients (3 estimates: two halves and the whole)
        most = max(map(len, held))
        assert most == (6 if name == "one" else 1 if "init.kernels_per_pass" in stream else 2), held
        runs[name] = run(cfg, progress=False)["methods"]
    assert stages["one"].passes == 1 and stages["streamed"].passes == (6 if "init.kernels_per_pass" in stream else 4)
    for kind, (base, adapters, chosen) in starts["one"].items():
        got_base, got, got_chosen = starts["streamed"][kind]
        assert got_chosen.get("init/gamma") == chosen.get("init/gamma")
        for path in adapters:
            want = np.asarray(adapters[path]["a"] @ adapters[path]["b"])
            have = np.asarray(got[path]["a"] @ got[path]["b"])
            np.testing.assert_allclose(have, want, atol=1e-5 * np.abs(want).max(), err_msg=f"{kind} {path}")
        for x, y in zip(jax.tree.leaves(got_base), jax.tree.leaves(base)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    for method in over["methods"]:
        first, streamed = runs["one"][method]["history"], runs["streamed"][method]["history"]
        losses = [[r["loss"] for r in history if "loss" in r] for history in (streamed, first)]
        np.testing.assert_allclose(*losses, rtol=1e-5)
        step0, step0_streamed = first[0], streamed[0]
        keys = [k for k in step0 if k.startswith(("align/", "grad_stability/"))]
        assert any(k.startswith("grad_stability/") for k in keys) and any(k.startswith("align/") for k in keys)
        np.testing.assert_allclose([step0_streamed[k] for k in keys], [step0[k] for k in keys], atol=1e-2)


def test_streaming_keys_are_checked():
    assert RunConfig.from_dict({"init": {"kernels_per_pass": 3}}).init.kernels_per_pass == 3
    with pytest.raises(ConfigError, match="init.kernels_per_pass must be a positive integer, got 0"):
        RunConfig.from_dict({"init": {"kernels_per_pass": 0}})
    with pytest.raises(ConfigError, match="init.max_bytes must be a positive integer, got '1GB'"):
        RunConfig.from_dict({"init": {"max_bytes": "1GB"}})
    with pytest.raises(ConfigError, match="give init.kernels_per_pass or init.max_bytes, not both"):
        RunConfig.from_dict({"init": {"kernels_per_pass": 3, "max_bytes": 1 << 30}})
