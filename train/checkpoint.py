"""Orbax checkpoints of a training run behind one small wrapper.

A checkpoint holds what training changes: the trainable state (adapters or, for full fine-tuning, the
params), the optimizer state, and a JSON record (step, data-stream position, the resumable part of
the config, the data's fingerprint and the history of logged records up to that step). The frozen
base model is named by its spec and never copied. Saves are synchronous: Orbax writes into a
temporary folder and renames it when complete, so a failed save (disk full, permissions) raises and
leaves the previous checkpoint as it was. An unreadable checkpoint is skipped for the one before it.

Example:
    >>> import tempfile, numpy as np
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=2)
    >>> ckpt.save(3, {"w": np.ones(2, np.float32)}, {"step": 3})
    >>> state, meta = ckpt.restore({"w": np.zeros(2, np.float32)})
    >>> state["w"].tolist(), meta["step"]
    ([1.0, 1.0], 3)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import numpy as np

from lora_one_train.errors import CheckpointError


def _reason(error: Exception, limit: int = 200) -> str:
    """The first line of an error, short (TensorStore errors run to hundreds of lines)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    first = first.split(". See full TensorStore details")[0]
    text = f"{type(error).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
    """Save / restore ``(state pytree, JSON record)`` pairs by step in ``folder``, keeping the last ``keep``."""

    def __init__(self, folder: str | os.PathLike, *, keep: int = 2):
        import orbax.checkpoint as ocp

        self.folder = Path(folder).absolute()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(
                f"checkpoint folder {self.folder} is not writable ({e.strerror or e}); "
                "choose another output_dir or fix its permissions"
            ) from None
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.folder, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, record: dict) -> None:
        """Write ``state`` (a pytree of arrays) and ``record`` (JSON data) as checkpoint ``step``."""
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state), record=self._ocp.args.JsonSave(record)
        )
        try:
            self.manager.save(step, args=args, force=True)
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"saving checkpoint {step} in {self.folder} failed ({_reason(e)}); the "
                f"previous checkpoint (step {self.latest_step()}) is intact"
            ) from e

    def steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first."""
        return sorted(self.manager.all_steps())

    def record(self, step: int | None = None) -> dict | None:
        """The JSON record of checkpoint ``step`` (default: the latest) without reading its arrays; None if none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            restored = self.manager.restore(step, args=self._ocp.args.Composite(record=self._ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"checkpoint {step} has an unreadable record ({_reason(e)})") from e
        return dict(restored.record)

    def restore(self, like, step: int | None = None, *, accept=lambda record: None, warn=print):
        """``(state, record)`` of checkpoint ``step`` (default: the newest readable one), shaped like ``like``.

        ``accept(record)`` sees each record before its arrays are read and raises to refuse it (another
        configuration, other data): that error propagates. Without ``step``, an unreadable checkpoint (a
        truncated array file, a half-deleted folder) is reported in one line through ``warn`` and the one
        before it is tried; if none can be read the error names the folder to delete.
        """
        abstract = jax.tree.map(
            lambda x: (
                jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
                if hasattr(x, "dtype")
                else x
            ),
            like,
        )
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.folder}")
        failures = []
        for candidate in candidates:
            try:
                record = self.record(candidate)
            except CheckpointError as e:
                record = None
                failures.append(str(e))
            if record is not None:
                accept(record)  # a refusal (another configuration, other data) is not a damaged checkpoint
                try:
                    restored = self._restore(candidate, abstract), record
                    self._set_aside(candidates[: candidates.index(candidate)], warn)
                    return restored
                except Exception as e:
                    failures.append(f"checkpoint {candidate} is unreadable ({_reason(e)})")
            if step is None and candidate != candidates[-1]:
                warn(f"{failures[-1]} in {self.folder}; trying the one before it")
        raise CheckpointError(
            f"no readable checkpoint in {self.folder} ({'; '.join(failures)}); delete that folder "
            "(or rerun with --restart) to start this method over"
        )

    def _set_aside(self, steps: list[int], warn) -> None:
        """Move unreadable checkpoints out of the way (``<folder>-unreadable/<step>``) so training can save
        those steps again; nothing is deleted."""
        if not steps:
            return
        aside = self.folder.with_name(self.folder.name + "-unreadable")
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
            (self.folder / str(step)).rename(target)
            warn(f"moved the unreadable checkpoint {step} to {target}")
        self.manager.reload()

    def _restore(self, step: int, abstract):
        return self.manager.restore(
            step, args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract))
        ).state

    def close(self) -> None:
        self.manager.close()
