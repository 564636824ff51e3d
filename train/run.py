"""The main job: config -> model -> task -> gradient -> for each method: init -> fit -> export -> summary.

``run(cfg)`` trains every method of ``cfg.methods`` on identical data, seed and code path, and writes
under ``cfg.out_dir``: one folder per method (``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
``adapters/``, ``peft/``, ``merged/``, ``summary.json``) and, for the run, ``config.yaml``, ``summary.md``,
``summary.json`` and ``curves.png``. Rerunning the same command after a crash resumes every method from its
last checkpoint; ``restart=True`` (``--restart``) starts the run's methods over instead.

Guarantees (each tested in ``tests/test_trainer.py`` / ``tests/test_faults.py``): one run at a time per
``output_dir`` (a lock); nothing is written before the configuration is checked against the checkpoints
already there; a checkpoint never holds non-finite state; resuming on changed data is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import yaml
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_one_jax as lj
from lora_one_jax.data import (
    BatchStream,
    DataError,
    fingerprint,
    load_task,
    pad_batch,
    pad_id_of,
    pad_seq2seq_batch,
    tokenize,
)
from lora_one_jax.eval import Evaluator
from lora_one_jax.export import load_adapters, save_adapters
from lora_one_jax.losses import decoder_start_id, mean_nll
from lora_one_jax.models import load_model
from lora_one_jax.progress import progress_bar
from lora_one_jax.sharding import LLAMA_RULES, adapter_specs, like_params, make_mesh, place, stacked_adapter_specs
from lora_one_train import errors
from lora_one_train.checkpoint import Checkpointer
from lora_one_train.config import ConfigError, RunConfig
from lora_one_train.context import Phases, RunContext
from lora_one_train.exports import export_adapters, export_full, initial_adapters_dir, is_main_process, to_host
from lora_one_train.hooks import LossLog, checkpoint_hook, evaluation_hook, log_record
from lora_one_train.lock import RunLock
from lora_one_train.loggers import make_loggers
from lora_one_train.loop import NonFiniteLossError, TrainState, fit
from lora_one_train.report import plot_curves, summary_table
from lora_one_train.step import StepSpec, compiled_step, optimizer, schedule, stack_micro_batches, total_steps

#: ``mesh.rules`` names -> partition rules (path regex -> PartitionSpec); add your family's here.
PARTITION_RULES = {"llama": LLAMA_RULES, "replicated": ((r".*", P()),)}

#: The parts of a config that must not change when a run resumes (``methods`` may: each has its own folder).
RESUMABLE_SECTIONS = ("seed", "model", "task", "lora", "init", "optim", "train")


def run(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Train every method of ``cfg`` (see module doc); returns ``{"methods": {...}, "phases": {...}}``."""
    with RunLock(cfg.out_dir):
        prepare_output(cfg)
        ctx = load(cfg, progress=progress)
        grads = estimate_gradient(ctx)
        results = {method: train_method(ctx, method, grads) for method in cfg.methods}
        write_summary(ctx, results)
    return {"methods": results, "phases": ctx.phases.seconds}


# ----------------------------------------------------------------------------- before anything is written


