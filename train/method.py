"""One method of a run: init (or restore) -> fit with hooks (evaluation, checkpoints, logs) -> export -> summary.

``train_method(ctx, method, gradient)`` is the loop body of ``run()``; everything the method writes goes
under ``<output_dir>/<method>/``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

import lora_one_jax as lj
from lora_one_jax.data import BatchStream
from lora_one_jax.export import load_adapters, save_adapters
from lora_one_jax.gradient import pad_micro_batches
from lora_one_jax.losses import decoder_start_id, mean_nll
from lora_one_jax.nnx import is_nnx_module
from lora_one_jax.progress import progress_bar
from lora_one_jax.sharding import adapter_specs, like_params, place, stacked_adapter_specs
from lora_one_train import errors
from lora_one_train.checkpoint import Checkpointer
from lora_one_train.config import ConfigError, RunConfig, config_differences, resumable
from lora_one_train.context import Gradient, Keys, RunContext
from lora_one_train.exports import export_adapters, export_full, initial_adapters_dir, is_main_process, to_host
from lora_one_train.hooks import LossLog, checkpoint_hook, evaluation_hook, log_record
from lora_one_train.loggers import make_loggers
from lora_one_train.loop import NonFiniteLossError, TrainState, fit
from lora_one_train.step import (
    StepSpec,
    compiled_step,
    example_batches,
    loss_positions_size,
    optimizer,
    schedule,
    stack_micro_batches,
    total_steps,
)

#: The training examples after the gradient examples on which ``init.gamma: auto`` scores its candidates,
#: with a golden-section search over them (measured on SmolLM2: 16 examples choose the gamma 32 choose, and
#: the search costs about 2-3 training steps where scoring all 8 candidates on 32 examples costs 8.5).
GAMMA_EXAMPLES = 16
GAMMA_SEARCH = "golden"


@dataclasses.dataclass(frozen=True)
class Job:
    """One method's fixed pieces: its folder, checkpointer, stream, step spec and frozen base."""

    method: str
    folder: object
    checkpointer: Checkpointer
    stream: BatchStream
    spec: StepSpec
    base: object  # the frozen base params (None for full fine-tuning: the params train)
    shapes: set = dataclasses.field(default_factory=set)  # batch lengths served: each compiles the step once
    chosen: dict = dataclasses.field(default_factory=dict)  # what the init chose (init.gamma: auto), logged at step 0


def train_method(ctx: RunContext, method: str, gradient: Gradient) -> dict:
    """init (or restore) -> fit with hooks -> export -> the method's summary."""
    print(f"--- {method} ---")
    job, state, history = start(ctx, method, gradient)
    resumed = state.step if state.step else None
    state = train(ctx, job, state, history, gradient)
    with ctx.phases("export"):
        exported = export(ctx, job, state)
    return summarize(ctx, job, state, history, resumed, exported)


def initial_adapters(ctx: RunContext, method: str, gradient: Gradient):
    """``(frozen base, adapters, what the init chose)`` at step 0 for ``method``: the gradient inits from the
    gradient stage's factors at gamma 1 (rescaled; LoRA-GA's subtracted from the base), the others from
    ``lj.init_adapters``."""
    init, cfg = lj.METHODS[method].init, ctx.cfg
    if init == "lora-one" and cfg.init.gamma == "auto":
        return auto_gamma_adapters(ctx, gradient)
    if lj.METHODS[method].needs_gradient:
        gamma = cfg.init.gamma if init == "lora-one" else cfg.init.lora_ga_gamma
        with ctx.phases("init (SVD)"):
            adapters = jax.block_until_ready(lj.rescale(gradient.unit[init], gamma, cfg.lora.dtype))
            if lj.METHODS[method].residual_base:
                return lj.unmerge(ctx.params, adapters, cfg.lora, targets=ctx.targets), adapters, {}
            return ctx.params, adapters, {}
    options = {"svd": cfg.init.svd} if init != "lora" else {}
    with ctx.phases("init" if init == "lora" else "init (SVD)"):
        base, adapters = lj.init_adapters(
            ctx.params, cfg.lora, key=Keys.of(cfg.seed).init, method=init, targets=ctx.targets, **options
        )
        return base, jax.block_until_ready(adapters), {}


