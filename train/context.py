"""What every method of a run shares: the loaded model, the task, the resolved targets, the mesh, and the
run's caches (compiled train steps), each named, none hidden.

Example:
    >>> phases = Phases()
    >>> with phases("load model"):
    ...     pass
    >>> list(phases.seconds)
    ['load model']
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, NamedTuple

import jax

from lora_one_jax import Target


class Phases:
    """Wall time per named phase, accumulated (``with phases("training"): ...``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunContext:
    """The inputs every method of a run shares (frozen), and its caches (explicit fields, mutable contents).

    ``targets`` is ``find_targets(params, cfg.lora)``, resolved once for the whole run. ``steps`` holds the
    run's compiled programs: a ``StepSpec`` (and the state's shapes) maps to its train step, so runs that
    differ only in seed or learning rate reuse one program, and ``("gamma loss", lora config)`` to
    ``init.gamma: auto``'s scoring loss. ``phases`` accumulates the wall time of each stage.
    """

    cfg: Any  # RunConfig
    model: Any
    params: Any
    tokenizer: Any
    task: Any  # lora_one_jax.data.Task
    targets: dict[str, Target]
    evaluator: Any  # lora_one_jax.eval.Evaluator
    mesh: Any = None  # a jax Mesh when the run is sharded, else None
    rules: tuple = ()
    progress: bool = True
    phases: Phases = dataclasses.field(default_factory=Phases)
    steps: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gradient:
    """The run's gradient stage (``lora_one_jax.gradient_factors``), without the gradient itself: ``unit`` maps
    each gradient init of the run (``"lora-one"``, ``"lora-ga"``) to its adapters at gamma 1 (float32;
    ``rescale(unit, gamma, dtype)`` gives any gamma), ``subspaces`` the top-r subspaces of each ``G`` the
    diagnostics measure adapters against (None when off), ``stability`` their stability between two disjoint
    halves of the gradient examples (logged once, at step 0), ``passes`` the passes over the gradient examples
    it took (0: no gradient stage)."""

    unit: dict = dataclasses.field(default_factory=dict)
    subspaces: dict | None = None
    stability: dict = dataclasses.field(default_factory=dict)
    passes: int = 0


class Keys(NamedTuple):
    """The run's PRNG keys, split once by purpose: ``init`` (LoRA's random A, randomized SVD sketches) and
    ``dropout`` (LoRA dropout, folded with the step). ``init`` is ``key(seed)`` itself, so initial adapters
    are those of ``init_adapters(..., key=jax.random.key(seed))``.

    Example:
        >>> keys = Keys.of(0)
        >>> bool((jax.random.key_data(keys.init) == jax.random.key_data(keys.dropout)).all())
        False
    """

    init: jax.Array
    dropout: jax.Array

    @classmethod
    def of(cls, seed: int) -> Keys:
        root = jax.random.key(seed)
        return cls(init=root, dropout=jax.random.fold_in(root, DROPOUT_STREAM))


#: ``Keys.dropout`` is ``fold_in(key(seed), DROPOUT_STREAM)``.
DROPOUT_STREAM = 1