def comparable(cfg: RunConfig) -> dict:
    """The resumable part of a config (``RESUMABLE_SECTIONS``) as plain data."""
    data = cfg.to_dict()
    return {k: data[k] for k in RESUMABLE_SECTIONS}


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every leaf that differs between two nested dicts.

    Example:
        >>> config_differences({"optim": {"learning_rate": 0.1, "b1": 0.9}}, {"optim": {"learning_rate": 0.2}})
        ['optim.b1: 0.9 -> None', 'optim.learning_rate: 0.1 -> 0.2']
    """
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def method_folders(cfg: RunConfig) -> dict:
    return {method: cfg.out_dir / method for method in cfg.methods}


def checkpointed(cfg: RunConfig) -> list[str]:
    """The methods of ``cfg`` that already have a checkpoint under ``output_dir``."""
    return [m for m, folder in method_folders(cfg).items() if any((folder / "checkpoints").glob("[0-9]*"))]


def prepare_output(cfg: RunConfig) -> None:
    """Start over (``cfg.restart``) or check that the checkpoints already there belong to this configuration,
    then write ``config.yaml``. Nothing is written before the check."""
    saved = cfg.out_dir / "config.yaml"
    if cfg.restart:
        for folder in method_folders(cfg).values():
            shutil.rmtree(folder, ignore_errors=True)
    elif checkpointed(cfg) and saved.is_file():
        differences = config_differences(
            comparable(RunConfig.from_dict(yaml.safe_load(saved.read_text()))), comparable(cfg)
        )
        if differences:
            raise ConfigError(
                f"{cfg.out_dir} holds checkpoints of another configuration ({'; '.join(differences)}); rerun with "
                "--restart to start over there, or choose another output_dir (or name)"
            )
    if is_main_process():
        saved.write_text(yaml.safe_dump({**cfg.to_dict(), "restart": False}, sort_keys=False))


# ----------------------------------------------------------------------------- model, task, gradient


def build_mesh(cfg: RunConfig):
    """``(mesh, rules)`` from the ``mesh`` section; ``(None, ())`` for a one-device run."""
    m = cfg.mesh
    if m.rules not in PARTITION_RULES:
        raise ConfigError(f"mesh.rules {m.rules!r} is unknown; choose from {sorted(PARTITION_RULES)}")
    if (m.data, m.fsdp, m.tensor) == (1, 1, 1):
        return None, ()
    try:
        mesh = make_mesh(m.data, m.fsdp, m.tensor)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % rows:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of mesh data x fsdp = {rows} "
            "(every device of the data axes gets whole rows)"
        )
    return (mesh if mesh.size > 1 else None), PARTITION_RULES[m.rules]


def load_run_task(cfg: RunConfig):
    """The task of ``cfg.task``, its training split cut to ``task.train_size``; data problems are ``DataError``s."""
    try:
        task = load_task(
            cfg.task.spec,
            seed=cfg.seed,
            split_seed=cfg.task.split_seed,
            eval_size=cfg.task.eval_size,
            **cfg.task.options,
        )
    except (FileNotFoundError, OSError, DataError) as e:
        raise errors.DataError(f"task {cfg.task.spec!r} could not be loaded: {e}") from e
    if task.train is None:
        raise ConfigError(f"task {cfg.task.spec!r} has no training split; it can only be evaluated")
    if cfg.task.train_size is not None and cfg.task.train_size < len(task.train):
        task = dataclasses.replace(task, train=task.train.select(range(cfg.task.train_size)))
    return task


def load(cfg: RunConfig, *, progress: bool) -> RunContext:
    """The run's shared context: the model (placed on the mesh), its targets, the task and its evaluator."""
    phases = Phases()
    print(f"lora-one-train: {cfg.name} -> {cfg.out_dir} ({', '.join(cfg.methods)}) on {jax.devices()}")
    mesh, rules = build_mesh(cfg)
    with phases("load model"):
        dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
        model, params, tokenizer = load_model(cfg.model.spec, dtype=dtype, mesh=mesh, rules=rules)
    with phases("load task"):
        task = load_run_task(cfg)
    print(f"data: {task_counts(task, cfg)}")
    evaluator = Evaluator(model, tokenizer, cfg.lora, batch_size=cfg.eval.batch_size, max_len=cfg.task.max_len)
    targets = lj.find_targets(params, cfg.lora)
    return RunContext(
        cfg=cfg,
        model=model,
        params=params,
        tokenizer=tokenizer,
        task=task,
        targets=targets,
        evaluator=evaluator,
        mesh=mesh,
        rules=rules,
        progress=progress,
        phases=phases,
    )


def task_counts(task, cfg: RunConfig) -> str:
    """One line: rows read, duplicates dropped, train, held-out and scored examples."""
    stats = dict(getattr(task, "stats", None) or {})
    stats.update(train=len(task.train), held_out=len(task.eval) if task.eval is not None else 0)
    scored = stats["held_out"] if cfg.eval.limit is None else min(cfg.eval.limit, stats["held_out"])
    line = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items())
    if cfg.eval.limit is not None and cfg.eval.limit > stats["held_out"]:
        line += f" (eval.limit={cfg.eval.limit} is more than the held-out split: all {scored} are scored)"
    return f"{line}, scored {scored}"


def gradient_batches(ctx: RunContext) -> list[dict]:
    """The gradient estimate's micro-batches: the first ``init.grad_examples`` training examples (in ``seed``
    order; the held-out split never contains them), ``init.grad_batch_size`` per micro-batch."""
    cfg, train = ctx.cfg.init, ctx.task.train
    if len(train) < cfg.grad_examples:
        raise ConfigError(f"init.grad_examples={cfg.grad_examples} but the training split has {len(train)} examples")
    data = tokenize(train.select(range(cfg.grad_examples)), ctx.tokenizer, max_len=ctx.cfg.task.max_len)
    rows = [{"input_ids": i, "prompt_len": n} for i, n in zip(data["input_ids"], data["prompt_len"])]
    pad, start = pad_id_of(ctx.tokenizer), decoder_start_id(ctx.model)
    chunks = [rows[i : i + cfg.grad_batch_size] for i in range(0, len(rows), cfg.grad_batch_size)]
    if start is None:
        return [pad_batch(chunk, pad_id=pad) for chunk in chunks]
    return [pad_seq2seq_batch(chunk, pad_id=pad, decoder_start_id=start) for chunk in chunks]