def auto_gamma_adapters(ctx: RunContext, gradient: Gradient):
    """LoRA-One with ``init.gamma: auto``: the SVD once (the gradient stage's factors at gamma 1), every
    candidate gamma scored by the loss on the training examples after the gradient examples (forward passes
    only), the best used."""
    cfg, unit = ctx.cfg, gradient.unit["lora-one"]
    with ctx.phases("init (gamma: auto)"):
        started = time.perf_counter()
        key = ("gamma loss", cfg.lora)  # one scoring program per run (and per sweep): the loss is cached
        loss = ctx.steps.setdefault(key, lj.lora_loss_fn(ctx.model, cfg.lora, targets=ctx.targets))
        first = cfg.init.grad_examples
        batches = pad_micro_batches(example_batches(ctx, first, first + GAMMA_EXAMPLES, cfg.train.batch_size))
        choice = lj.choose_gamma(loss, ctx.params, None, cfg.lora, batches, unit=unit, search=GAMMA_SEARCH)
        adapters = jax.block_until_ready(lj.rescale(unit, choice.gamma, cfg.lora.dtype))
        seconds = time.perf_counter() - started
    losses = {f"init/gamma_loss/{g:g}": value for g, value in choice.losses.items()}
    record = {"init/gamma": choice.gamma, "init/gamma_forward_passes": choice.forward_passes, **losses}
    record["init/gamma_seconds"] = seconds
    record["init/gamma_compile_seconds"] = choice.compile_seconds  # of those seconds (0 once it is cached)
    return ctx.params, adapters, record


def restored_adapters(ctx: RunContext, folder, method: str):
    """``(frozen base, adapters of the right shapes)`` of a method that resumes from a checkpoint."""
    if lj.METHODS[method].residual_base:
        initial, _ = load_adapters(initial_adapters_dir(folder))
        return lj.unmerge(ctx.params, initial, ctx.cfg.lora, targets=ctx.targets), initial, {}
    shapes = lj.lora_init(ctx.targets, jnp.dtype(ctx.cfg.lora.dtype), key=jax.random.key(0))
    return ctx.params, shapes, {}


def place_trainable(ctx: RunContext, trainable, layout):
    """Stacked adapters sharded like their kernels (A's d_in, B's d_out; rank and stack axes replicated)."""
    if ctx.mesh is None:
        return trainable
    per_module = adapter_specs(ctx.params, ctx.cfg.lora, ctx.rules, ctx.mesh, targets=ctx.targets)
    specs = stacked_adapter_specs(layout, per_module)
    put = lambda x, spec: jax.device_put(x, spec) if isinstance(x, jax.Array) else place(x, spec)
    return {g: {k: put(v, NamedSharding(ctx.mesh, specs[g][k])) for k, v in ad.items()} for g, ad in trainable.items()}


def init_optimizer(ctx: RunContext, spec: StepSpec, trainable):
    """The optimizer state (holding the peak learning rate), every moment sharded like its parameter."""
    state = optimizer(ctx.cfg.optim, spec.total_steps, spec.precondition).init(trainable)
    if ctx.mesh is None:
        return state
    return jax.device_put(state, like_params(state, trainable))


def start(ctx: RunContext, method: str, gradient: Gradient):
    """The method's fixed pieces, its state at step 0 (or as checkpointed) and its history so far."""
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
    base, trainable, layout, chosen = initial_trainable(ctx, method, gradient, resuming=resuming)
    spec = StepSpec(
        lora=cfg.lora,
        layout=layout,
        precondition=lj.METHODS[method].preconditioned,
        optim=cfg.optim,
        total_steps=total_steps(cfg, len(ctx.task.train)),
        vocab_chunk=cfg.train.vocab_chunk,
        remat=cfg.train.remat,
    )
    trainable = place_trainable(ctx, trainable, layout)
    state = TrainState(step=0, trainable=trainable, opt_state=init_optimizer(ctx, spec, trainable))
    job = Job(
        method=method, folder=folder, checkpointer=checkpointer, stream=stream, spec=spec, base=base, chosen=chosen
    )
    if not resuming:
        return job, state, []
    return job, *restore(ctx, job, state)


def initial_trainable(ctx: RunContext, method: str, gradient: Gradient, *, resuming: bool):
    """``(frozen base, trainable, stacking layout, what the init chose)``; for a resuming method, the shapes
    (and residual base) its checkpoint restores into."""
    folder = ctx.cfg.out_dir / method
    if lj.METHODS[method].init is None:  # full fine-tuning: the params train
        return None, ctx.params, None, {}
    if resuming:
        base, adapters, chosen = restored_adapters(ctx, folder, method)
    else:
        base, adapters, chosen = initial_adapters(ctx, method, gradient)
        if lj.METHODS[method].residual_base:
            save_initial(ctx.cfg, folder, adapters)
    trainable, layout = lj.stack_adapters(adapters)
    return base, trainable, layout, chosen


def save_initial(cfg: RunConfig, folder, adapters) -> None:
    initial = to_host(adapters)  # every process gathers (a collective), the first writes
    if is_main_process():
        save_adapters(initial_adapters_dir(folder), initial, cfg.lora)


