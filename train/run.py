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

import jax
import jax.numpy as jnp
import yaml
from jax.sharding import PartitionSpec as P

import lora_one_jax as lj
from lora_one_jax.data import DataError, load_task
from lora_one_jax.eval import Evaluator
from lora_one_jax.models import load_model
from lora_one_jax.sharding import LLAMA_RULES, make_mesh, shard_params
from lora_one_train import errors
from lora_one_train.config import ConfigError, RunConfig, config_differences, resumable
from lora_one_train.context import Gradient, Keys, Phases, RunContext
from lora_one_train.exports import is_main_process
from lora_one_train.lock import RunLock
from lora_one_train.method import train_method
from lora_one_train.report import plot_curves, summary_table
from lora_one_train.step import example_batches

#: ``mesh.rules`` names -> partition rules (path regex -> PartitionSpec); add your family's here.
PARTITION_RULES = {"llama": LLAMA_RULES, "replicated": ((r".*", P()),)}


def run(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Train every method of ``cfg`` (see module doc); returns ``{"methods": {...}, "phases": {...}}``."""
    with RunLock(cfg.out_dir, enabled=is_main_process()):
        prepare_output(cfg)
        ctx = load(cfg, progress=progress)
        gradient = estimate_gradient(ctx)
        results = {method: train_method(ctx, method, gradient) for method in cfg.methods}
        write_summary(ctx, results)
    return {"methods": results, "phases": ctx.phases.seconds}


# ----------------------------------------------------------------------------- before anything is written


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
            resumable(RunConfig.from_dict(yaml.safe_load(saved.read_text()))), resumable(cfg)
        )
        if differences:
            raise ConfigError(
                f"{cfg.out_dir} holds checkpoints of another configuration ({'; '.join(differences)}); rerun with "
                "--restart to start over there, or choose another output_dir (or name)"
            )
    if is_main_process():
        saved.parent.mkdir(parents=True, exist_ok=True)
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


def load_model_on(cfg: RunConfig, dtype, mesh, rules):
    """``(model, params, tokenizer)`` of ``model.spec`` on the mesh: linen weights placed as they are read,
    NNX params placed after loading by their own sharding metadata (``lora_one_jax.sharding.shard_params``)."""
    if cfg.model.backend == "linen":
        return load_model(cfg.model.spec, dtype=dtype, mesh=mesh, rules=rules)
    model, params, tokenizer = load_model(cfg.model.spec, dtype=dtype, backend="nnx")
    return model, (params if mesh is None else shard_params(params, mesh, rules)), tokenizer


def load(cfg: RunConfig, *, progress: bool) -> RunContext:
    """The run's shared context: the model (placed on the mesh), its targets, the task and its evaluator."""
    phases = Phases()
    print(f"lora-one-train: {cfg.name} -> {cfg.out_dir} ({', '.join(cfg.methods)}) on {jax.devices()}")
    mesh, rules = build_mesh(cfg)
    with phases("load model"):
        dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
        model, params, tokenizer = load_model_on(cfg, dtype, mesh, rules)
    with phases("load task"):
        task = load_run_task(cfg)
    print(f"data: {task.summary(eval_limit=cfg.eval.limit)}")
    targets = lj.find_targets(params, cfg.lora)  # resolved once for the whole run
    evaluator = Evaluator(
        model, tokenizer, cfg.lora, batch_size=cfg.eval.batch_size, max_len=cfg.task.max_len, targets=targets
    )
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


def gradient_inits(methods) -> list[str]:
    """The inits of ``methods`` (names of ``lj.METHODS``) that start from the gradient, sorted."""
    return sorted({lj.METHODS[m].init for m in methods if lj.METHODS[m].needs_gradient})


def estimate_gradient(ctx: RunContext, inits=()) -> Gradient:
    """The gradient stage: the full fine-tuning gradient on the first ``init.grad_examples`` training examples
    (``init.grad_batch_size`` per micro-batch; the held-out split never contains them), once per run, reduced
    to what its users need (``lj.gradient_factors``): the SVD factors of the gradient inits of the fresh
    methods (and of ``inits``: a sweep's other methods), and with the diagnostics G's top-r subspaces and
    their stability between the two halves of the gradient examples. ``init.kernels_per_pass`` /
    ``init.max_bytes`` stream it, one group of kernels per pass; by default one pass."""
    cfg = ctx.cfg
    fresh = [m for m in cfg.methods if m not in checkpointed(cfg)]
    diagnostics = cfg.eval.diagnostics and any(lj.METHODS[m].init is not None for m in cfg.methods)
    needed = gradient_inits(fresh)
    if not diagnostics and not needed:
        return Gradient()
    batches = example_batches(ctx, 0, cfg.init.grad_examples, cfg.init.grad_batch_size)
    one_pass = cfg.init.kernels_per_pass is None and cfg.init.max_bytes is None
    with ctx.phases("gradient + SVD"):
        factors = lj.gradient_factors(
            lj.full_loss_fn(ctx.model),
            ctx.params,
            batches,
            cfg.lora,
            inits=sorted(set(needed) | set(inits)),
            subspaces=diagnostics,
            stability=diagnostics,
            svd=cfg.init.svd,
            key=Keys.of(cfg.seed).init,
            kernels_per_pass=len(ctx.targets) if one_pass else cfg.init.kernels_per_pass,
            max_bytes=cfg.init.max_bytes,
            micro_batches_per_step=cfg.init.micro_batches_per_step,
            progress=ctx.progress,
            targets=ctx.targets,
        )
    if len(factors.passes) > 1:
        print(f"gradient stage: {len(factors.passes)} passes of at most {max(map(len, factors.passes))} kernels")
    return Gradient(
        unit=factors.unit, subspaces=factors.subspaces, stability=factors.stability, passes=len(factors.passes)
    )


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