def estimate_gradient(ctx: RunContext) -> dict | None:
    """The full fine-tuning gradient, once per run, if a method that starts from it has not started yet."""
    pending = [m for m in ctx.cfg.methods if lj.METHODS[m].needs_gradient and m not in checkpointed(ctx.cfg)]
    if not pending:
        return None
    with ctx.phases("gradient estimate"):
        grads = lj.estimate_gradient(
            lj.full_loss_fn(ctx.model),
            ctx.params,
            gradient_batches(ctx),
            ctx.cfg.lora,
            micro_batches_per_step=ctx.cfg.init.micro_batches_per_step,
            progress=ctx.progress,
        )
        return jax.block_until_ready(grads)


# ----------------------------------------------------------------------------- one method


@dataclasses.dataclass(frozen=True)
class Job:
    """One method's fixed jobs: its folder, checkpointer, stream, step spec and frozen base."""

    method: str
    folder: object
    checkpointer: Checkpointer
    stream: BatchStream
    spec: StepSpec
    base: object  # the frozen base params (None for full fine-tuning: the params train)
    shapes: set = dataclasses.field(default_factory=set)  # batch lengths served: each compiles the step once


def train_method(ctx: RunContext, method: str, grads) -> dict:
    """init (or restore) -> fit with hooks -> export -> the method's summary."""
    print(f"--- {method} ---")
    job, state, history = start(ctx, method, grads)
    resumed = state.step if state.step else None
    state = train(ctx, job, state, history)
    with ctx.phases("export"):
        exported = export(ctx, job, state)
    return summarize(ctx, job, state, history, resumed, exported)


def initial_adapters(ctx: RunContext, method: str, grads):
    """``(frozen base, adapters)`` at step 0 for ``method``."""
    init, cfg = lj.METHODS[method].init, ctx.cfg
    options = {"svd": cfg.init.svd} if init != "lora" else {}
    if lj.METHODS[method].needs_gradient:
        options.update(grads=grads, gamma=cfg.init.gamma if init == "lora-one" else cfg.init.lora_ga_gamma)
    with ctx.phases("init" if init == "lora" else "init (SVD)"):
        base, adapters = lj.init_adapters(
            ctx.params, cfg.lora, key=jax.random.key(cfg.seed), method=init, targets=ctx.targets, **options
        )
        return base, jax.block_until_ready(adapters)


def restored_adapters(ctx: RunContext, folder, method: str):
    """``(frozen base, adapters of the right shapes)`` of a method that resumes from a checkpoint."""
    if lj.METHODS[method].residual_base:
        initial, _ = load_adapters(initial_adapters_dir(folder))
        return lj.unmerge(ctx.params, initial, ctx.cfg.lora, targets=ctx.targets), initial
    shapes = lj.lora_init(ctx.targets, jnp.dtype(ctx.cfg.lora.dtype), key=jax.random.key(0))
    return ctx.params, shapes


def place_trainable(ctx: RunContext, trainable, layout):
    """Stacked adapters sharded like their kernels (A's d_in, B's d_out; rank and stack axes replicated)."""
    if ctx.mesh is None:
        return trainable
    specs = stacked_adapter_specs(layout, adapter_specs(ctx.params, ctx.cfg.lora, ctx.rules, ctx.mesh))
    put = lambda x, spec: jax.device_put(x, spec) if isinstance(x, jax.Array) else place(x, spec)
    return {g: {k: put(v, NamedSharding(ctx.mesh, specs[g][k])) for k, v in ad.items()} for g, ad in trainable.items()}


def init_optimizer(ctx: RunContext, spec: StepSpec, trainable):
    """The optimizer state (holding the peak learning rate), every moment sharded like its parameter."""
    state = optimizer(ctx.cfg.optim, spec.total_steps, spec.precondition).init(trainable)
    if ctx.mesh is None:
        return state
    return jax.device_put(state, like_params(state, trainable))


