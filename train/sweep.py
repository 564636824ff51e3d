"""The learning-rate sweep as data: the grid, its one-time extension, the choice of rate and the run plan.

No training happens here: the trainer runs what ``plan`` lists and records each run's result (see
``lora_one_train.sweep_report`` for that record). A sweep is

1. **grid**: every method trains at every rate of ``grid`` (default 5 points, 3e-5..3e-3 log-spaced) on
   ``grid_seed``; each run is scored by its final *validation* answer loss (a split carved from train by
   ``carve_validation``, never the reported split). When a method's best rate is at an edge of the grid,
   one more rate past that edge (same log spacing) is run, once (``extend_grid``).
2. **seeds**: every method trains at its chosen rate (lowest validation answer loss, ``choose_rate``) with
   each of ``seeds``; these runs carry the held-out evaluation the report compares.

Every run has a stable name (``grid/lora/lr3.00e-04-seed0``): a sweep resumes by listing ``plan(...)`` again
and skipping the runs whose result file exists. Rates are rounded to 3 significant digits so that names
and JSON round trips are exact.

Example:
    >>> runs = plan(["lora"], {}, grid=(1e-4, 1e-3), seeds=(0, 1))
    >>> [r.name for r in runs]  # nothing scored yet: only the grid is known
    ['grid/lora/lr1.00e-04-seed0', 'grid/lora/lr1.00e-03-seed0']
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

#: The smallest validation split the sweep accepts by default (the standard error of an accuracy on 300
#: examples is about 2.9 points; on 200 it was 3.4, larger than the gaps it had to decide).
MIN_VALIDATION = 300
PHASES = ("grid", "seeds")


def _round(x: float) -> float:
    """``x`` to 3 significant digits (the form rates take in names and result files)."""
    return float(f"{x:.3g}")


def log_grid(low: float = 3e-5, high: float = 3e-3, n: int = 5) -> tuple[float, ...]:
    """``n`` log-spaced learning rates from ``low`` to ``high`` (3 significant digits), ascending.

    Example:
        >>> log_grid()
        (3e-05, 9.49e-05, 0.0003, 0.000949, 0.003)
    """
    if not (0 < low < high and math.isfinite(high)) or n < 2:
        raise ValueError(f"log_grid needs 0 < low < high and n >= 2, got low={low}, high={high}, n={n}")
    return tuple(_round(x) for x in np.geomspace(low, high, n))


DEFAULT_GRID = log_grid()


def _check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    rates = tuple(sorted(_round(float(x)) for x in grid))
    if len(rates) < 2 or rates[0] <= 0 or len(set(rates)) != len(rates):
        raise ValueError(f"a learning-rate grid needs >= 2 distinct positive rates, got {list(grid)}")
    return rates


def _check_scores(scores: Mapping[float, float], what: str = "score") -> dict[float, float]:
    """Rates (rounded) -> scores; NaN is an error (record a diverged run as ``inf``)."""
    out = {}
    for lr, value in scores.items():
        value = float(value)
        if math.isnan(value):
            raise ValueError(
                f"the {what} at learning rate {lr:g} is NaN; record a diverged run as inf (the worst score), "
                "or rerun it if it failed for another reason"
            )
        out[_round(float(lr))] = value
    return out


def extend_grid(grid: Sequence[float], scores: Mapping[float, float]) -> tuple[float, ...]:
    """``grid`` plus one rate past the edge where the lowest score (validation answer loss) lies, else ``grid``.

    The new rate continues the grid's log spacing (its overall ratio ``(max / min) ** (1 / (n - 1))``).
    ``scores`` must score every rate of ``grid``; ``inf`` marks a diverged run. The sweep calls this once,
    on the base grid, so a grid is extended at most once.

    Example:
        >>> extend_grid((1e-4, 1e-3, 1e-2), {1e-4: 0.9, 1e-3: 0.8, 1e-2: 0.7})  # best at the top edge
        (0.0001, 0.001, 0.01, 0.1)
        >>> extend_grid((1e-4, 1e-3, 1e-2), {1e-4: 0.9, 1e-3: 0.5, 1e-2: float("inf")})  # inside: unchanged
        (0.0001, 0.001, 0.01)
    """
    rates = _check_grid(grid)
    scored = _check_scores(scores)
    missing = [lr for lr in rates if lr not in scored]
    if missing:
        raise ValueError(f"extend_grid needs a score for every rate of the grid; missing {missing}")
    if all(math.isinf(scored[lr]) for lr in rates):
        raise ValueError(f"every rate of the grid {list(rates)} diverged; lower the grid")
    best = min(rates, key=lambda lr: (scored[lr], lr))
    ratio = (rates[-1] / rates[0]) ** (1 / (len(rates) - 1))
    if best == rates[0]:
        return (_round(rates[0] / ratio), *rates)
    if best == rates[-1]:
        return (*rates, _round(rates[-1] * ratio))
    return rates


def choose_rate(losses: Mapping[float, float], scores: Mapping[float, float] | None = None) -> float:
    """The rate with the lowest validation answer loss (ties: the higher validation score, then the lower rate).

    ``scores`` (accuracy, exact match) is only a tie-breaker; the report shows it beside the loss.

    Example:
        >>> choose_rate({1e-4: 0.71, 3e-4: 0.62, 1e-3: 0.65}, {1e-4: 0.5, 3e-4: 0.6, 1e-3: 0.7})
        0.0003
    """
    losses = _check_scores(losses, "validation answer loss")
    if not losses:
        raise ValueError("choose_rate needs at least one scored learning rate")
    extra = {_round(float(k)): float(v) for k, v in (scores or {}).items() if v is not None}
    return min(losses, key=lambda lr: (losses[lr], -extra.get(lr, -math.inf), lr))


# ----------------------------------------------------------------------------- the plan


_SAFE = re.compile(r"^[A-Za-z0-9._+=@-]+$")


@dataclasses.dataclass(frozen=True, order=True)
class Run:
    """One training run of a sweep: ``method`` (any label the trainer knows, e.g. ``lora-one``), ``lr``,
    ``seed`` and ``phase`` (``"grid"`` or ``"seeds"``). ``name`` is its stable, folder-safe identity.

    Example:
        >>> r = Run("lora-one", 9.49e-05, 1, "seeds")
        >>> r.name, str(r.result_path("runs/sweep"))
        ('seeds/lora-one/lr9.49e-05-seed1', 'runs/sweep/seeds/lora-one/lr9.49e-05-seed1/result.json')
    """

    method: str
    lr: float
    seed: int
    phase: str

    def __post_init__(self):
        if not _SAFE.match(self.method):
            raise ValueError(f"method label {self.method!r} cannot name a folder; use letters, digits and . _ + = @ -")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be finite and > 0, got {self.lr!r}")
        object.__setattr__(self, "lr", _round(float(self.lr)))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def name(self) -> str:
        return f"{self.phase}/{self.method}/lr{self.lr:.2e}-seed{self.seed}"

    def folder(self, root) -> Path:
        """The run's output folder under the sweep's ``root``."""
        return Path(root) / self.name

    def result_path(self, root) -> Path:
        """The file whose existence marks the run as done (the trainer writes it last)."""
        return self.folder(root) / "result.json"


def validation_of(result: Mapping) -> tuple[float, float | None]:
    """``(validation answer loss, validation score or None)`` of a grid run's result; a diverged run is ``inf``.

    Example:
        >>> validation_of({"val": {"answer_loss": 0.7, "score": 0.61}}), validation_of({"diverged": True})
        ((0.7, 0.61), (inf, None))
    """
    if result.get("diverged"):
        return math.inf, None
    val = result.get("val")
    if not isinstance(val, Mapping) or val.get("answer_loss") is None:
        raise ValueError(
            "a grid run's result needs 'val': {'answer_loss': ..., 'score': ...} (or 'diverged': true); "
            f"got keys {sorted(result)}"
        )
    return float(val["answer_loss"]), (None if val.get("score") is None else float(val["score"]))


def grid_scores(method: str, results: Mapping[str, Mapping], *, seed: int = 0) -> dict[float, tuple]:
    """``{lr: (validation loss, validation score)}`` of ``method``'s finished grid runs on ``seed``.

    ``results`` maps run names to their results (what the sweep loaded from the result files).

    Example:
        >>> res = {"grid/lora/lr1.00e-04-seed0": {"val": {"answer_loss": 0.8, "score": None}}}
        >>> grid_scores("lora", res)
        {0.0001: (0.8, None)}
    """
    out = {}
    for lr in _rates_in(results, method, seed):
        out[lr] = validation_of(results[Run(method, lr, seed, "grid").name])
    return out


def _rates_in(results: Mapping[str, Mapping], method: str, seed: int) -> list[float]:
    prefix, suffix = f"grid/{method}/lr", f"-seed{seed}"
    return sorted(
        _round(float(name[len(prefix) : -len(suffix)]))
        for name in results
        if name.startswith(prefix) and name.endswith(suffix)
    )


def method_grid(base: Sequence[float], scores: Mapping[float, tuple]) -> tuple[tuple[float, ...], float | None]:
    """``(the method's grid so far, its chosen rate or None while the grid is unfinished)``.

    The grid is ``base`` until all of it is scored, then ``extend_grid`` of it (once); the rate is chosen
    when every rate of that grid is scored.

    Example:
        >>> method_grid((1e-4, 1e-3), {1e-4: (0.9, None)})
        ((0.0001, 0.001), None)
        >>> method_grid((1e-4, 1e-3), {1e-4: (0.9, None), 1e-3: (0.7, None)})  # best at the edge: one more
        ((0.0001, 0.001, 0.01), None)
        >>> method_grid((1e-4, 1e-3), {1e-4: (0.9, None), 1e-3: (0.7, None), 1e-2: (0.8, None)})
        ((0.0001, 0.001, 0.01), 0.001)
    """
    base = _check_grid(base)
    if any(lr not in scores for lr in base):
        return base, None
    grid = extend_grid(base, {lr: scores[lr][0] for lr in base})
    if any(lr not in scores for lr in grid):
        return grid, None
    return grid, choose_rate({lr: scores[lr][0] for lr in grid}, {lr: scores[lr][1] for lr in grid})


def plan(
    methods: Iterable[str],
    results: Mapping[str, Mapping],
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    seeds: Sequence[int] = (0, 1, 2),
    grid_seed: int = 0,
) -> list[Run]:
    """Every run the sweep needs, as far as ``results`` (run name -> result) decide it, in running order.

    Grid runs of every method first (the extension point once the base grid is scored), then, for each
    method whose grid is finished, one ``"seeds"`` run per seed at its chosen rate. Call it again after
    each run; the sweep is finished when every run it lists has a result. Runs already in ``results`` stay
    in the list (the caller skips them), so the plan is also the sweep's table of contents.

    Example:
        >>> res = {"grid/lora/lr1.00e-04-seed0": {"val": {"answer_loss": 0.7}},
        ...        "grid/lora/lr1.00e-03-seed0": {"val": {"answer_loss": 0.9}},
        ...        "grid/lora/lr1.00e-05-seed0": {"val": {"answer_loss": 0.8}}}
        >>> [r.name for r in plan(["lora"], res, grid=(1e-4, 1e-3), seeds=(0, 1))]  # doctest: +NORMALIZE_WHITESPACE
        ['grid/lora/lr1.00e-05-seed0', 'grid/lora/lr1.00e-04-seed0', 'grid/lora/lr1.00e-03-seed0',
         'seeds/lora/lr1.00e-04-seed0', 'seeds/lora/lr1.00e-04-seed1']
    """
    methods = list(methods)
    if len(set(methods)) != len(methods) or not methods:
        raise ValueError(f"a sweep needs distinct method labels, got {methods}")
    grid_runs, seed_runs = [], []
    for method in methods:
        rates, chosen = method_grid(grid, grid_scores(method, results, seed=grid_seed))
        grid_runs += [Run(method, lr, grid_seed, "grid") for lr in rates]
        if chosen is not None:
            seed_runs += [Run(method, chosen, seed, "seeds") for seed in seeds]
    return grid_runs + seed_runs


def load_results(root) -> dict[str, dict]:
    """``{run name: result}`` of every finished run under a sweep's ``root`` (each run's ``result.json``).

    Example:
        >>> import json, tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> path = Run("lora", 1e-4, 0, "grid").result_path(root)
        >>> path.parent.mkdir(parents=True); _ = path.write_text(json.dumps({"val": {"answer_loss": 0.7}}))
        >>> load_results(root)
        {'grid/lora/lr1.00e-04-seed0': {'val': {'answer_loss': 0.7}}}
    """
    import json

    root = Path(root)
    out = {}
    for path in sorted(root.glob("*/*/*/result.json")):
        name = path.parent.relative_to(root).as_posix()
        if name.split("/")[0] in PHASES:
            out[name] = json.loads(path.read_text())
    return out


def chosen_rates(methods: Iterable[str], results: Mapping[str, Mapping], *, grid=DEFAULT_GRID, grid_seed=0) -> dict:
    """``{method: {"lr": chosen rate or None, "grid": {lr: (val loss, val score)}}}`` for the report.

    Example:
        >>> res = {"grid/lora/lr1.00e-04-seed0": {"val": {"answer_loss": 0.7, "score": 0.5}},
        ...        "grid/lora/lr1.00e-03-seed0": {"val": {"answer_loss": 0.6, "score": 0.6}}}
        >>> chosen_rates(["lora"], res, grid=(1e-4, 1e-3))["lora"]["lr"] is None  # 1e-2 not run yet
        True
    """
    out = {}
    for method in methods:
        scores = grid_scores(method, results, seed=grid_seed)
        out[method] = {"lr": method_grid(grid, scores)[1], "grid": dict(sorted(scores.items()))}
    return out


# ----------------------------------------------------------------------------- the validation split


def validation_indices(n_train: int, size: int, *, seed: int = 0, skip: int = 0, min_size: int = MIN_VALIDATION):
    """``size`` sorted indices of a training split of ``n_train`` examples, drawn by ``seed``, none below ``skip``.

    ``skip`` protects the first examples: the gradient examples (``init.grad_examples``) and the examples
    ``init.gamma: auto`` scores on, which the trainer takes from the front of the split. The draw depends
    only on ``(n_train, size, seed, skip)``.

    Example:
        >>> validation_indices(20, 4, seed=0, skip=8, min_size=1).tolist()
        [10, 12, 15, 17]
    """
    if size < min_size:
        raise ValueError(
            f"the validation split has {size} examples, fewer than {min_size}: choosing a rate on it is noise "
            f"(standard error ~{50 / math.sqrt(max(size, 1)):.1f} accuracy points); raise sweep.val_size"
        )
    if n_train - skip - size < 1:
        raise ValueError(
            f"a training split of {n_train} examples cannot give {size} validation examples after the first {skip} "
            "(gradient and scoring examples) and keep any to train on; lower the validation size or use more data"
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_train - skip)[:size] + skip)


def carve_validation(train, size: int, *, seed: int = 0, skip: int = 0, min_size: int = MIN_VALIDATION):
    """``(train without the validation examples, the validation examples)`` of a ``datasets.Dataset``.

    The remaining examples keep their order, so the first ``skip`` (the gradient examples) stay first and
    are never validated on. Pass the same ``seed`` for every method of a sweep.

    Example:
        >>> import datasets
        >>> ds = datasets.Dataset.from_dict({"x": list(range(20))})
        >>> rest, val = carve_validation(ds, 4, skip=8, min_size=1)
        >>> list(val["x"]), rest["x"][:9], len(rest)
        ([10, 12, 15, 17], [0, 1, 2, 3, 4, 5, 6, 7, 8], 16)
    """
    picked = validation_indices(len(train), size, seed=seed, skip=skip, min_size=min_size)
    keep = np.setdiff1d(np.arange(len(train)), picked, assume_unique=True)
    return train.select(keep.tolist()), train.select(picked.tolist())
