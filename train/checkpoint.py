"""Orbax checkpoints of a training run behind one small wrapper.

A checkpoint holds what training changes: the trainable state (adapters or, for full fine-tuning, the
params), the optimizer state, and a JSON record (step, data-stream position, RNG seed, the initial
adapters' file for residual inits, and the model spec). The frozen base model is named by its spec and
never copied. Saves are synchronous: Orbax writes into a temporary folder and renames it when complete,
so a failed save (disk full, permissions) raises and leaves the previous checkpoint as it was.

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
from pathlib import Path

import jax
import numpy as np


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says where and why."""


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
                f"saving checkpoint {step} in {self.folder} failed ({type(e).__name__}: {e}); the "
                f"previous checkpoint (step {self.latest_step()}) is intact"
            ) from e

    def restore(self, like, step: int | None = None):
        """``(state, record)`` of checkpoint ``step`` (default: the latest), ``state`` shaped like ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.folder}")
        abstract = jax.tree.map(
            lambda x: (
                jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
                if hasattr(x, "dtype")
                else x
            ),
            like,
        )
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract), record=self._ocp.args.JsonRestore()
        )
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(
                f"restoring checkpoint {step} from {self.folder} failed ({type(e).__name__}: {e}); "
                "was it written by another configuration?"
            ) from e
        return restored.state, dict(restored.record)

    def close(self) -> None:
        self.manager.close()
