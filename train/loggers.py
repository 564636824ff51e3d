"""Where a run's metrics go: ``metrics.jsonl``, TensorBoard event files, Weights & Biases.

``make_loggers(cfg.logging, folder, run_name=..., config=...)`` returns the loggers the config lists (none on
processes other than the first: every process computes, one writes). Each has ``log(step, record)`` (a flat
dict of numbers, strings or None) and ``close()``. They append to what is there; on resume (``resume_step``,
the checkpoint's step) each drops or hides what the interrupted process logged after that step, so that the
logs read as one uninterrupted run (a fresh start deletes the folder first).

Example:
    >>> import tempfile
    >>> from lora_one_train.config import LoggingConfig
    >>> folder = Path(tempfile.mkdtemp())
    >>> loggers = make_loggers(LoggingConfig(loggers=["jsonl"]), folder, run_name="demo", config={}, process_index=0)
    >>> for logger in loggers:
    ...     logger.log(1, {"loss": 2.5, "lr": 1e-4})
    ...     logger.close()
    >>> read_metrics(folder)
    [{'step': 1, 'loss': 2.5, 'lr': 0.0001}]
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"

Value = int | float | str | None


class Logger(Protocol):
    """What every logger does."""

    def log(self, step: int, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def plain(record: Mapping[str, Any]) -> dict[str, Value]:
    """``record`` with numpy/JAX scalars as Python numbers; anything else than numbers, strings or None is an error.

    Example:
        >>> plain({"loss": np.float32(0.5), "method": "lora", "score": None, "ok": True})
        {'loss': 0.5, 'method': 'lora', 'score': None, 'ok': True}
    """
    out = {}
    for key, value in record.items():
        if key == "step":
            raise ValueError("a record holds no 'step': it is log()'s first argument")
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, (str, bytes)):
            value = value.item()
        if value is not None and not isinstance(value, (int, float, str)):
            raise TypeError(f"metric {key!r} is a {type(value).__name__}; log numbers, strings or None")
        out[key] = value
    return out


def read_metrics(folder) -> list[dict]:
    """The records of ``folder/metrics.jsonl`` (``[]`` when there is none).

    Example:
        >>> read_metrics("/nonexistent")
        []
    """
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlLogger:
    """Appends ``{"step": step, **record}`` lines to ``folder/metrics.jsonl``, each flushed as written.

    Records are appended to what the file holds; a resumed run (``resume_step``) first drops the records after
    its checkpoint's step (logged by the interrupted process, and about to be logged again).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> logger = JsonlLogger(folder)
        >>> for step in (1, 2, 3):
        ...     logger.log(step, {"loss": float(step)})
        >>> logger.close()
        >>> JsonlLogger(folder, resume_step=2).close()  # resumed from the checkpoint of step 2
        >>> [r["step"] for r in read_metrics(folder)]
        [1, 2]
    """

    def __init__(self, folder, *, resume_step: int | None = None):
        self.path = Path(folder) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            records = read_metrics(folder)
            kept = [r for r in records if r["step"] <= resume_step]
            if len(kept) != len(records):
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = None

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 (held open for the run, closed in close())
        self._file.write(json.dumps({"step": int(step), **plain(record)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLogger:
    """Scalars (the numeric values of each record) in TensorBoard event files under ``folder/tensorboard/``.

    On resume, TensorBoard is told to discard the steps after ``resume_step`` written by the interrupted
    process; the run's config is written once as text.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> tb = TensorBoardLogger(folder, config={"seed": 0})
        >>> tb.log(5, {"train/loss": 1.5, "method": "lora"}); tb.close()
        >>> read_scalars(folder / "tensorboard")
        {'train/loss': [(5, 1.5)]}
    """

    def __init__(self, folder, *, config: Mapping | None = None, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.logdir = Path(folder) / TENSORBOARD_DIR
        purge = None if resume_step is None else resume_step + 1
        suffix = f".{uuid.uuid4().hex[:8]}"  # tensorboardX names files by the second: a quick rerun would clobber one
        self._writer = SummaryWriter(logdir=str(self.logdir), purge_step=purge, flush_secs=10, filename_suffix=suffix)
        if config and resume_step is None:
            self._writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=0)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for key, value in plain(record).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """Logs every record to a Weights & Biases run (``wandb.init(project, name, config)``).

    wandb's own environment variables apply (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ``WANDB_ENTITY``); a
    resumed run continues the W&B run its first start created (its id is kept in ``folder/wandb_id``).
    """

    def __init__(self, folder, *, project: str, run_name: str, config: Mapping, resume_step: int | None = None):
        import wandb

        folder = Path(folder)
        id_file = folder / WANDB_ID_FILE
        if resume_step is not None and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = wandb.util.generate_id()
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(
            project=project, name=run_name, config=dict(config), dir=str(folder), id=run_id, resume="allow"
        )

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        self._run.log({k: v for k, v in plain(record).items() if v is not None}, step=int(step))

    def close(self) -> None:
        self._run.finish()


def make_loggers(
    cfg,
    folder,
    *,
    run_name: str,
    config: Mapping,
    resume_step: int | None = None,
    process_index: int | None = None,
) -> list[Logger]:
    """The loggers ``cfg`` (a ``LoggingConfig``) lists, writing into ``folder``; none on processes other than 0.

    ``resume_step``: the checkpoint step a resumed run continues from (None: a fresh run). ``process_index``
    defaults to ``jax.process_index()``.

    Example:
        >>> from lora_one_train.config import LoggingConfig
        >>> make_loggers(LoggingConfig(), "/tmp/unused", run_name="x", config={}, process_index=1)
        []
    """
    if process_index is None:
        import jax

        process_index = jax.process_index()
    if process_index != 0:
        return []
    makers = {
        "jsonl": lambda: JsonlLogger(folder, resume_step=resume_step),
        "tensorboard": lambda: TensorBoardLogger(folder, config=config, resume_step=resume_step),
        "wandb": lambda: WandbLogger(
            folder, project=cfg.project, run_name=run_name, config=config, resume_step=resume_step
        ),
    }
    return [makers[name]() for name in cfg.loggers]


def _records(path: Path):
    """The payloads of a TFRecord file (length, masked CRC of the length, data, masked CRC of the data)."""
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        end = offset + 12 + length
        if end + 4 > len(data):  # a record cut short by a kill: the rest is unreadable
            return
        yield data[offset + 12 : end]
        offset = end + 4


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``logdir``: ``{tag: [(step, value), ...]}`` in write order.

    Later writes purge earlier ones as TensorBoard does: a resumed run's start event (``purge_step``)
    drops the values at or after that step written before it.

    Example:
        >>> read_scalars("/nonexistent")
        {}
    """
    from tensorboardX.proto import event_pb2

    files = [[event_pb2.Event.FromString(p) for p in _records(path)] for path in Path(logdir).rglob("*.tfevents.*")]
    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((e for e in files if e), key=lambda e: e[0].wall_time):  # in the order they were written
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
