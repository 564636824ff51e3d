"""Metrics loggers: metrics.jsonl, TensorBoard event files read back, W&B calls, resume and process 0 only."""

import importlib.machinery
import json
import math
import struct
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from lora_one_train.config import ConfigError, LoggingConfig, RunConfig
from lora_one_train.loggers import JsonlLogger, TensorBoardLogger, make_loggers, plain, read_metrics, read_scalars

TRAIN = [(step, {"train/loss": 3.0 / step, "lr": 1e-4 * step}) for step in range(1, 7)]
EVAL = [(step, {"eval/answer_loss": 2.0 - 0.1 * step, "eval/score": 0.25 + step / 100, "eval/metric": "accuracy"})
        for step in (0, 3, 6)]  # fmt: skip


def log_run(loggers, records):
    for step, record in sorted(records, key=lambda r: r[0]):
        for logger in loggers:
            logger.log(step, record)
    for logger in loggers:
        logger.close()


def test_default_loggers_write_jsonl_and_tensorboard_with_loss_and_eval_at_their_steps(tmp_path):
    cfg = RunConfig.from_dict({"name": "demo", "methods": ["lora"]})
    loggers = make_loggers(
        cfg.logging, tmp_path, run_name=cfg.logging.name_for(cfg.name, "lora"), config=cfg.to_dict(), process_index=0
    )
    assert [type(x).__name__ for x in loggers] == ["JsonlLogger", "TensorBoardLogger"]
    log_run(loggers, TRAIN + EVAL)

    written = sorted(TRAIN + EVAL, key=lambda r: r[0])
    assert read_metrics(tmp_path) == [{"step": s, **r} for s, r in written]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"train/loss", "lr", "eval/answer_loss", "eval/score"}  # strings are not scalars
    for tag in scalars:
        expected = [(s, float(np.float32(r[tag]))) for s, r in written if tag in r]
        assert scalars[tag] == expected, tag
    assert scalars["eval/answer_loss"][0] == (0, float(np.float32(2.0)))


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum, computed here from its definition (CRC-32C, rotated and offset)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_event_files_are_valid_tfrecords(tmp_path):
    logger = TensorBoardLogger(tmp_path, config={"seed": 0})
    log_run([logger], TRAIN[:2])
    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    data, offset, count = path.read_bytes(), 0, 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[offset + 8 : offset + 12])[0] == masked_crc32c(header)
        payload = data[offset + 12 : offset + 12 + length]
        assert struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])[0] == masked_crc32c(payload)
        offset, count = offset + 16 + length, count + 1
    assert offset == len(data) and count >= 4  # the file version, the config text, 2 steps x 2 scalars


def test_a_resumed_run_replaces_what_was_logged_after_its_checkpoint(tmp_path):
    first = make_loggers(LoggingConfig(), tmp_path, run_name="r", config={}, process_index=0)
    log_run(first, TRAIN)  # killed after step 6; the last checkpoint was step 4
    again = [(s, {"train/loss": -float(s)}) for s in (5, 6)]
    log_run(make_loggers(LoggingConfig(), tmp_path, run_name="r", config={}, resume_step=4, process_index=0), again)

    expected = [(s, r["train/loss"]) for s, r in TRAIN[:4]] + [(5, -5.0), (6, -6.0)]
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == expected
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(s, float(np.float32(v))) for s, v in expected]
    assert read_scalars(tmp_path / "tensorboard")["lr"] == [(s, float(np.float32(r["lr"]))) for s, r in TRAIN[:4]]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_jsonl_appends_to_what_the_file_holds(tmp_path):
    log_run([JsonlLogger(tmp_path)], TRAIN[:2])
    log_run([JsonlLogger(tmp_path)], TRAIN[2:3])
    log_run([JsonlLogger(tmp_path, resume_step=3)], [])  # nothing after step 3: the file is left as it is
    assert read_metrics(tmp_path) == [{"step": s, **r} for s, r in TRAIN[:3]]


def test_only_the_first_process_writes(tmp_path):
    assert make_loggers(LoggingConfig(), tmp_path / "x", run_name="r", config={}, process_index=1) == []
    assert not (tmp_path / "x").exists()


def test_records_take_numpy_and_jax_scalars_and_keep_nans(tmp_path):
    log_run([JsonlLogger(tmp_path)], [(2, {"loss": jnp.float32(0.5), "n": np.int64(3), "bad": float("nan")})])
    (record,) = read_metrics(tmp_path)
    assert record["loss"] == 0.5 and record["n"] == 3 and math.isnan(record["bad"])
    assert type(record["n"]) is int
    with pytest.raises(TypeError, match="metric 'loss' is a ndarray; log numbers"):
        plain({"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="no 'step'"):
        plain({"step": 3})


def test_wandb_listed_but_not_installed_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"lists 'wandb' but wandb is not installed; `pip install wandb`"):
        RunConfig.from_dict({"logging": {"loggers": ["jsonl", "tensorboard", "wandb"]}})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"loggers": ["jsonl", "mlflow"]}, r"unknown or repeated; choose from \['jsonl', 'tensorboard', 'wandb'\]"),
        ({"loggers": ["tensorboard"]}, "must include 'jsonl'"),
        ({"loggers": ["jsonl", "jsonl"]}, "unknown or repeated"),
        ({"run_name": "{name}-{metod}"}, r"unknown placeholder \{metod\}; valid: \{name\}, \{method\}"),
        ({"project": ""}, "logging.project must be a non-empty string"),
        ({"projekt": "x"}, r"unknown key\(s\) \['projekt'\] in section 'logging'"),
    ],
)
def test_bad_logging_sections(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"logging": values})


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", step, data))

    def finish(self):
        self.calls.append(("finish",))


def fake_wandb(calls):
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    ids = iter(["id1", "id2"])
    module.util = types.SimpleNamespace(generate_id=lambda: next(ids))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls)

    module.init = init
    return module


def test_wandb_gets_the_project_name_config_and_steps_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    cfg = RunConfig.from_dict({"name": "demo", "logging": {"loggers": ["jsonl", "wandb"], "project": "p"}})
    name = cfg.logging.name_for(cfg.name, "lora-one")
    log_run(make_loggers(cfg.logging, tmp_path, run_name=name, config={"seed": 0}, process_index=0), EVAL[:1])
    log_run(make_loggers(cfg.logging, tmp_path, run_name=name, config={}, resume_step=3, process_index=0), EVAL[2:])
    init1, log1, finish1, init2, log2, _ = calls
    expected = {"project": "p", "name": "demo/lora-one", "config": {"seed": 0}, "dir": str(tmp_path), "id": "id1"}
    assert init1 == ("init", {**expected, "resume": "allow"})
    assert log1 == ("log", 0, EVAL[0][1]) and finish1 == ("finish",)
    assert init2[1]["id"] == "id1" and log2 == ("log", 6, EVAL[2][1])  # the same W&B run, continued
    assert json.loads(json.dumps(read_metrics(tmp_path))) == [{"step": 0, **EVAL[0][1]}, {"step": 6, **EVAL[2][1]}]