def check_record(ctx: RunContext, folder, record: dict) -> None:
    """Refuse a checkpoint of another configuration or of other data, naming what differs."""
    differences = config_differences(record.get("config") or {}, resumable(ctx.cfg))
    if differences:
        raise ConfigError(
            f"{folder} holds a checkpoint of another configuration ({'; '.join(differences)}); rerun with "
            "--restart to start over there, or choose another output_dir (or name)"
        )
    data = ctx.task.fingerprint  # computed once, when the task was loaded
    if record.get("data") != data:
        raise errors.DataError(
            f"the data of task {ctx.cfg.task.spec!r} changed since {folder} was checkpointed (fingerprint "
            f"{record.get('data')} then, {data} now); resuming would train on other data with another held-out "
            "split. Restore the data, or rerun with --restart to start over"
        )


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


def train(ctx: RunContext, job: Job, state: TrainState, history: list[dict], gradient: Gradient) -> TrainState:
    """``fit`` with the method's loggers, evaluation and checkpoint hooks (evaluating step 0 first)."""
    cfg = ctx.cfg
    steps = job.spec.total_steps
    if is_main_process():  # the log holds exactly the history (a killed process may have logged past its checkpoint)
        (job.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    run_name = cfg.logging.name_for(cfg.name, job.method)
    resume_step = state.step if state.step else None
    loggers = make_loggers(cfg.logging, job.folder, run_name=run_name, config=cfg.to_dict(), resume_step=resume_step)

    def evaluate_state(state):
        scores = {f"eval/{k}": v for k, v in evaluate(ctx, job, state).items()}
        return {**scores, **diagnose(ctx, job, state, gradient)}

    if state.step == 0:  # the init's choices, the gradient's stability and the step-0 evaluation
        log_record(loggers, history, {"step": 0, **job.chosen, **gradient.stability, **evaluate_state(state)})
    bar = progress_bar(total=steps, initial=state.step, desc=f"train {job.method}", unit="step", enabled=ctx.progress)
    say = lambda line: bar.write(f"[{job.method}] {line}")
    record = lambda info: checkpoint_record(ctx, job, info.step, history)
    hooks = [
        evaluation_hook(lambda info: evaluate_state(info.state), loggers, history, every=cfg.eval.every, say=say),
        checkpoint_hook(job.checkpointer, record, every=cfg.checkpoint.every),
    ]
    step_fn = compiled_step(ctx, job.spec, state.trainable, state.opt_state)
    rng = Keys.of(cfg.seed).dropout

    positions = loss_positions_size(job.stream.rows, cfg.task.max_len) if uses_positions(ctx) else None

    def train_step(state: TrainState, batches):
        stacked = stack_micro_batches(batches, ctx.mesh, positions=positions)
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


def uses_positions(ctx: RunContext) -> bool:
    """Whether training batches carry ``loss_positions`` (``train.loss_positions``; NNX models score every
    position: they ignore them)."""
    return ctx.cfg.train.loss_positions and not is_nnx_module(ctx.model)


def evaluate(ctx: RunContext, job: Job, state: TrainState) -> dict:
    """The task metric and the held-out answer loss (mean NLL per answer token) on ``eval.limit`` examples
    (the last evaluation: ``eval.final_limit`` / ``final_score``)."""
    cfg, split = ctx.cfg, ctx.task.eval
    final = state.step == job.spec.total_steps
    limit = cfg.eval.final_limit if final and cfg.eval.final_limit is not None else cfg.eval.limit
    score = cfg.eval.final_score if final and cfg.eval.final_score is not None else cfg.eval.score
    if limit is not None:
        split = split.select(range(min(limit, len(split))))
    base, adapters = adapters_of(job, state)
    with ctx.phases("evaluation"):
        if score:
            result = ctx.evaluator.evaluate(
                base, adapters, split, max_new_tokens=cfg.eval.max_new_tokens, answer_loss=True, progress=ctx.progress
            )
            scores = {"metric": result.metric, "score": result.value, "answer_loss": result.answer_loss}
        else:
            prompts, answers = split["prompt"], split["answer"]
            nll, count = ctx.evaluator.answer_nll(base, adapters, prompts, answers, progress=ctx.progress)
            scores = {"metric": "answer_loss", "score": None, "answer_loss": mean_nll(nll, count)}
    return scores


def diagnose(ctx: RunContext, job: Job, state: TrainState, gradient: Gradient) -> dict:
    """``align/*``: the principal angles (degrees) between the adapters and the initial gradient's top-r
    subspaces, summarised over modules (empty without the diagnostics or for full fine-tuning)."""
    _, adapters = adapters_of(job, state)
    if gradient.subspaces is None or adapters is None:
        return {}
    with ctx.phases("diagnostics"):
        return lj.alignment_summary(jax.tree.map(jnp.asarray, to_host(adapters)), gradient.subspaces)


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
        "config": resumable(ctx.cfg),
        "data": ctx.task.fingerprint,
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
