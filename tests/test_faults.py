"""The trainer under faults (issue 15): NaN state, interrupted logs, concurrent runs, refused reruns,
damaged checkpoints, changed data. Tiny runs on the toy model; each case is the user's own command."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from lora_one_jax.export import load_adapters
from lora_one_train import errors
from lora_one_train import method as method_module
from lora_one_train.checkpoint import Checkpointer
from lora_one_train.config import ConfigError, RunConfig
from lora_one_train.run import run
from tests.test_trainer import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def base_config(tmp_path, **over) -> dict:
    """The issue's ``base.yaml``: toy-llama on a 40-row jsonl task, rank 4 on q/v, 4 steps of 4, checkpoints every 2."""
    cfg = tiny_config(tmp_path, **{"methods": ["lora"], "eval.every": 0, "train.log_every": 1, **over})
    cfg["lora"] = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}
    return cfg


def logged(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_non_finite_state_is_never_checkpointed_and_restart_recovers(tmp_path):
    cfg = base_config(tmp_path, methods=["lora-one"], **{"optim.learning_rate": 1.0e30, "train.log_every": 5})
    with pytest.raises(errors.DivergedError, match=r"nan .*at step 3, the first.*Lower optim.learning_rate.*--restart"):
        run(RunConfig.from_dict(cfg), progress=False)
    folder = tmp_path / "runs" / "tiny" / "lora-one"
    checkpointer = Checkpointer(folder / "checkpoints")
    assert checkpointer.steps() == [2]  # the checkpoint of step 4 was never written
    state, record = checkpointer.restore(like_state(tmp_path), step=2)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    assert [r["step"] for r in record["history"] if "loss" in r] == [1, 2]
    assert not (folder / "adapters").exists()
    cfg["optim"]["learning_rate"] = 5e-3
    with pytest.raises(ConfigError, match=r"optim.learning_rate: 1e\+30 -> 0.005"):
        run(RunConfig.from_dict(cfg), progress=False)
    out = run(RunConfig.from_dict({**cfg, "restart": True}), progress=False)["methods"]["lora-one"]
    assert out["resumed_from"] is None and np.isfinite(out["train_loss_last"])


def like_state(tmp_path):
    """The shapes of base_config's checkpointed state (a fresh run's, 1 step, no checkpoints)."""
    cfg = base_config(tmp_path, methods=["lora-one"], **{"train.steps": 1, "checkpoint.every": 0, "name": "shapes"})
    trainable, opt_state = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora-one"]["final_state"]
    return {"trainable": trainable, "opt_state": opt_state}


def test_an_interrupted_run_keeps_every_loss_before_its_checkpoint(tmp_path, monkeypatch):
    cfg = base_config(tmp_path, **{"train.log_every": 4, "checkpoint.every": 2, "eval.every": 3})
    straight = run(RunConfig.from_dict({**cfg, "name": "straight"}), progress=False)["methods"]["lora"]
    evaluate = method_module.evaluate

    def killed_at_step_3(ctx, job, state):
        if state.step == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, after checkpoint 2 and before the log at 4
        return evaluate(ctx, job, state)

    monkeypatch.setattr(method_module, "evaluate", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(RunConfig.from_dict(cfg), progress=False)
    folder = tmp_path / "runs" / "tiny" / "lora"
    assert [r["step"] for r in logged(folder) if "loss" in r][:2] == [1, 2]
    monkeypatch.undo()
    (folder / "metrics.jsonl").unlink()  # even without the log the summary knows the step-0 evaluation
    resumed = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora"]
    assert resumed["resumed_from"] == 2
    assert [r["step"] for r in logged(folder) if "loss" in r] == [1, 2, 3, 4]
    for key in ("train_loss_first", "train_loss_last", "answer_loss_before", "answer_loss_after", "score_before"):
        assert resumed[key] == straight[key], key
    assert resumed["answer_loss_before"] != resumed["answer_loss_after"]


def test_a_refused_rerun_writes_nothing_and_names_each_difference(tmp_path):
    cfg = base_config(tmp_path, **{"train.steps": 2})
    run(RunConfig.from_dict(cfg), progress=False)
    cfg["init"] = {**cfg.get("init", {}), "kernels_per_pass": 1}  # memory only: a rerun may stream
    run(RunConfig.from_dict(cfg), progress=False)
    saved = (tmp_path / "runs" / "tiny" / "config.yaml").read_bytes()
    cfg["optim"]["learning_rate"] = 1e-2
    cfg["train"]["batch_size"] = 2
    with pytest.raises(ConfigError) as refused:
        run(RunConfig.from_dict(cfg), progress=False)
    message = str(refused.value)
    assert "optim.learning_rate: 0.005 -> 0.01" in message and "train.batch_size: 4 -> 2" in message
    assert "--restart" in message
    assert (tmp_path / "runs" / "tiny" / "config.yaml").read_bytes() == saved


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    cfg = base_config(tmp_path, **{"train.steps": 3, "checkpoint.every": 1, "checkpoint.keep": 3})
    run(RunConfig.from_dict({**cfg, "name": "straight"}), progress=False)
    run(RunConfig.from_dict(cfg), progress=False)
    folder = tmp_path / "runs" / "tiny" / "lora"
    victim = largest_file(folder / "checkpoints" / "3" / "state")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated array file
    capsys.readouterr()
    out = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora"]
    err = capsys.readouterr().err
    assert "checkpoint 3 is unreadable" in err and "trying the one before it" in err
    assert len([line for line in err.splitlines() if "checkpoint" in line]) == 2  # unreadable; moved aside
    assert out["resumed_from"] == 2
    resumed, _ = load_adapters(folder / "adapters")
    straight, _ = load_adapters(tmp_path / "runs" / "straight" / "lora" / "adapters")
    for path in straight:  # step 3 trained again from checkpoint 2: the same adapters, bit for bit
        np.testing.assert_array_equal(resumed[path]["a"], straight[path]["a"])
        np.testing.assert_array_equal(resumed[path]["b"], straight[path]["b"])


def test_resuming_on_changed_data_is_refused(tmp_path):
    cfg = base_config(tmp_path, **{"train.steps": 2})
    run(RunConfig.from_dict(cfg), progress=False)
    data = Path(cfg["task"]["spec"].removeprefix("jsonl:"))
    data.write_text(data.read_text() + json.dumps({"q": "Is 99 even?", "choices": ["no", "yes"], "label": 0}) + "\n")
    with pytest.raises(errors.DataError, match=r"changed since .* was checkpointed.*--restart"):
        run(RunConfig.from_dict(cfg), progress=False)


def test_the_run_says_how_much_data_it_uses(tmp_path, capsys):
    cfg = base_config(tmp_path, **{"train.steps": 1, "eval.limit": 500})
    run(RunConfig.from_dict(cfg), progress=False)
    out = capsys.readouterr().out
    assert "48 rows read, 0 duplicate prompts dropped, 40 train, 8 held-out" in out
    assert "eval limit 500 is more than the 8 held-out examples: all 8 are scored" in out


@pytest.mark.slow
def test_two_runs_into_one_folder_the_second_is_refused(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, **{"train.steps": 40})))
    env = {**os.environ, "LORA_ONE_PROGRESS": "0", "XLA_FLAGS": ""}
    first = subprocess.Popen([sys.executable, "-m", "lora_one_train", str(path)], cwd=ROOT, env=env)
    lock = tmp_path / "runs" / "tiny" / ".lock"
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.1)
    second = subprocess.run(
        [sys.executable, "-m", "lora_one_train", str(path), "--set", "optim.learning_rate=1e-4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    first.kill()
    first.wait()
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "tiny" / "lora" / "adapters").exists()


def test_a_finished_run_reruns_without_training(tmp_path):
    cfg = base_config(tmp_path, **{"train.steps": 2})
    first = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora"]
    again = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora"]
    assert again["resumed_from"] == 2 and again["answer_loss_after"] == first["answer_loss_after"]
    a, _ = load_adapters(tmp_path / "runs" / "tiny" / "lora" / "adapters")
    assert all(np.isfinite(v["a"]).all() for v in a.values())
