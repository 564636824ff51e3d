"""Statistics over seeds and over evaluation curves: confidence intervals, paired differences, loss at fixed
steps, steps to reach a loss level, area under the curve.

A confidence interval is Student's t: ``mean +- t_{(1 + level) / 2, n - 1} * sd / sqrt(n)`` (``sd`` with
``n - 1``); a paired difference is that interval over the per-seed differences ``method - reference`` of
the seeds both ran (same data order and gradient examples per seed, so the seed-to-seed noise cancels).
The t quantile is computed here (incomplete beta by continued fraction, then bisection), so the trainer
needs no scipy; the tests check it against ``scipy.stats``.

A *history* is the trainer's list of records (``metrics.jsonl``): training records ``{"step", "loss", ...}``
and evaluation records ``{"step", "eval/answer_loss", "eval/score", ...}``; the curves here read the
evaluation records.

Example:
    >>> ci = mean_ci([0.61, 0.64, 0.66])
    >>> round(ci["mean"], 4), round(ci["low"], 4), round(ci["high"], 4)
    (0.6367, 0.5742, 0.6992)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (
            m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
            -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"the incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``.

    Example:
        >>> round(betainc(2.0, 3.0, 0.4), 6)  # 1 - (0.6^4 + 4 * 0.4 * 0.6^3)
        0.5248
    """
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with ``df`` degrees of freedom.

    Example:
        >>> t_cdf(0.0, 3), round(t_cdf(1.0, 1), 6)  # Cauchy: 1/2 + atan(1)/pi
        (0.5, 0.75)
    """
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``, ~1e-12).

    Example:
        >>> round(t_quantile(0.975, 2), 4), round(t_quantile(0.975, 1e9), 4)  # -> the normal's 1.96
        (4.3027, 1.96)
    """
    if not (0.0 < p < 1.0 and df > 0):
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


# ----------------------------------------------------------------------------- over seeds


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray([float(v) for v in values], np.float64)
    if np.isnan(x).any():
        raise ValueError(f"{what} holds NaN ({x.tolist()}); a run failed or diverged: fix or drop it explicitly")
    return x


def mean_ci(values: Sequence[float], *, level: float = 0.95) -> dict:
    """Mean and Student-t confidence interval of ``values`` (one per seed).

    Returns ``{"mean", "low", "high", "half_width", "sd", "n"}``; with one value the interval is undefined
    and ``low``, ``high``, ``half_width`` and ``sd`` are None.

    Example:
        >>> ci = mean_ci([1.0, 2.0, 3.0])
        >>> ci["mean"], round(ci["half_width"], 4), ci["n"]  # 4.3027 * 1 / sqrt(3)
        (2.0, 2.4841, 3)
    """
    x = _finite(values, "mean_ci's values")
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    out = {"mean": float(x.mean()), "low": None, "high": None, "half_width": None, "sd": None, "n": int(x.size)}
    if x.size > 1:
        sd = float(x.std(ddof=1))
        half = t_quantile(0.5 + level / 2.0, x.size - 1) * sd / math.sqrt(x.size)
        out.update(low=out["mean"] - half, high=out["mean"] + half, half_width=half, sd=sd)
    return out


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float], *, level: float = 0.95) -> dict:
    """``mean_ci`` of ``values[seed] - reference[seed]`` over the seeds both have, plus ``"seeds"`` used.

    Example:
        >>> d = paired_difference({0: 0.70, 1: 0.66, 2: 0.69}, {0: 0.67, 1: 0.64, 2: 0.65})
        >>> round(d["mean"], 4), d["seeds"], d["low"] > 0  # every seed gained: the CI excludes 0
        (0.03, [0, 1, 2], True)
    """
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        raise ValueError(
            f"no seed in common to pair on (method: {sorted(values)}, reference: {sorted(reference)}); "
            "run the same seeds for both"
        )
    out = mean_ci([float(values[s]) - float(reference[s]) for s in seeds], level=level)
    return {**out, "seeds": seeds}


def by_method(
    values: Mapping[str, Mapping[int, float]], *, reference: str = "lora", level: float = 0.95
) -> dict[str, dict]:
    """For every method other than ``reference``: its ``paired_difference`` against ``reference``.

    ``values``: ``{method: {seed: value}}``.

    Example:
        >>> v = {"lora": {0: 1.0, 1: 1.2}, "lora-one": {0: 0.9, 1: 1.0}}
        >>> round(by_method(v)["lora-one"]["mean"], 4)
        -0.15
    """
    if reference not in values:
        raise ValueError(f"the reference method {reference!r} has no results; methods: {sorted(values)}")
    return {m: paired_difference(v, values[reference], level=level) for m, v in values.items() if m != reference}


# ----------------------------------------------------------------------------- along a curve