def start(ctx: RunContext, method: str, grads):
    """The method's fixed jobs, its state at step 0 (or as checkpointed) and its history so far."""
    cfg, folder = ctx.cfg, ctx.cfg.out_dir / method
    folder.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(folder / "checkpoints", keep=cfg.checkpoint.keep)
    resuming = checkpointer.latest_step() is not None
    stream = BatchStream(
        ctx.task.train,
        ctx.tokenizer,
        cfg.train.batch_size,
        max_len=cfg.task.max_len,
        seed=cfg.seed,
        decoder_start_id=decoder_start_id(ctx.model),
    )
    if lj.METHODS[method].init is None:
        base, trainable, layout = None, ctx.params, None
    else:
        base, adapters = restored_adapters(ctx, folder, method) if resuming else initial_adapters(ctx, method, grads)
        if not resuming and lj.METHODS[method].residual_base:
            save_initial(cfg, folder, adapters)
        trainable, layout = lj.stack_adapters(adapters)
    spec = StepSpec(
        lora=cfg.lora,
        layout=layout,
        precondition=lj.METHODS[method].preconditioned,
        optim=cfg.optim,
        total_steps=total_steps(cfg, len(ctx.task.train)),
    )
    trainable = place_trainable(ctx, trainable, layout)
    state = TrainState(step=0, trainable=trainable, opt_state=init_optimizer(ctx, spec, trainable))
    job = Job(method=method, folder=folder, checkpointer=checkpointer, stream=stream, spec=spec, base=base)
    if not resuming:
        return job, state, []
    return job, *restore(ctx, job, state)


def save_initial(cfg: RunConfig, folder, adapters) -> None:
    initial = to_host(adapters)  # every process gathers (a collective), the first writes
    if is_main_process():
        save_adapters(initial_adapters_dir(folder), initial, cfg.lora)


def check_record(ctx: RunContext, folder, record: dict) -> None:
    """Refuse a checkpoint of another configuration or of other data, naming what differs."""
    differences = config_differences(record.get("config") or {}, comparable(ctx.cfg))
    if differences:
        raise ConfigError(
            f"{folder} holds a checkpoint of another configuration ({'; '.join(differences)}); rerun with "
            "--restart to start over there, or choose another output_dir (or name)"
        )
    data = data_fingerprint(ctx.cfg)
    if record.get("data") != data:
        raise errors.DataError(
            f"the data of task {ctx.cfg.task.spec!r} changed since {folder} was checkpointed (fingerprint "
            f"{record.get('data')} then, {data} now); resuming would train on other data with another held-out "
            "split. Restore the data, or rerun with --restart to start over"
        )


def data_fingerprint(cfg: RunConfig) -> str:
    return fingerprint(cfg.task.spec, **cfg.task.options)


def restore(ctx: RunContext, job: Job, state: TrainState):
    """The newest readable checkpoint: the state, the stream position and the history up to it."""
    with ctx.phases("checkpoint restore"):
        like = {"trainable": state.trainable, "opt_state": state.opt_state}
        restored, record = job.checkpointer.restore(
            like, accept=lambda record: check_record(ctx, job.folder, record), warn=lambda s: print(s, file=sys.stderr)
        )
    job.stream.restore(record["stream"])
    step = int(record["step"])
    return TrainState(step=step, trainable=restored["trainable"], opt_state=restored["opt_state"]), record["history"]


