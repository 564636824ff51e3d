"""The main job: config -> model -> task -> gradient -> init -> fit (eval, checkpoints) -> export -> summary.

``run(cfg)`` trains every method of ``cfg.methods`` on identical data, seed and code path, and writes
under ``cfg.out_dir``: one folder per method (``metrics.jsonl``, ``checkpoints/``, ``adapters/``,
``peft/``, ``merged/``, ``summary.json``) and, for the run, ``summary.md``, ``summary.json`` and
``curves.png``. Rerunning the same command after a crash resumes every method from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_one_jax as lj
from lora_one_jax.data import BatchStream, load_task, pad_batch, pad_id_of, pad_seq2seq_batch, tokenize
from lora_one_jax.eval import Evaluator
from lora_one_jax.export import fold_residual, load_adapters, save_adapters, save_peft
from lora_one_jax.models import load_model
from lora_one_jax.models.export import save_pretrained
from lora_one_jax.progress import progress_bar
from lora_one_jax.sharding import (
    BATCH_AXES,
    LLAMA_RULES,
    adapter_specs,
    batch_sharding,
    like_params,
    make_mesh,
    place,
    stacked_adapter_specs,
    to_numpy,
)
from lora_one_train.checkpoint import Checkpointer
from lora_one_train.config import METHODS, ConfigError, RunConfig
from lora_one_train.report import plot_curves, summary_table

RESIDUAL_INITS = ("pissa", "lora-ga")  # their frozen base is W - scale * A0 @ B0


class Phases:
    """Wall time per named phase, accumulated."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclasses.dataclass
class Context:
    """What every method of a run shares."""

    cfg: RunConfig
    model: object
    params: object
    tokenizer: object
    task: object
    evaluator: Evaluator
    phases: Phases
    progress: bool
    mesh: object = None  # a jax Mesh when the run is sharded (config section `mesh`), else None
    rules: tuple = ()
    grads: dict | None = None
    steps: dict = dataclasses.field(default_factory=dict)  # compiled train steps, see compiled_step
    loss_fn: object = None  # the full fine-tuning loss (one function: its gradient step compiles once)


# ----------------------------------------------------------------------------- recipe


def schedule(cfg: RunConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then linear decay to 0 (or cosine, or constant).

    Example:
        >>> from lora_one_train.config import RunConfig
        >>> s = schedule(RunConfig.from_dict({"optim": {"warmup_steps": 2, "learning_rate": 1.0}}), 6)
        >>> [round(float(s(i)), 2) for i in range(7)]
        [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_ratio * total_steps))
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if o.schedule == "constant":
        after = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.learning_rate, decay_steps)
    else:
        after = optax.linear_schedule(o.learning_rate, 0.0, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), after], [warmup])


