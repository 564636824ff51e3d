"""LoRA-One against LoRA and its peers on real data, with a learning-rate search, seeds and error bars.

    python benchmarks/quality.py                  # SmolLM2-135M on ASDiv and tweet sentiment (~5 h on 2 CPU cores)
    python benchmarks/quality.py --quick          # the toy model, a few steps: checks the pipeline in ~3 min
    python benchmarks/quality.py --report-only    # redraw the table and plots from the saved runs

Protocol (one code path, the trainer's recipe: clip 1.0 -> [preconditioner] -> AdamW (0.9, 0.999, 1e-8),
weight decay 0, linear decay after 3% warmup, rsLoRA rank 8 / alpha 16 on q/k/v/o/gate/up/down, gamma 128,
the gradient from 8 one-example micro-batches of training data):

* every method trains ``--steps`` steps of batch 8 on the same data order for a given seed;
* each method's learning rate is chosen from ``--lrs`` on a validation split carved from the training data
  (never trained on, never reported): the lowest validation answer loss (ASDiv) or the highest validation
  accuracy, ties broken by the loss (the choice task), with seed 0;
* at that learning rate, ``--seeds`` seeds are trained; the held-out split (the task's eval split, never
  used for selection) is scored at steps 0, S/2 and S: answer loss for both tasks, accuracy for the choice
  task, and at the end exact match of greedy generations for ASDiv;
* the choice task is tweet sentiment, not BoolQ: BoolQ's passages make a step ~5x and a dev-set evaluation
  (3,270 questions of ~200 tokens) ~15 minutes here, which does not fit 2 CPU cores with 6 methods x
  (3 learning rates + 2 seeds); tweets are short, 3-way, with 35k training and 2,000 held-out examples.

Every run is saved as it ends (``runs/quality/<task>/<method>/lr<lr>-seed<seed>.json``), so an interrupted
benchmark resumes where it stopped. The report (``runs/quality/report.md`` and ``<task>.png``) gives mean and
spread over seeds at fixed steps and the number of steps each method needs to reach LoRA's final training
loss. It prints the devices it ran on and runs unchanged on a GPU/TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import datasets
import jax
import numpy as np

import lora_one_jax as lj
from lora_one_jax.data import Task, load_task
from lora_one_jax.eval import Evaluator
from lora_one_jax.models import load_model
from lora_one_train.config import RunConfig
from lora_one_train.run import Context, Phases, fit

METHODS = ["lora", "lora-one-init", "lora-one", "lora-precond", "pissa", "lora-ga"]
TASKS = {"asdiv": {"max_len": 96, "score_during": False}, "tweet-sentiment": {"max_len": 64, "score_during": True}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


#: ``--ablate``: LoRA-One variants (init section overrides) trained at LoRA-One's chosen learning rate.
ABLATIONS = {
    "gamma16": {"init": {"gamma": 16.0}},
    "gamma512": {"init": {"gamma": 512.0}},
    "grad64": {"init": {"grad_examples": 64, "grad_batch_size": 8}},
    "damping1e-3": {"optim": {"damping": 1e-3}},
}


def run_config(args, task: str, method: str, lr: float, seed: int, out: Path, variant: str = "") -> RunConfig:
    over = ABLATIONS.get(variant, {})
    return RunConfig.from_dict(
        {
            "name": f"{method}{'-' + variant if variant else ''}-lr{lr:g}-seed{seed}",
            "output_dir": str(out / task / "runs" / "{name}"),
            "seed": seed,
            "methods": [method],
            "model": {"spec": args.model},
            "task": {"spec": task, "max_len": TASKS[task]["max_len"]},
            "lora": {"rank": 8, "alpha": 16.0, "rslora": True, "targets": TARGETS},
            "init": {"grad_examples": 8, "grad_batch_size": 1, "gamma": 128.0, **over.get("init", {})},
            "optim": {
                "learning_rate": lr,
                "schedule": "linear",
                "warmup_ratio": 0.03,
                "weight_decay": 0.0,
                "clip_norm": 1.0,
                **over.get("optim", {}),
            },
            "train": {"steps": args.steps, "batch_size": 8, "log_every": 1},
            "eval": {
                "every": args.steps // 2,
                "limit": args.eval_limit,
                "batch_size": 16,
                "score": TASKS[task]["score_during"],
            },
            "checkpoint": {"every": 0, "keep": 1},
            "export": {"adapters": True, "peft": False, "merged": False},
        }
    )


def split_validation(task: Task, size: int, seed: int) -> tuple[Task, object]:
    """(the task with ``size`` training examples held back and the rest shuffled by ``seed``, those examples)."""
    validation = task.train.select(range(size))
    rest = task.train.select(range(size, len(task.train))).shuffle(seed=seed).flatten_indices()
    return dataclasses.replace(task, train=rest), validation


def trained(ctx: Context, method: str):
    """``(frozen base, adapters)`` of a finished run, from its exported files."""
    from lora_one_jax.export import load_adapters

    folder = ctx.cfg.out_dir / method
    adapters, _ = load_adapters(folder / "adapters")
    base = ctx.params
    if method in ("pissa", "lora-ga"):  # they trained on the residual base
        initial, _ = load_adapters(folder / "initial_adapters")
        base = lj.unmerge(ctx.params, initial, ctx.cfg.lora)
    return base, adapters


_TASKS: dict = {}
_GRADS: dict = {}  # (task, seed, examples) -> the gradient estimate, shared by every method and learning rate


def context(args, shared, task_name, method, lr, seed, out, variant="") -> Context:
    model, params, tok, steps_cache, evaluator = shared
    cfg = run_config(args, task_name, method, lr, seed, out, variant)
    if task_name not in _TASKS:
        _TASKS[task_name] = load_task(task_name, seed=0)
    task, validation = split_validation(_TASKS[task_name], args.val_size, seed)
    ctx = Context(
        cfg,
        model,
        params,
        tok,
        task,
        evaluator,
        Phases(),
        progress=False,
        steps=steps_cache,
        grads=_GRADS.get((task_name, seed, cfg.init.grad_examples)),
    )
    return ctx, validation


def label(method: str, variant: str = "") -> str:
    """``method``, or ``"method (variant)"`` for an ablation: its name in prints and in the report."""
    return f"{method} ({variant})" if variant else method


def record_path(out: Path, task_name, method, lr, seed, variant="") -> Path:
    return out / task_name / (method + (f"-{variant}" if variant else "")) / f"lr{lr:g}-seed{seed}.json"


def run_one(args, shared, task_name, method, lr, seed, out, variant="") -> dict:
    """Train one (method, lr, seed) and measure it on the validation split; saved, so reruns skip it."""
    path = record_path(out, task_name, method, lr, seed, variant)
    if path.exists():
        return json.loads(path.read_text())
    if args.report_only:
        raise SystemExit(f"--report-only: {path} is missing; run the benchmark first")
    ctx, validation = context(args, shared, task_name, method, lr, seed, out, variant)
    start = time.perf_counter()
    result = fit(ctx, method)
    if ctx.grads is not None:
        _GRADS[(task_name, seed, ctx.cfg.init.grad_examples)] = ctx.grads
    base, adapters = trained(ctx, method)
    if ctx.task.kind == "choice":
        val = ctx.evaluator.evaluate(base, adapters, validation, answer_loss=True, progress=False)
        val_score, val_loss = val.value, val.answer_loss
    else:
        nll, count = ctx.evaluator.answer_nll(
            base, adapters, validation["prompt"], validation["answer"], progress=False
        )
        val_score, val_loss = None, float(nll.sum() / max(count.sum(), 1))
    record = {
        "task": task_name,
        "method": method,
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "train_loss": [r["loss"] for r in result["history"] if "loss" in r],
        "evals": [
            {k.removeprefix("eval/"): v for k, v in r.items()} for r in result["history"] if "eval/answer_loss" in r
        ],
        "val_score": val_score,
        "val_loss": val_loss,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")
    print(
        f"  {task_name} {label(method, variant)} lr={lr:g} seed={seed}: validation loss {val_loss:.4f}, "
        f"score {val_score} ({record['seconds']:.0f} s)",
        flush=True,
    )
    return record


def with_test_score(args, shared, record, out) -> dict:
    """The final held-out score of a reported run: accuracy on the whole eval split (choice), or exact match
    of greedy generations on ``--test-limit`` examples (ASDiv)."""
    if "test_score" in record:
        return record
    variant = record.get("variant", "")
    ctx, _ = context(args, shared, record["task"], record["method"], record["lr"], record["seed"], out, variant)
    base, adapters = trained(ctx, record["method"])
    test = (
        ctx.task.eval
        if ctx.task.kind == "choice"
        else ctx.task.eval.select(range(min(args.test_limit, len(ctx.task.eval))))
    )
    r = ctx.evaluator.evaluate(base, adapters, test, answer_loss=True, progress=False)
    record.update(test_score=r.value, test_loss=r.answer_loss, test_size=r.total, test_metric=r.metric)
    record_path(out, record["task"], record["method"], record["lr"], record["seed"], variant).write_text(
        json.dumps(record) + "\n"
    )
    print(
        f"  {record['task']} {label(record['method'], variant)} seed={record['seed']}: "
        f"held-out {r.metric} {r.value:.3f}",
        flush=True,
    )
    return record


def better(a: dict, b: dict, kind: str) -> bool:
    """Whether run ``a`` beats ``b`` on the validation split (accuracy, then loss; or loss)."""
    if kind == "choice" and a["val_score"] != b["val_score"]:
        return a["val_score"] > b["val_score"]
    return a["val_loss"] < b["val_loss"]


# ----------------------------------------------------------------------------- report


def mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def steps_to_reach(losses, target, window=5) -> int | None:
    """The first step at which the running mean (``window`` steps) of the training loss is <= ``target``."""
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    hits = np.flatnonzero(smooth <= target)
    return int(hits[0]) + window if hits.size else None


def report(out: Path, results: dict, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"## Quality: {args.model}, {args.steps} steps of batch 8, seeds {list(range(args.seeds))}", ""]
    for task_name, by_method in results.items():
        kind = "choice" if TASKS[task_name]["score_during"] else "number"
        metric = "accuracy" if kind == "choice" else "exact match"
        lora_final = (
            statistics.mean(np.mean(r["train_loss"][-5:]) for r in by_method["lora"]["runs"])
            if "lora" in by_method
            else None
        )
        lines += [
            f"### {task_name} (held-out {metric}: {next(iter(by_method.values()))['runs'][0].get('test_size')} "
            "examples; answer loss in nats per answer token)",
            "",
            f"| method | lr (chosen on validation) | answer loss step 0 | step {args.steps // 2} | step {args.steps} "
            f"| held-out {metric} | training loss (last 5 steps) | steps to LoRA's final training loss |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        panels = 3 if kind == "choice" else 2  # the choice task also plots its held-out accuracy
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2))
        for method, entry in by_method.items():
            runs = entry["runs"]
            at = {e["step"]: [] for e in runs[0]["evals"]}
            for r in runs:
                for e in r["evals"]:
                    at.setdefault(e["step"], []).append(e["answer_loss"])
            reach = [steps_to_reach(r["train_loss"], lora_final) for r in runs] if lora_final else []
            reach_txt = ", ".join("never" if x is None else str(x) for x in reach)
            cells = [mean_spread(at[s]) for s in sorted(at)][:3]
            lines.append(
                f"| {method} | {entry['lr']:g} | "
                + " | ".join(cells)
                + f" | {mean_spread(r.get('test_score') for r in runs)} "
                f"| {mean_spread(np.mean(r['train_loss'][-5:]) for r in runs)} | {reach_txt} |"
            )
            if " (" in method:  # ablations: in the table only
                continue
            losses = np.array([r["train_loss"] for r in runs])
            steps = np.arange(1, losses.shape[1] + 1)
            kernel = np.ones(5) / 5
            smooth = np.array([np.convolve(x, kernel, mode="valid") for x in losses])  # no zero-padded edges
            mean, lo, hi = smooth.mean(0), smooth.min(0), smooth.max(0)
            (line,) = axes[0].plot(steps[len(kernel) - 1 :], mean, label=method)
            axes[0].fill_between(steps[len(kernel) - 1 :], lo, hi, color=line.get_color(), alpha=0.15)
            eval_steps = sorted(at)
            for ax, key in zip(axes[1:], ["answer_loss", "score"]):
                vals = np.array([[e[key] for e in r["evals"]] for r in runs])
                ax.errorbar(
                    eval_steps,
                    vals.mean(0),
                    yerr=vals.std(0),
                    marker="o",
                    capsize=3,
                    label=method,
                    color=line.get_color(),
                )
        if kind == "choice":
            axes[2].set_title("held-out accuracy (mean ± std over seeds)")
        axes[0].set_title("training loss (mean of the last 5 steps; band: min-max over seeds)")
        axes[1].set_title("held-out answer loss (mean ± std over seeds)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[1].set_yscale("log")
        fig.suptitle(f"{args.model} on {task_name}")
        fig.tight_layout()
        fig.savefig(out / f"{task_name}.png", dpi=110)
        plt.close(fig)
        lines += ["", f"![{task_name}]({task_name}.png)", ""]
        grid = ", ".join(
            f"{m}: " + " ".join(f"{lr:g}->{v:.3f}" for lr, v in sorted(e["search"].items()))
            for m, e in by_method.items()
            if e["search"]
        )
        lines += [
            f"Validation {'accuracy' if kind == 'choice' else 'answer loss'} by learning rate (seed 0): {grid}",
            "",
        ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="asdiv,tweet-sentiment")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-limit", type=int, default=300, help="held-out examples scored during training")
    parser.add_argument("--test-limit", type=int, default=300, help="held-out ASDiv examples for exact match")
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--quick", action="store_true", help="toy model, 6 steps, 2 learning rates, 2 seeds")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also train LoRA-One with gamma 16 / 512, 64 gradient examples, damping 1e-3",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.lrs, args.seeds, args.eval_limit, args.test_limit, args.val_size = (
            "toy-llama",
            6,
            "1e-3,3e-3",
            2,
            16,
            16,
            16,
        )
        args.out = args.out + "-quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    print(f"JAX {jax.__version__} on {jax.devices()}", flush=True)
    lrs = [float(x) for x in args.lrs.split(",")]
    model, params, tok = load_model(args.model)
    lora = run_config(args, "asdiv", "lora", 1.0, 0, out).lora
    steps_cache: dict = {}
    results: dict = {}
    for task_name in args.tasks.split(","):
        evaluator = Evaluator(model, tok, lora, batch_size=16, max_len=TASKS[task_name]["max_len"])
        shared = (model, params, tok, steps_cache, evaluator)
        kind = "choice" if TASKS[task_name]["score_during"] else "number"
        results[task_name] = {}
        for method in args.methods.split(","):
            search = {lr: run_one(args, shared, task_name, method, lr, 0, out) for lr in lrs}
            best = lrs[0]
            for lr in lrs[1:]:
                if better(search[lr], search[best], kind):
                    best = lr
            runs = [search[best]] + [
                run_one(args, shared, task_name, method, best, seed, out) for seed in range(1, args.seeds)
            ]
            runs = [with_test_score(args, shared, r, out) for r in runs]
            results[task_name][method] = {
                "lr": best,
                "runs": runs,
                "search": {lr: (r["val_score"] if kind == "choice" else r["val_loss"]) for lr, r in search.items()},
            }
        if args.ablate and "lora-one" in results[task_name]:  # LoRA-One's knobs, at its chosen learning rate
            best = results[task_name]["lora-one"]["lr"]
            for variant in ABLATIONS:
                runs = [
                    run_one(args, shared, task_name, "lora-one", best, seed, out, variant) for seed in range(args.seeds)
                ]
                results[task_name][label("lora-one", variant)] = {
                    "lr": best,
                    "runs": [with_test_score(args, shared, r, out) for r in runs],
                    "search": {},
                }
    print(report(out, results, args))


if __name__ == "__main__":
    main()