def train(ctx: RunContext, job: Job, state: TrainState, history: list[dict]) -> TrainState:
    """``fit`` with the method's loggers, evaluation and checkpoint hooks (evaluating step 0 first)."""
    cfg = ctx.cfg
    steps = job.spec.total_steps
    if is_main_process():  # the log holds exactly the history (a killed process may have logged past its checkpoint)
        (job.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    run_name = cfg.logging.name_for(cfg.name, job.method)
    loggers = make_loggers(cfg.logging, job.folder, run_name=run_name, config=cfg.to_dict())
    if state.step == 0:
        log_record(loggers, history, {"step": 0, **{f"eval/{k}": v for k, v in evaluate(ctx, job, state).items()}})
    bar = progress_bar(total=steps, initial=state.step, desc=f"train {job.method}", unit="step", enabled=ctx.progress)
    say = lambda line: bar.write(f"[{job.method}] {line}")
    record = lambda info: checkpoint_record(ctx, job, info.step, history)
    hooks = [
        evaluation_hook(lambda info: evaluate(ctx, job, info.state), loggers, history, every=cfg.eval.every, say=say),
        checkpoint_hook(job.checkpointer, record, every=cfg.checkpoint.every),
    ]
    step_fn = compiled_step(ctx, job.spec, state.trainable, state.opt_state)
    rng = jax.random.key(cfg.seed)

    def train_step(state: TrainState, batches):
        stacked = stack_micro_batches(batches, ctx.mesh)
        job.shapes.add(tuple(stacked[k].shape[-1] for k in ("input_ids", "labels") if k in stacked))
        trainable, opt_state, loss, grad_norm = step_fn(
            job.base, state.trainable, state.opt_state, stacked, jax.random.fold_in(rng, state.step + 1)
        )
        return TrainState(state.step + 1, trainable, opt_state), loss, grad_norm

    lr = schedule(cfg.optim, steps)
    try:
        with ctx.phases("training"):
            state = fit(
                state,
                job.stream,
                hooks,
                train_step=train_step,
                total_steps=steps,
                accum=cfg.train.grad_accum,
                log_every=cfg.train.log_every,
                on_losses=LossLog(loggers, history, lr=lambda s: lr(s - 1), bar=bar),
            )
    except NonFiniteLossError as e:
        saved = job.checkpointer.latest_step()
        raise errors.DivergedError(
            f"{job.method}: {e}. Lower optim.learning_rate (or check the data) and rerun with --restart"
            + (f" (checkpoint {saved} holds finite state)" if saved else "")
        ) from None
    finally:
        bar.close()
        for logger in loggers:
            logger.close()
        job.checkpointer.close()
    return state


def evaluate(ctx: RunContext, job: Job, state: TrainState) -> dict:
    """The task metric and the held-out answer loss (mean NLL per answer token) on ``eval.limit`` examples."""
    cfg, split = ctx.cfg, ctx.task.eval
    if cfg.eval.limit is not None:
        split = split.select(range(min(cfg.eval.limit, len(split))))
    base, adapters = adapters_of(job, state)
    with ctx.phases("evaluation"):
        if not cfg.eval.score:
            nll, count = ctx.evaluator.answer_nll(
                base, adapters, split["prompt"], split["answer"], progress=ctx.progress
            )
            return {"metric": "answer_loss", "score": None, "answer_loss": mean_nll(nll, count)}
        result = ctx.evaluator.evaluate(
            base, adapters, split, max_new_tokens=cfg.eval.max_new_tokens, answer_loss=True, progress=ctx.progress
        )
    return {"metric": result.metric, "score": result.value, "answer_loss": result.answer_loss}


def adapters_of(job: Job, state: TrainState):
    """``(params to run, adapters or None)`` of a state."""
    if job.spec.layout is None:
        return state.trainable, None
    return job.base, lj.unstack_adapters(state.trainable, job.spec.layout)


def checkpoint_record(ctx: RunContext, job: Job, step: int, history: list[dict]) -> dict:
    return {
        "step": step,
        "stream": job.stream.state(),
        "method": job.method,
        "model": ctx.cfg.model.spec,
        "config": comparable(ctx.cfg),
        "data": data_fingerprint(ctx.cfg),
        "history": history,
    }


# ----------------------------------------------------------------------------- export and summary


def export(ctx: RunContext, job: Job, state: TrainState) -> dict:
    if job.spec.layout is None:
        return export_full(ctx, job.folder, state.trainable)
    base, adapters = adapters_of(job, state)
    return export_adapters(ctx, job.folder, job.method, base, adapters)


def summarize(ctx: RunContext, job: Job, state: TrainState, history, resumed, exported) -> dict:
    """The method's summary (also written to ``<method>/summary.json``)."""
    evals = [r for r in history if "eval/answer_loss" in r]
    train_losses = [r["loss"] for r in history if "loss" in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    summary = {
        "method": job.method,
        "steps": job.spec.total_steps,
        "resumed_from": resumed,
        "metric": last.get("eval/metric"),
        "score_before": first.get("eval/score"),
        "score_after": last.get("eval/score"),
        "answer_loss_before": first.get("eval/answer_loss"),
        "answer_loss_after": last.get("eval/answer_loss"),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "compiled_step_shapes": sorted(list(s) for s in job.shapes),
        "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(state.trainable))),
        "exports": exported,
    }
    if is_main_process():
        (job.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "history": history, "final_state": (state.trainable, state.opt_state)}


def write_summary(ctx: RunContext, results: dict) -> None:
    cfg = ctx.cfg
    table = summary_table(results, ctx.phases.seconds, cfg)
    print("\n" + table)
    if not is_main_process():
        return
    (cfg.out_dir / "summary.md").write_text(table + "\n")
    plain = {m: {k: v for k, v in r.items() if k not in ("history", "final_state")} for m, r in results.items()}
    summary = {"methods": plain, "phases": ctx.phases.seconds, "config": cfg.to_dict()}
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    histories = {m: r["history"] for m, r in results.items()}
    plot = plot_curves(histories, cfg.out_dir / "curves.png", title=f"{cfg.model.spec} on {cfg.task.spec}")
    print(f"plot: {plot}")