def optimizer(cfg: RunConfig, total_steps: int, precondition: bool) -> optax.GradientTransformation:
    """The one recipe of every method: clip by global norm -> (LoRA-One preconditioner) -> AdamW.

    The AdamW inside follows the schedule's *shape* (peak 1.0): the train step multiplies its updates by
    the peak learning rate, an argument, so runs that differ only in learning rate share one compiled step.

    Example:
        >>> from lora_one_train.config import RunConfig
        >>> opt = optimizer(RunConfig(), 10, precondition=True)
        >>> len(opt.init({"m": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}))
        3
    """
    o = cfg.optim
    shape = schedule(dataclasses.replace(cfg, optim=dataclasses.replace(o, learning_rate=1.0)), total_steps)
    parts = [optax.clip_by_global_norm(o.clip_norm) if o.clip_norm is not None else optax.identity()]
    parts.append(lj.lora_one_precond(o.damping) if precondition else optax.identity())
    parts.append(optax.adamw(shape, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.chain(*parts)


def total_steps(cfg: RunConfig, n_train: int) -> int:
    """Optimizer steps of the run: ``train.steps``, or ``train.epochs`` over the training split."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    per_epoch = n_train // (cfg.train.batch_size * cfg.train.grad_accum)
    return max(1, int(round(cfg.train.epochs * per_epoch)))


# ----------------------------------------------------------------------------- stages


def gradient_batches(ctx: Context) -> list[dict]:
    """The gradient estimate's micro-batches: the first ``init.grad_examples`` training examples (in
    ``seed`` order; the held-out split never contains them), ``init.grad_batch_size`` per micro-batch."""
    cfg = ctx.cfg.init
    train = ctx.task.train
    if len(train) < cfg.grad_examples:
        raise ConfigError(f"init.grad_examples={cfg.grad_examples} but the training split has {len(train)} examples")
    data = tokenize(train.select(range(cfg.grad_examples)), ctx.tokenizer, max_len=ctx.cfg.task.max_len)
    rows = [{"input_ids": i, "prompt_len": n} for i, n in zip(data["input_ids"], data["prompt_len"])]
    size, pad, start = cfg.grad_batch_size, pad_id_of(ctx.tokenizer), decoder_start(ctx.model)
    if start is not None:
        return [
            pad_seq2seq_batch(rows[i : i + size], pad_id=pad, decoder_start_id=start) for i in range(0, len(rows), size)
        ]
    return [pad_batch(rows[i : i + size], pad_id=pad) for i in range(0, len(rows), size)]


def decoder_start(model) -> int | None:
    """An encoder-decoder model's decoder start token (its batches are seq2seq batches), else None."""
    config = getattr(model, "config", None)
    return config.decoder_start_token_id if getattr(config, "is_encoder_decoder", False) else None


def estimate(ctx: Context) -> dict:
    """The full fine-tuning gradient, computed once per run and shared by the methods that need it."""
    if ctx.grads is None:
        with ctx.phases("gradient estimate"):
            ctx.loss_fn = ctx.loss_fn or lj.full_loss_fn(ctx.model)
            ctx.grads = lj.estimate_gradient(
                ctx.loss_fn,
                ctx.params,
                gradient_batches(ctx),
                ctx.cfg.lora,
                micro_batches_per_step=ctx.cfg.init.micro_batches_per_step,
                progress=ctx.progress,
            )
            jax.block_until_ready(ctx.grads)
    return ctx.grads


def initial_adapters(ctx: Context, method: str):
    """``(frozen base, adapters)`` at step 0 for ``method``."""
    init, _ = METHODS[method]
    cfg, key = ctx.cfg, jax.random.key(ctx.cfg.seed)
    kwargs = {}
    if init in ("lora-one", "lora-ga"):
        kwargs = {"grads": estimate(ctx), "gamma": cfg.init.gamma if init == "lora-one" else cfg.init.lora_ga_gamma}
    if init != "lora":
        kwargs["svd"] = cfg.init.svd
    with ctx.phases("init (SVD)" if init != "lora" else "init"):
        base, adapters = lj.init_adapters(ctx.params, cfg.lora, key=key, method=init, **kwargs)
        jax.block_until_ready(adapters)
    return base, adapters


def evaluate(ctx: Context, base, adapters) -> dict:
    """The task metric and the held-out answer loss (mean NLL per answer token) on ``eval.limit`` examples."""
    cfg = ctx.cfg
    split = (
        ctx.task.eval
        if cfg.eval.limit is None
        else ctx.task.eval.select(range(min(cfg.eval.limit, len(ctx.task.eval))))
    )
    with ctx.phases("evaluation"):
        if not cfg.eval.score:
            nll, count = ctx.evaluator.answer_nll(
                base, adapters, split["prompt"], split["answer"], progress=ctx.progress
            )
            return {"metric": "answer_loss", "score": None, "answer_loss": float(nll.sum() / max(count.sum(), 1))}
        result = ctx.evaluator.evaluate(
            base, adapters, split, max_new_tokens=cfg.eval.max_new_tokens, answer_loss=True, progress=ctx.progress
        )
    return {"metric": result.metric, "score": result.value, "answer_loss": result.answer_loss}


def _main() -> bool:
    """Whether this process writes the run's files (the first one; every process computes)."""
    return jax.process_index() == 0


def _append(path: Path, record: dict) -> None:
    if _main():
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _comparable(cfg: RunConfig) -> dict:
    """The parts of a config that must not change when a run resumes."""
    data = cfg.to_dict()
    return {k: data[k] for k in ("seed", "model", "task", "lora", "init", "optim", "train")}


# ----------------------------------------------------------------------------- placement on a mesh


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _batch_sharding(mesh, shape) -> NamedSharding:
    """Stacked micro-batches ``(accum, rows, length)``: rows over the data axes when they divide, else replicated."""
    data = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    return batch_sharding(mesh, ndim=len(shape), batch_axis=1) if shape[1] % data == 0 else NamedSharding(mesh, P())


def _put(x, sharding):
    return jax.device_put(x, sharding) if isinstance(x, jax.Array) else place(x, sharding)


def place_trainable(ctx: Context, trainable, layout):
    """Stacked adapters sharded like their kernels (A's d_in, B's d_out; rank and stack axes replicated)."""
    if ctx.mesh is None:
        return trainable
    specs = stacked_adapter_specs(layout, adapter_specs(ctx.params, ctx.cfg.lora, ctx.rules, ctx.mesh))
    return {g: {k: _put(v, NamedSharding(ctx.mesh, specs[g][k])) for k, v in ad.items()} for g, ad in trainable.items()}


def init_optimizer(ctx: Context, opt, trainable):
    """The optimizer state, every moment sharded like its parameter (counts replicated)."""
    if ctx.mesh is None:
        return opt.init(trainable)
    return jax.jit(opt.init, out_shardings=like_params(jax.eval_shape(opt.init, trainable), trainable))(trainable)


def to_host(tree):
    """Numpy copies of (possibly sharded, possibly multi-host) arrays, the same on every process."""
    return jax.tree.map(to_numpy, tree)


def compiled_step(ctx: Context, init: str, precondition: bool, opt, steps: int, layout, trainable, opt_state):
    """The jitted train step (frozen weights are arguments, the state buffers are donated), built once per
    context for a given recipe and adapter layout and reused by every run that shares them (other seeds,
    other peak learning rates, other methods with the same optimizer)."""
    cfg = ctx.cfg
    leaves, treedef = jax.tree.flatten(trainable)
    key = (
        init == "full",
        precondition,
        steps,
        dataclasses.replace(cfg.optim, learning_rate=1.0),
        cfg.lora,
        layout,
        treedef,
        tuple((x.shape, str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves),
    )
    if key in ctx.steps:
        return ctx.steps[key]
    if init == "full":
        full_loss = lj.full_loss_fn(ctx.model)
        loss_of = lambda base, trainable, batch, rng: full_loss(trainable, batch)
    else:
        lora_loss = lj.lora_loss_fn(ctx.model, cfg.lora)
        use_rng = cfg.lora.dropout > 0

        def loss_of(base, trainable, batch, rng):
            return lora_loss(base, lj.unstack_adapters(trainable, layout), batch, lora_rng=rng if use_rng else None)

    def train_step(base, trainable, opt_state, batches, rng, peak_lr):
        def micro(acc, batch_and_index):
            batch, i = batch_and_index
            loss, g = jax.value_and_grad(loss_of, argnums=1)(base, trainable, batch, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, acc, g), loss

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        accum = jax.tree.leaves(batches)[0].shape[0]
        grads, losses = jax.lax.scan(micro, zeros, (batches, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        updates = jax.tree.map(lambda u: (u * peak_lr).astype(u.dtype), updates)
        return optax.apply_updates(trainable, updates), opt_state, losses.mean(), optax.global_norm(grads)

    if ctx.mesh is None:
        step = jax.jit(train_step, donate_argnums=(1, 2))
    else:  # the state keeps its shardings from step to step
        replicated = NamedSharding(ctx.mesh, P())
        out = (_shardings(trainable), _shardings(opt_state), replicated, replicated)
        step = jax.jit(train_step, donate_argnums=(1, 2), out_shardings=out)
    ctx.steps[key] = step
    return step


# ----------------------------------------------------------------------------- one method


def fit(ctx: Context, method: str) -> dict:
    """Initialise, train with periodic evaluation and checkpoints, export; returns the method's summary."""
    cfg = ctx.cfg
    init, precondition = METHODS[method]
    folder = cfg.out_dir / method
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(folder / "checkpoints", keep=cfg.checkpoint.keep)
    stream = BatchStream(
        ctx.task.train,
        ctx.tokenizer,
        cfg.train.batch_size,
        max_len=cfg.task.max_len,
        seed=cfg.seed,
        decoder_start_id=decoder_start(ctx.model),
    )
    steps = total_steps(cfg, len(ctx.task.train))
    opt = optimizer(cfg, steps, precondition)
    lr = schedule(cfg, steps)
    resumed = ckpt.latest_step()

    # --- init (or restore) ---
    if init == "full":
        base, layout = None, None
        trainable = ctx.params
    else:
        if resumed is not None and init in RESIDUAL_INITS:
            initial, _ = load_adapters(folder / "initial_adapters")
            base = lj.unmerge(ctx.params, initial, cfg.lora)
            adapters = initial
        elif resumed is not None:
            base, adapters = (
                ctx.params,
                lj.lora_init(lj.find_targets(ctx.params, cfg.lora), jnp.dtype(cfg.lora.dtype), key=jax.random.key(0)),
            )  # shapes only
        else:
            base, adapters = initial_adapters(ctx, method)
            if init in RESIDUAL_INITS:
                initial = to_host(adapters)  # every process gathers (a collective), the first writes
                if _main():
                    save_adapters(folder / "initial_adapters", initial, cfg.lora)
        trainable, layout = lj.stack_adapters(adapters)
    trainable = place_trainable(ctx, trainable, layout)
    opt_state = init_optimizer(ctx, opt, trainable)
    start, log = 0, folder / "metrics.jsonl"
    history: list[dict] = []
    if resumed is not None:
        with ctx.phases("checkpoint restore"):
            state, record = ckpt.restore({"trainable": trainable, "opt_state": opt_state})
        if record.get("config") != _comparable(cfg):
            raise ConfigError(
                f"{folder} holds a checkpoint of another configuration (method {record.get('method')!r}); "
                "use another output_dir (or name) for this run, or delete that folder to start over"
            )
        trainable, opt_state, start = state["trainable"], state["opt_state"], int(record["step"])
        stream.restore(record["stream"])
        if log.exists():  # drop what the interrupted process logged after its last checkpoint
            history = [r for r in map(json.loads, log.read_text().splitlines()) if r["step"] <= start]
            if _main():
                log.write_text("".join(json.dumps(r) + "\n" for r in history))
    elif log.exists() and _main():
        log.unlink()

    step_fn = compiled_step(ctx, init, precondition, opt, steps, layout, trainable, opt_state)
    peak_lr = jnp.float32(cfg.optim.learning_rate)
    key = jax.random.key(cfg.seed)

    def current_eval(step):
        evaluation = evaluate(
            ctx,
            base if base is not None else trainable,
            None if layout is None else lj.unstack_adapters(trainable, layout),
        )
        record = {"step": step, **{f"eval/{k}": v for k, v in evaluation.items()}}
        history.append(record)
        _append(log, record)
        return evaluation

    def save(step):
        with ctx.phases("checkpoints"):
            ckpt.save(
                step,
                {"trainable": trainable, "opt_state": opt_state},
                {
                    "step": step,
                    "stream": stream.state(),
                    "method": method,
                    "seed": cfg.seed,
                    "model": cfg.model.spec,
                    "config": _comparable(cfg),
                },
            )

    if start == 0:
        current_eval(0)
    shapes_seen: set = set()  # each new batch shape compiles the step once
    if start < steps:
        bar = progress_bar(total=steps, initial=start, desc=f"train {method}", unit="step", enabled=ctx.progress)
        window_tokens, window_start, pending = 0, time.perf_counter(), []
        other = {k: ctx.phases.seconds.get(k, 0.0) for k in ("evaluation", "checkpoints")}
        loop_start = time.perf_counter()
        for step in range(start + 1, steps + 1):
            batches = lj.gradient.pad_micro_batches(stream.take(cfg.train.grad_accum))
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
            shape = stacked["input_ids"].shape
            if ctx.mesh is not None:  # rows over the data axes; every process supplies its own devices' rows
                rows = _batch_sharding(ctx.mesh, shape)
                stacked = jax.tree.map(lambda x, rows=rows: place(x, rows), stacked)
            trainable, opt_state, loss, gnorm = step_fn(
                base, trainable, opt_state, stacked, jax.random.fold_in(key, step), peak_lr
            )
            shapes_seen.add(tuple(stacked[k].shape[-1] for k in ("input_ids", "labels") if k in stacked))
            window_tokens += int(sum(b["attention_mask"].sum() for b in batches))
            pending.append((step, loss, gnorm))
            if step % cfg.train.log_every == 0 or step == steps:
                jax.block_until_ready(pending[-1][1])
                elapsed = time.perf_counter() - window_start
                for s, step_loss, g in pending:
                    record = {"step": s, "loss": float(step_loss), "grad_norm": float(g), "lr": float(lr(s - 1))}
                    if not np.isfinite(record["loss"]):
                        raise FloatingPointError(
                            f"{method}: the training loss became {record['loss']} at step {s}; "
                            "lower optim.learning_rate or check the data"
                        )
                    history.append(record)
                    _append(log, record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{window_tokens / max(elapsed, 1e-9):.0f}",
                )
                bar.update(len(pending))
                window_tokens, window_start, pending = 0, time.perf_counter(), []
            if cfg.eval.every and step % cfg.eval.every == 0 and step != steps:
                bar.write(f"[{method}] step {step}: {current_eval(step)}")
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != steps:
                save(step)
        bar.close()
        spent = sum(ctx.phases.seconds.get(k, 0.0) - v for k, v in other.items())
        ctx.phases.seconds["training"] = (
            ctx.phases.seconds.get("training", 0.0) + time.perf_counter() - loop_start - spent
        )
        current_eval(steps)
        save(steps)
    ckpt.close()

    # --- export ---
    with ctx.phases("export"):
        exported = export(ctx, folder, method, base, trainable, layout)  # every process gathers, the first writes
    evals = [r for r in history if "eval/answer_loss" in r]
    train_losses = [r["loss"] for r in history if "loss" in r]
    summary = {
        "method": method,
        "steps": steps,
        "resumed_from": resumed,
        "metric": evals[-1]["eval/metric"] if evals else None,
        "score_before": evals[0]["eval/score"] if evals else None,
        "score_after": evals[-1]["eval/score"] if evals else None,
        "answer_loss_before": evals[0]["eval/answer_loss"] if evals else None,
        "answer_loss_after": evals[-1]["eval/answer_loss"] if evals else None,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "compiled_step_shapes": sorted(list(shape) for shape in shapes_seen),  # (length,) or (encoder, decoder)
        "trainable_parameters": int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
        "exports": exported,
    }
    if _main():
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "history": history, "final_state": (trainable, opt_state)}


def export(ctx: Context, folder: Path, method: str, base, trainable, layout) -> dict:
    """The method's exports: our adapter files, a PEFT folder, a merged HF model folder (as configured)."""
    cfg, out = ctx.cfg, {}
    if layout is None:  # full fine-tuning: only a merged model makes sense
        params = to_host(trainable)
        if not _main():
            return out
        if cfg.export.merged or cfg.export.adapters or cfg.export.peft:
            out["merged"] = str(save_pretrained(folder / "merged", ctx.model, params, ctx.tokenizer))
        return out
    adapters = jax.tree.map(np.asarray, to_host(lj.unstack_adapters(trainable, layout)))
    host_base = to_host(base) if cfg.export.merged else None
    if not _main():
        return out
    init, _ = METHODS[method]
    if cfg.export.adapters:
        meta = {"model": cfg.model.spec, "method": method, "residual_base": str(init in RESIDUAL_INITS)}
        out["adapters"] = str(save_adapters(folder / "adapters", adapters, cfg.lora, metadata=meta))
    if cfg.export.peft:
        peft_adapters, peft_config = adapters, cfg.lora
        if init in RESIDUAL_INITS:  # PEFT adds adapters to the original base: fold the residual in
            initial, _ = load_adapters(folder / "initial_adapters")
            peft_adapters, peft_config = fold_residual(adapters, initial, cfg.lora)
        out["peft"] = str(
            save_peft(folder / "peft", peft_adapters, peft_config, base_model_name_or_path=cfg.model.spec)
        )
    if cfg.export.merged:
        merged = lj.merge(host_base, adapters, cfg.lora)
        out["merged"] = str(save_pretrained(folder / "merged", ctx.model, merged, ctx.tokenizer))
    return out


# ----------------------------------------------------------------------------- the run

#: ``mesh.rules`` names -> partition rules (path regex -> PartitionSpec); add your family's here.
PARTITION_RULES = {"llama": LLAMA_RULES, "replicated": ((r".*", P()),)}


def build_mesh(cfg: RunConfig):
    """``(mesh, rules)`` from the ``mesh`` section; ``(None, ())`` for a one-device run."""
    m = cfg.mesh
    if m.rules not in PARTITION_RULES:
        raise ConfigError(f"mesh.rules {m.rules!r} is unknown; choose from {sorted(PARTITION_RULES)}")
    sizes = (m.data, m.fsdp, m.tensor)
    if sizes == (1, 1, 1):
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


def run(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Train every method of ``cfg`` (see module doc); returns ``{"methods": {...}, "phases": {...}}``."""
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if _main():
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    phases = Phases()
    print(f"lora-one-train: {cfg.name} -> {out_dir} ({', '.join(cfg.methods)}) on {jax.devices()}")
    mesh, rules = build_mesh(cfg)
    with phases("load model"):
        dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
        model, params, tokenizer = load_model(cfg.model.spec, dtype=dtype, mesh=mesh, rules=rules)
    with phases("load task"):
        try:
            task = load_task(
                cfg.task.spec,
                seed=cfg.seed,
                split_seed=cfg.task.split_seed,
                eval_size=cfg.task.eval_size,
                **cfg.task.options,
            )
        except (FileNotFoundError, OSError) as e:
            raise ConfigError(f"task {cfg.task.spec!r} could not be loaded: {e}") from e
        if task.train is None:
            raise ConfigError(f"task {cfg.task.spec!r} has no training split; it can only be evaluated")
        if cfg.task.train_size is not None and cfg.task.train_size < len(task.train):
            task = dataclasses.replace(task, train=task.train.select(range(cfg.task.train_size)))
    evaluator = Evaluator(model, tokenizer, cfg.lora, batch_size=cfg.eval.batch_size, max_len=cfg.task.max_len)
    ctx = Context(cfg, model, params, tokenizer, task, evaluator, phases, progress, mesh, rules)
    results = {}
    for method in cfg.methods:
        print(f"--- {method} ---")
        results[method] = fit(ctx, method)
    table = summary_table(results, phases.seconds, cfg)
    print("\n" + table)
    if _main():
        (out_dir / "summary.md").write_text(table + "\n")
        plain = {m: {k: v for k, v in r.items() if k not in ("history", "final_state")} for m, r in results.items()}
        summary = {"methods": plain, "phases": phases.seconds, "config": cfg.to_dict()}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot = plot_curves(
            {m: r["history"] for m, r in results.items()},
            out_dir / "curves.png",
            title=f"{cfg.model.spec} on {cfg.task.spec}",
        )
        print(f"plot: {plot}")
    return {"methods": results, "phases": phases.seconds}
