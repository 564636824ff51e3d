"""What the user sees at the end of a run: a summary table (markdown) and a PNG of the curves."""

from __future__ import annotations

from pathlib import Path


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(results: dict, phases: dict, cfg) -> str:
    """A markdown table: one row per method (held-out score and answer loss before/after, training loss),
    then the time of each phase.

    Example:
        >>> r = {"lora": {"metric": "accuracy", "score_before": 0.3, "score_after": 0.6, "answer_loss_before": 2.0,
        ...      "answer_loss_after": 0.9, "train_loss_first": 2.1, "train_loss_last": 0.8, "steps": 10,
        ...      "compiled_step_shapes": [[1, 8, 32]]}}
        >>> print(summary_table(r, {"training": 12.0}, None).splitlines()[2])
        | lora | 10 | 0.300 | 0.600 | 2.000 | 0.900 | 2.100 -> 0.800 | 1 |
    """
    metric = next((r["metric"] for r in results.values() if r.get("metric")), "score")
    lines = [
        f"| method | steps | held-out {metric} before | after | held-out answer loss before | after "
        "| training loss first -> last | compiled step shapes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, r in results.items():
        lines.append(
            f"| {method} | {r['steps']} | {_fmt(r['score_before'])} | {_fmt(r['score_after'])} "
            f"| {_fmt(r['answer_loss_before'])} | {_fmt(r['answer_loss_after'])} "
            f"| {_fmt(r['train_loss_first'])} -> {_fmt(r['train_loss_last'])} | {len(r['compiled_step_shapes'])} |"
        )
    lines += ["", "| phase | time |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} s |" for name, seconds in phases.items()]
    return "\n".join(lines)


def plot_curves(histories: dict[str, list[dict]], path, *, title: str = "") -> Path:
    """Training loss, held-out score and held-out answer loss against step, one line per method.

    Example:
        >>> import tempfile, pathlib
        >>> h = {"lora": [{"step": 0, "eval/score": 0.3, "eval/answer_loss": 2.0, "eval/metric": "accuracy"},
        ...               {"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.0},
        ...               {"step": 2, "eval/score": 0.5, "eval/answer_loss": 1.2, "eval/metric": "accuracy"}]}
        >>> plot_curves(h, pathlib.Path(tempfile.mkdtemp()) / "c.png").stat().st_size > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metric = "score"
    for method, history in histories.items():
        train = [(r["step"], r["loss"]) for r in history if "loss" in r]
        evals = [r for r in history if "eval/answer_loss" in r]
        if train:
            axes[0].plot(*zip(*train), label=method, alpha=0.85)
        if evals:
            metric = evals[0].get("eval/metric", metric)
            scored = [r for r in evals if r.get("eval/score") is not None]
            axes[1].plot([r["step"] for r in scored], [r["eval/score"] for r in scored], marker="o", label=method)
            axes[2].plot([r["step"] for r in evals], [r["eval/answer_loss"] for r in evals], marker="o", label=method)
    for ax, name in zip(axes, ("training loss", f"held-out {metric}", "held-out answer loss (nats/token)")):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in (axes[0], axes[2]):  # losses span orders of magnitude in the first steps
        ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
