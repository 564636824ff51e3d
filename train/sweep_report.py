"""The sweep's report: markdown tables and plots (matplotlib, Agg) from the runs' result records.

Input: a list of run records, one per finished run (what the trainer writes as the run's ``result.json``,
see ``lora_one_train.sweep.Run.result_path``); plain dicts:

.. code-block:: python

    {
        "method": "lora-one",          # the method label of the sweep (a variant too, e.g. "lora-one+gamma=auto")
        "lr": 0.000949,                # peak learning rate
        "seed": 0,
        "phase": "grid" | "seeds",     # grid: one run per rate on the grid seed; seeds: runs at the chosen rate
        "val": {"answer_loss": 0.71, "score": 0.62},   # grid runs: final validation answer loss (score or None)
        "diverged": False,             # optional; a diverged grid run scores inf
        "held_out": {"answer_loss": 0.69, "score": 0.64, "metric": "accuracy"},  # optional: the final held-out
                                       # evaluation (may be on a larger split than the periodic ones); when
                                       # absent, the last evaluation record of the history is used
        "history": [                   # the run's metrics.jsonl: training and evaluation records
            {"step": 1, "loss": 2.3},
            {"step": 25, "eval/answer_loss": 0.9, "eval/score": 0.55, "align/left_mean": 12.0, ...},
        ],
        "init": {                      # optional
            "gamma": 128.0,            # the gamma the run used
            "gamma_auto": {"losses": {"16.0": 0.93, ...}, "forward_passes": 32, "seconds": 4.1,
                           "compile_seconds": 1.2},  # of those seconds
            "grad_stability": {"grad_stability/left_mean": 41.0, ...},
        },
    }

``write_report(records, out_dir)`` writes ``report.md``, ``grid.png`` and ``curves.png`` and returns the
markdown path. Every statistic comes from ``lora_one_train.stats``: means with Student-t 95% intervals over
seeds, differences against the reference method paired by seed.

Example:
    >>> import tempfile
    >>> recs = example_records()
    >>> path = write_report(recs, tempfile.mkdtemp())
    >>> "| lora-one | 3.00e-04 |" in path.read_text()
    True
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from lora_one_train import stats

LOSS, SCORE = "eval/answer_loss", "eval/score"


# ----------------------------------------------------------------------------- reading the records


def _seed_runs(records: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """``{method: [seeds-phase records, by seed]}`` in the order the methods first appear."""
    out: dict[str, list[Mapping]] = defaultdict(list)
    for r in records:
        if r.get("phase") == "seeds":
            out[r["method"]].append(r)
    for method, runs in out.items():
        seeds = [r["seed"] for r in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{method} has two seeds-phase runs with one seed ({sorted(seeds)}); one per seed")
        if len({float(r["lr"]) for r in runs}) != 1:
            raise ValueError(f"{method}'s seeds-phase runs use several learning rates; they must share the chosen one")
        runs.sort(key=lambda r: r["seed"])
    return dict(out)


def final(record: Mapping, key: str) -> float | None:
    """The run's final held-out ``key`` (``"answer_loss"`` or ``"score"``): its ``held_out`` record, else the
    last evaluation of its history.

    Example:
        >>> final({"history": [{"step": 0, "eval/score": 0.3}, {"step": 9, "eval/score": 0.6}]}, "score")
        0.6
    """
    held = record.get("held_out") or {}
    if held.get(key) is not None:
        return float(held[key])
    evals = [r for r in record.get("history", []) if r.get(f"eval/{key}") is not None]
    return float(max(evals, key=lambda r: r["step"])[f"eval/{key}"]) if evals else None


def per_seed(runs: Sequence[Mapping], value) -> dict[int, float]:
    """``{seed: value(record)}`` skipping runs where ``value`` is None.

    Example:
        >>> per_seed([{"seed": 0, "x": 1.0}, {"seed": 1, "x": None}], lambda r: r["x"])
        {0: 1.0}
    """
    out = {r["seed"]: value(r) for r in runs}
    return {s: float(v) for s, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- formatting


def _num(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_ci(ci: Mapping | None, digits: int = 3) -> str:
    """``mean ± half-width (n)``, or the mean alone for one seed.

    Example:
        >>> fmt_ci(stats.mean_ci([1.0, 2.0, 3.0])), fmt_ci(stats.mean_ci([1.0]))
        ('2.000 ± 2.484 (n=3)', '1.000 (n=1)')
    """
    if ci is None:
        return "-"
    half = "" if ci["half_width"] is None else f" ± {ci['half_width']:.{digits}f}"
    return f"{ci['mean']:.{digits}f}{half} (n={ci['n']})"


def fmt_diff(ci: Mapping | None, digits: int = 3) -> str:
    """``+mean [low, high]`` of a paired difference; ``*`` marks an interval that excludes 0.

    Example:
        >>> fmt_diff(stats.paired_difference({0: 0.7, 1: 0.72}, {0: 0.6, 1: 0.61}))
        '+0.105 [+0.041, +0.169]*'
    """
    if ci is None:
        return "-"
    if ci["low"] is None:
        return f"{ci['mean']:+.{digits}f} (n=1)"
    star = "*" if ci["low"] > 0 or ci["high"] < 0 else ""
    return f"{ci['mean']:+.{digits}f} [{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]{star}"


def _ci_or_none(values: Mapping[int, float]):
    return stats.mean_ci(list(values.values())) if values else None


# ----------------------------------------------------------------------------- sections


def grid_section(records: Sequence[Mapping]) -> list[str]:
    """Per method: the chosen rate and the validation loss (score) at every rate of its grid. Before a method's
    seeds-phase runs start, the rate column shows its best grid rate so far, e.g. ``(3.00e-04 so far)``.

    Example:
        >>> print("\\n".join(grid_section(example_records())[2:4]))
        | lora | 1.00e-03 | 0.900 (0.500) | 0.750 (0.600) | 0.700 (0.610) | yes |
        | lora-one | 3.00e-04 | 0.650 (0.620) | 0.600 (0.640) | 0.800 (0.600) | - |
    """
    from lora_one_train.sweep import choose_rate, validation_of

    grid = defaultdict(dict)
    for r in records:
        if r.get("phase") == "grid":
            grid[r["method"]][float(r["lr"])] = validation_of(r)
    chosen = {m: float(runs[0]["lr"]) for m, runs in _seed_runs(records).items()}
    rates = sorted({lr for g in grid.values() for lr in g})
    lines = [
        "| method | chosen rate | " + " | ".join(f"{lr:.2e}" for lr in rates) + " | chosen at an edge |",
        "| --- | --- | " + " | ".join("---" for _ in rates) + " | --- |",
    ]
    for method, g in grid.items():
        cells = [f"{_num(g[lr][0])} ({_num(g[lr][1])})" if lr in g else "-" for lr in rates]
        lr = chosen.get(method)
        if lr is None:  # the grid is still running: its best rate so far, marked as such
            best = choose_rate({r: v[0] for r, v in g.items()}, {r: v[1] for r, v in g.items()})
            rate = f"({best:.2e} so far)"
        else:
            rate = f"{lr:.2e}"
        edge = "yes" if lr is not None and lr in (min(g), max(g)) else "-"
        lines.append(f"| {method} | {rate} | " + " | ".join(cells) + f" | {edge} |")
    return lines


def _judge(diff: Mapping, higher_is_better: bool) -> str:
    if diff["low"] is None:
        return "one seed, no interval"
    if diff["low"] > 0 or diff["high"] < 0:
        return "better" if (diff["low"] > 0) == higher_is_better else "worse"
    return "no significant difference"


def steps_to_reference(runs: Sequence[Mapping], reference: Sequence[Mapping]) -> dict[int, float | None]:
    """``{seed: steps the run needs to reach the reference's final held-out answer loss on that seed, over the
    steps the reference itself needs}`` (interpolated; None where the run never reaches it).

    Example:
        >>> def curve(step, loss):
        ...     return [{"seed": 0, "history": [{"step": 0, LOSS: 2.0}, {"step": step, LOSS: loss}]}]
        >>> ref, run = curve(100, 1.0), curve(50, 0.5)
        >>> {s: round(v, 4) for s, v in steps_to_reference(run, ref).items()}  # 1.0 at step 33.3 of 100
        {0: 0.3333}
    """
    levels = {r["seed"]: final(r, "answer_loss") for r in reference}
    own = {r["seed"]: stats.steps_to_level(r["history"], levels[r["seed"]], LOSS) for r in reference}
    out = {}
    for r in runs:
        level = levels.get(r["seed"])
        if level is not None and own[r["seed"]]:
            steps = stats.steps_to_level(r["history"], level, LOSS)
            out[r["seed"]] = None if steps is None else steps / own[r["seed"]]
    return out


def paired_diff(runs: Sequence[Mapping], baseline: Sequence[Mapping], get) -> dict | None:
    """``stats.paired_difference`` of ``get(run)`` between two methods' runs, paired by seed (``None`` when they
    share no seed).

    Example:
        >>> a = [{"seed": 0, "x": 0.7}, {"seed": 1, "x": 0.72}]
        >>> b = [{"seed": 0, "x": 0.6}, {"seed": 1, "x": 0.61}, {"seed": 2, "x": 0.5}]
        >>> d = paired_diff(a, b, lambda r: r["x"]); round(d["mean"], 3), d["seeds"]
        (0.105, [0, 1])
        >>> paired_diff(a, b[2:], lambda r: r["x"]) is None
        True
    """
    x, y = per_seed(runs, get), per_seed(baseline, get)
    return stats.paired_difference(x, y) if set(x) & set(y) else None


def verdict_section(runs: Mapping[str, list[Mapping]], reference: str) -> list[str]:
    """The answer, one line per method against ``reference``, paired by seed: its final held-out score and answer
    loss (better / worse where the 95% CI of the difference excludes 0, else no significant difference) and the
    steps it needs to reach the reference's final held-out loss, as a fraction of the reference's own."""
    if reference not in runs:
        return []
    lines = []
    for method, rs in runs.items():
        if method == reference:
            continue
        parts, seeds = [], []
        for key, what, higher in (("score", "score", True), ("answer_loss", "answer loss", False)):
            d = paired_diff(rs, runs[reference], lambda r, k=key: final(r, k))
            if d is not None:
                seeds = d["seeds"]
                parts.append(f"held-out {what} {fmt_diff(d)}: **{_judge(d, higher)}**")
        ratios = steps_to_reference(rs, runs[reference])
        reached = [v for v in ratios.values() if v is not None]
        if ratios:
            when = f"reached in {sum(reached) / len(reached):.2f}x its steps" if reached else "never reached"
            parts.append(f"`{reference}`'s final held-out loss {when} ({len(reached)}/{len(ratios)} seeds)")
        if parts:
            lines.append(
                f"- **{method}** against `{reference}` (seeds {', '.join(map(str, seeds))}): " + "; ".join(parts)
            )
    return lines


def verdict(records: Sequence[Mapping], reference: str = "lora") -> list[str]:
    """``verdict_section`` of the seeds-phase runs among ``records`` (what a finished sweep prints).

    Example:
        >>> verdict(example_records())[0].split(":")[0]
        '- **lora-one** against `lora` (seeds 0, 1)'
    """
    return verdict_section(_seed_runs(records), reference)


def held_out_section(runs: Mapping[str, list[Mapping]]) -> list[str]:
    """Per method at its chosen rate: final held-out score and answer loss, and the loss curve's AUC (mean ± CI)."""
    lines = [
        "| method | rate | seeds | held-out score | held-out answer loss | AUC of the held-out loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, rs in runs.items():
        score = _ci_or_none(per_seed(rs, lambda r: final(r, "score")))
        loss = _ci_or_none(per_seed(rs, lambda r: final(r, "answer_loss")))
        auc = _ci_or_none(per_seed(rs, _auc))
        lines.append(
            f"| {method} | {float(rs[0]['lr']):.2e} | {len(rs)} | {fmt_ci(score)} | {fmt_ci(loss)} | {fmt_ci(auc)} |"
        )
    return lines


def _auc(record: Mapping) -> float | None:
    steps, _ = stats.eval_curve(record.get("history", []), LOSS)
    return stats.curve_auc(record["history"], LOSS) if len(steps) >= 2 else None


def paired_section(runs: Mapping[str, list[Mapping]], reference: str, pairs=None) -> list[str]:
    """Paired differences (method - reference, by seed) of the final held-out score, answer loss and AUC.

    ``pairs``: ``[(method, baseline), ...]`` (default: every method against ``reference``).
    """
    pairs = pairs if pairs is not None else [(m, reference) for m in runs if m != reference]
    lines = [
        "| method | against | seeds | Δ held-out score | Δ held-out answer loss | Δ AUC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    getters = (lambda r: final(r, "score"), lambda r: final(r, "answer_loss"), _auc)
    for method, base in pairs:
        if method not in runs or base not in runs:
            lines.append(f"| {method} | {base} | - | not run | not run | not run |")
            continue
        cells, seeds = [], []
        for get in getters:
            d = paired_diff(runs[method], runs[base], get)
            seeds = d["seeds"] if d else seeds
            cells.append(fmt_diff(d))
        lines.append(f"| {method} | {base} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return lines


def _table(columns: Sequence[str], rows: Mapping[str, Sequence[str]]) -> list[str]:
    """A markdown table with a ``method`` column, then ``columns``; ``rows`` maps a method to its cells."""
    lines = ["| method | " + " | ".join(columns) + " |", "| --- | " + " | ".join("---" for _ in columns) + " |"]
    return lines + [f"| {method} | " + " | ".join(cells) + " |" for method, cells in rows.items()]


def steps_section(runs: Mapping[str, list[Mapping]], fixed_steps: Sequence[float]) -> list[str]:
    """Held-out answer loss at fixed steps (mean ± CI over seeds, interpolated between evaluations)."""

    def cell(rs, step):
        return fmt_ci(_ci_or_none(per_seed(rs, lambda r: stats.value_at(r["history"], step, LOSS))))

    rows = {method: [cell(rs, s) for s in fixed_steps] for method, rs in runs.items()}
    return _table([f"step {s:g}" for s in fixed_steps], rows)


def levels_section(runs: Mapping[str, list[Mapping]], levels: Sequence[float]) -> list[str]:
    """Steps each method needs to reach held-out answer loss levels (mean over the seeds that reach it)."""

    def cell(rs, level):
        reached = [v for v in (stats.steps_to_level(r["history"], level, LOSS) for r in rs) if v is not None]
        mean = f"{sum(reached) / len(reached):.1f}" if reached else "never"
        return f"{mean} ({len(reached)}/{len(rs)} seeds)"

    rows = {method: [cell(rs, lv) for lv in levels] for method, rs in runs.items()}
    return _table([f"loss {lv:.3f}" for lv in levels], rows)


def step_seconds(record: Mapping) -> float | None:
    """The run's median seconds per training step (``step_seconds`` of its training records), or None.

    The median, because a window that follows an evaluation or a checkpoint counts its time too.

    Example:
        >>> step_seconds({"history": [{"step": 1, "step_seconds": 3.0}, {"step": 2, "step_seconds": 9.0},
        ...                           {"step": 3, "step_seconds": 3.2}, {"step": 3, "eval/score": 0.5}]})
        3.2
    """
    times = [r["step_seconds"] for r in record.get("history", []) if r.get("step_seconds") is not None]
    return float(statistics.median(times)) if times else None


def gamma_section(records: Sequence[Mapping]) -> list[str]:
    """The gamma every seeds-phase run used, and what ``gamma: auto`` cost: forward passes, seconds (of which
    the scoring program's compilation, paid once per process), and the seconds without compilation in the
    run's own training steps (its median step time, which leaves the train step's compilation out too); a run
    not trained because it trains exactly as a finished one (``same_as``) names that run."""
    rows = [r for r in records if r.get("phase") == "seeds" and (r.get("init") or {}).get("gamma") is not None]
    if not rows:
        return []
    lines = [
        "| method | seed | gamma | auto: forward passes | auto: seconds (compiling) | auto: training steps | trained |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        auto = r["init"].get("gamma_auto") or {}
        step, seconds, compiling = step_seconds(r), auto.get("seconds"), auto.get("compile_seconds")
        steps = (seconds - (compiling or 0.0)) / step if seconds is not None and step else None
        spent = _num(seconds, 1) + ("" if compiling is None else f" ({compiling:.1f})")
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['init']['gamma']:g} | {auto.get('forward_passes', '-')} "
            f"| {spent} | {_num(steps, 1)} | {'as `' + r['same_as'] + '`' if r.get('same_as') else 'yes'} |"
        )
    return lines


def diagnostics_section(runs: Mapping[str, list[Mapping]]) -> list[str]:
    """Final alignment of the adapters with G's top-r subspaces (degrees, mean ± CI over seeds) and the
    gradient's stability at init, where the runs logged them."""
    keys = sorted(
        {k for rs in runs.values() for r in rs for h in r.get("history", []) for k in h if k.startswith("align/")}
    )
    stab = sorted({k for rs in runs.values() for r in rs for k in ((r.get("init") or {}).get("grad_stability") or {})})
    if not keys and not stab:
        return []
    cols = keys + stab
    lines = ["| method | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---" for _ in cols) + " |"]
    for method, rs in runs.items():
        cells = [fmt_ci(_ci_or_none(per_seed(rs, lambda r, k=k: _last(r["history"], k))), 1) for k in keys]
        cells += [
            fmt_ci(
                _ci_or_none(per_seed(rs, lambda r, k=k: ((r.get("init") or {}).get("grad_stability") or {}).get(k))), 1
            )
            for k in stab
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _last(history: Sequence[Mapping], key: str) -> float | None:
    rows = [h for h in history if h.get(key) is not None]
    return float(max(rows, key=lambda h: h["step"])[key]) if rows else None


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(records: Sequence[Mapping], path) -> Path:
    """Validation answer loss and score against the learning rate (log axis), a line per method."""
    from lora_one_train.sweep import validation_of

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    grid = defaultdict(dict)
    for r in records:
        if r.get("phase") == "grid":
            grid[r["method"]][float(r["lr"])] = validation_of(r)
    for method, g in grid.items():
        lrs = sorted(g)
        finite = [lr for lr in lrs if math.isfinite(g[lr][0])]
        axes[0].plot(finite, [g[lr][0] for lr in finite], marker="o", label=method)
        scored = [lr for lr in lrs if g[lr][1] is not None]
        if scored:
            axes[1].plot(scored, [g[lr][1] for lr in scored], marker="o", label=method)
    for ax, name in zip(axes, ("validation answer loss", "validation score")):
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:  # e.g. ASDiv's grid runs: answer loss only
            ax.text(0.5, 0.5, "not scored", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path, plt)


def plot_curves(runs: Mapping[str, list[Mapping]], path) -> Path:
    """Held-out answer loss, score and adapter alignment against step: mean over seeds with a 95% CI band."""
    plt = _pyplot()
    panels = [
        (LOSS, "held-out answer loss"),
        (SCORE, "held-out score"),
        ("align/left_mean", "angle(A, top-r left of G), deg"),
        ("align/right_mean", "angle(B, top-r right of G), deg"),
    ]
    present = [
        (k, t)
        for k, t in panels
        if any(r.get("history") and stats.eval_curve(r["history"], k)[0].size for rs in runs.values() for r in rs)
    ]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(5 * max(len(present), 1), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        bands = []
        for method, rs in runs.items():
            hs = [r["history"] for r in rs if stats.eval_curve(r["history"], key)[0].size]
            if not hs:
                continue
            b = stats.band(hs, key)
            bands.append(b)
            (line,) = ax.plot(b["step"], b["mean"], marker="o", ms=3, label=f"{method} (n={len(hs)})")
            ax.fill_between(b["step"], b["low"], b["high"], color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key == LOSS:  # the step-0 loss is many times the trained ones: zoom on those, say where step 0 is
            _zoom_past_step_0(ax, bands, title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path, plt)


def _zoom_past_step_0(ax, bands: Sequence[Mapping], title: str) -> None:
    """Y limits that fit every curve's mean after step 0 (up to 1.5x), step 0's mean named in the title."""
    later = [m for b in bands for s, m in zip(b["step"], b["mean"]) if s > 0]
    first = [m for b in bands for s, m in zip(b["step"], b["mean"]) if s == 0]
    if later and first and max(first) > 1.5 * max(later):
        ax.set_ylim(0.0, 1.5 * max(later))
        ax.set_title(f"{title} (step 0: {max(first):.2f}, above the axis)")


def _save(fig, path, plt) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the report


def default_levels(runs: Mapping[str, list[Mapping]], reference: str) -> list[float]:
    """The reference's final held-out answer loss (mean over seeds) and the midpoint between its first and final.

    Example:
        >>> default_levels(_seed_runs(example_records()), "lora")
        [1.355, 0.71]
    """
    if reference not in runs:
        return []
    rs = runs[reference]
    end = [v for v in (final(r, "answer_loss") for r in rs) if v is not None]
    start = [stats.eval_curve(r["history"], LOSS)[1][0] for r in rs if stats.eval_curve(r["history"], LOSS)[1].size]
    if not end:
        return []
    end_mean = sum(end) / len(end)
    middle = [round(float(sum(start) / len(start) + end_mean) / 2, 6)] if start else []
    return [*middle, round(float(end_mean), 6)]


def _default_steps(runs: Mapping[str, list[Mapping]]) -> list[float]:
    steps = [set(stats.eval_curve(r["history"], LOSS)[0].tolist()) for rs in runs.values() for r in rs]
    return sorted(set.intersection(*steps)) if steps else []


def write_report(
    records: Sequence[Mapping],
    out_dir,
    *,
    reference: str = "lora",
    fixed_steps: Sequence[float] | None = None,
    levels: Sequence[float] | None = None,
    ablations: Sequence[tuple[str, str]] = (),
    title: str = "Learning-rate sweep",
) -> Path:
    """Write ``report.md``, ``grid.png`` and ``curves.png`` under ``out_dir``; returns the markdown path.

    ``reference``: the method every other is paired against (default ``lora``); ``fixed_steps``: where to
    read the held-out loss (default: every step all runs evaluated); ``levels``: held-out loss levels for the
    steps-to-level table (default ``default_levels``); ``ablations``: ``[(variant, baseline), ...]`` rows,
    e.g. ``[("lora-one+gamma=auto", "lora-one")]`` (gamma auto against 128).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = _seed_runs(records)
    fixed_steps = list(fixed_steps) if fixed_steps is not None else _default_steps(runs)
    levels = list(levels) if levels is not None else default_levels(runs, reference)
    sections = [
        (f"# {title}", []),
        (f"## Verdict against `{reference}` (paired by seed, 95% CI)", verdict_section(runs, reference)),
        ("## Chosen learning rates (validation answer loss (score) per rate, grid seed)", grid_section(records)),
        ("## Held-out results at the chosen rates (mean ± 95% CI over seeds)", held_out_section(runs)),
        (f"## Paired differences against `{reference}` (95% CI; * excludes 0)", paired_section(runs, reference)),
        ("## Held-out answer loss at fixed steps", steps_section(runs, fixed_steps)),
        ("## Steps to reach held-out answer loss levels", levels_section(runs, levels) if levels else []),
        ("## Ablations (paired by seed)", paired_section(runs, reference, list(ablations)) if ablations else []),
        ("## LoRA-One's gamma", gamma_section(records)),
        ("## Diagnostics (degrees: 0 = inside G's top-r subspaces, 90 = orthogonal)", diagnostics_section(runs)),
    ]
    text = []
    for heading, lines in sections:
        if lines or heading.startswith("# "):
            text += [heading, "", *lines, ""]
    plot_grid(records, out_dir / "grid.png")
    if runs:
        plot_curves(runs, out_dir / "curves.png")
        text += ["![validation over the grid](grid.png)", "", "![held-out curves](curves.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(text))
    return path


def example_records() -> list[dict]:
    """A small, made-up sweep (two methods, three rates, two seeds) in the input format, for examples and tests.

    Example:
        >>> len(example_records())
        10
    """
    recs = []
    grid = {"lora": (0.9, 0.75, 0.7), "lora-one": (0.65, 0.6, 0.8)}
    scores = {"lora": (0.5, 0.6, 0.61), "lora-one": (0.62, 0.64, 0.6)}
    for method, losses in grid.items():
        for lr, loss, score in zip((1e-4, 3e-4, 1e-3), losses, scores[method]):
            recs.append(
                {"method": method, "lr": lr, "seed": 0, "phase": "grid", "val": {"answer_loss": loss, "score": score}}
            )
    for method, lr, end in (("lora", 1e-3, 0.7), ("lora-one", 3e-4, 0.6)):
        for seed in (0, 1):
            e = end + 0.02 * seed
            history = [
                {"step": 0, LOSS: 2.0, SCORE: 0.3},
                {"step": 10, "loss": 1.0},
                {"step": 25, LOSS: (2.0 + e) / 2, SCORE: 0.5},
                {"step": 50, LOSS: e, SCORE: 0.6 + 0.05 * (method != "lora")},
            ]
            recs.append({"method": method, "lr": lr, "seed": seed, "phase": "seeds", "history": history})
    return recs