def eval_curve(history: Sequence[Mapping], key: str = "eval/answer_loss") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the evaluation records of ``history`` that hold ``key`` (not None), by step.

    Example:
        >>> eval_curve([{"step": 0, "eval/answer_loss": 2.0}, {"step": 1, "loss": 1.7},
        ...             {"step": 5, "eval/answer_loss": 1.5}])
        (array([0., 5.]), array([2. , 1.5]))
    """
    rows = sorted((float(r["step"]), float(r[key])) for r in history if r.get(key) is not None)
    steps = np.asarray([s for s, _ in rows], np.float64)
    values = _finite([v for _, v in rows], f"the curve {key!r}")
    if len(np.unique(steps)) != len(steps):
        raise ValueError(f"the history has two {key!r} records at one step ({steps.tolist()}); one run per history")
    return steps, values


def value_at(history: Sequence[Mapping], step: float, key: str = "eval/answer_loss") -> float | None:
    """The curve ``key`` at ``step``, linearly interpolated between evaluations; None outside them.

    Example:
        >>> h = [{"step": 0, "eval/answer_loss": 2.0}, {"step": 50, "eval/answer_loss": 1.0}]
        >>> value_at(h, 25), value_at(h, 60)
        (1.5, None)
    """
    steps, values = eval_curve(history, key)
    if steps.size == 0 or not steps[0] <= step <= steps[-1]:
        return None
    return float(np.interp(step, steps, values))


def values_at(history: Sequence[Mapping], steps: Sequence[float], key: str = "eval/answer_loss") -> dict:
    """``{step: value_at(history, step)}`` for fixed ``steps``.

    Example:
        >>> values_at([{"step": 0, "eval/answer_loss": 2.0}, {"step": 10, "eval/answer_loss": 1.0}], [0, 5])
        {0: 2.0, 5: 1.5}
    """
    return {s: value_at(history, s, key) for s in steps}


def steps_to_level(history: Sequence[Mapping], level: float, key: str = "eval/answer_loss") -> float | None:
    """The first step at which the curve ``key`` reaches ``level`` (at or below), linearly interpolated
    between the two evaluations around the crossing; None if it never does.

    Example:
        >>> h = [{"step": 0, "eval/answer_loss": 2.0}, {"step": 25, "eval/answer_loss": 1.2},
        ...      {"step": 50, "eval/answer_loss": 0.8}]
        >>> steps_to_level(h, 1.0), steps_to_level(h, 0.5)
        (37.5, None)
    """
    steps, values = eval_curve(history, key)
    below = np.nonzero(values <= level)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (v0 - level) * (s1 - s0) / (v0 - v1))


def curve_auc(history: Sequence[Mapping], key: str = "eval/answer_loss") -> float:
    """Area under the curve ``key`` (trapezoids over steps) divided by its span of steps: a mean loss over training.

    Example:
        >>> curve_auc([{"step": 0, "eval/answer_loss": 2.0}, {"step": 10, "eval/answer_loss": 1.0},
        ...            {"step": 20, "eval/answer_loss": 1.0}])
        1.25
    """
    steps, values = eval_curve(history, key)
    if steps.size < 2:
        raise ValueError(f"an area under the curve needs >= 2 evaluations of {key!r}, got {steps.size}")
    area = float(np.sum((values[1:] + values[:-1]) * np.diff(steps)) / 2.0)
    return area / float(steps[-1] - steps[0])


def band(histories: Sequence[Sequence[Mapping]], key: str = "eval/answer_loss", *, level: float = 0.95) -> dict:
    """Mean and CI over runs (seeds) at every step all of them evaluated: ``{"step", "mean", "low", "high"}``
    as lists (``low``/``high`` equal the mean with one run), for a curve with a band.

    Example:
        >>> h0 = [{"step": 0, "eval/answer_loss": 2.0}, {"step": 10, "eval/answer_loss": 1.0}]
        >>> h1 = [{"step": 0, "eval/answer_loss": 2.0}, {"step": 10, "eval/answer_loss": 1.2}]
        >>> b = band([h0, h1])
        >>> b["step"], [round(m, 2) for m in b["mean"]]
        ([0.0, 10.0], [2.0, 1.1])
    """
    curves = [dict(zip(*eval_curve(h, key))) for h in histories]
    if not curves:
        raise ValueError("band needs at least one history")
    steps = sorted(float(s) for s in set.intersection(*(set(c) for c in curves)))
    out = {"step": steps, "mean": [], "low": [], "high": []}
    for s in steps:
        ci = mean_ci([c[s] for c in curves], level=level)
        out["mean"].append(ci["mean"])
        out["low"].append(ci["mean"] if ci["low"] is None else ci["low"])
        out["high"].append(ci["mean"] if ci["high"] is None else ci["high"])
    return out
