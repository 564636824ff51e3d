"""The sweep, run: ``run_sweep(cfg)`` trains what ``sweep.plan`` lists, one run at a time, and writes the report.

Layout under ``output_dir``: one folder per run (``grid/<method>/lr3.00e-04-seed0/``,
``seeds/<method>/...``), each an ordinary trainer run (checkpoints, metrics, exports) with its
``result.json`` written last; ``report.md``, ``grid.png`` and ``curves.png`` at the top. Rerunning the
same command resumes: finished runs are skipped, an interrupted one resumes from its checkpoint, and
the plan (the grid's extension, the chosen rates) is recomputed from what is finished.

The model is loaded once; runs that differ only in learning rate, seed or method share the compiled
train step (``RunContext.steps``) and, per seed, the gradient estimate. For a seed, every method sees the
same training order and the same gradient examples, so the report pairs them by seed. Grid runs are
scored on a validation split carved from train (never the reported split); seeds runs on the held-out split.

A run that would train exactly as a finished one (``twin_config`` equal: e.g. ``lora-one+gamma=auto`` where auto
chose 128 on that seed, beside ``lora-one``) is not trained again: its ``result.json`` is that run's, named in
``same_as`` (training is deterministic: such pairs were equal bit for bit when both were trained).

Example:
    >>> split_label("lora-one+gamma=auto")
    ('lora-one', {'init': {'gamma': 'auto'}})
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import jax

from lora_one_jax.eval import Evaluator
from lora_one_train import errors
from lora_one_train.config import ConfigError, RunConfig, config_differences, merge, parse_yaml
from lora_one_train.context import RunContext
from lora_one_train.exports import is_main_process
from lora_one_train.lock import LOCK_NAME, RunLock, read_lock
from lora_one_train.method import GAMMA_EXAMPLES, auto_gamma_adapters, train_method
from lora_one_train.run import estimate_gradient, gradient_inits, load, load_run_task, prepare_output
from lora_one_train.sweep import DEFAULT_GRID, MIN_VALIDATION, Run, carve_validation, load_results, plan
from lora_one_train.sweep_report import verdict, write_report

#: The sweep's record in its folder (config, processes): a worker that joins must match it (``run_sweep(join=True)``).
SWEEP_RECORD = "sweep.json"
#: Seconds a worker waits before it looks again when every run left is being trained by other workers.
WAIT_SECONDS = 15.0
#: The sections a method label's ``+key=value`` may change (the model, data and adapters stay the run's).
VARIANT_SECTIONS = ("init", "optim")


def split_label(label: str) -> tuple[str, dict]:
    """``(method, overrides)`` of a sweep label ``<method>[+<key>=<value>...]`` (``key``: ``init.<key>`` or
    ``<section>.<key>``; values parsed as YAML)."""
    method, *changes = label.split("+")
    overrides: dict = {}
    for change in changes:
        key, sep, value = change.partition("=")
        section, _, leaf = key.rpartition(".")
        section = section or "init"
        if not sep or not leaf or section not in VARIANT_SECTIONS:
            raise ConfigError(
                f"sweep label {label!r}: {change!r} is not <key>=<value> with a key of {VARIANT_SECTIONS} "
                "(e.g. lora-one+gamma=auto, lora-one+optim.damping=0.001)"
            )
        overrides.setdefault(section, {})[leaf] = parse_yaml(value, f"sweep label {label!r}")
    return method, overrides


def run_config(cfg: RunConfig, run: Run) -> RunConfig:
    """The trainer config of one sweep run: its method (and variant), seed, learning rate and folder."""
    method, overrides = split_label(run.method)
    values = merge(cfg.to_dict(), overrides)
    values.update(
        name=run.name, output_dir=str(run.folder(cfg.out_dir)), methods=[method], seed=run.seed, restart=False
    )
    values["optim"] = {**values["optim"], "learning_rate": run.lr}
    values["sweep"] = {}
    if run.phase == "grid":  # scored once, at the end, on all of the validation split
        score = cfg.sweep.grid_score
        values["eval"] = {**values["eval"], "every": 0, "limit": None, "final_limit": None, "final_score": score}
    return RunConfig.from_dict(values)


def twin_config(cfg: RunConfig, run: Run, gamma: float | None = None) -> dict:
    """What decides how ``run`` trains: its trainer config without its name and folder, with ``init.gamma: auto``
    resolved to ``gamma`` (what auto chose for its seed; ``None``: not known). Two runs of a sweep with equal
    twin configs train the same steps on the same data.

    Example:
        >>> from lora_one_train.config import load_config
        >>> cfg = load_config("sweep-tweets", [])
        >>> auto, fixed = Run("lora-one+gamma=auto", 1e-3, 1, "seeds"), Run("lora-one", 1e-3, 1, "seeds")
        >>> twin_config(cfg, auto, gamma=128.0) == twin_config(cfg, fixed)
        True
        >>> twin_config(cfg, auto, gamma=64.0) == twin_config(cfg, fixed), twin_config(cfg, auto)["init"]["gamma"]
        (False, None)
    """
    values = run_config(cfg, run).to_dict()
    del values["name"], values["output_dir"]
    chosen = gamma if values["init"]["gamma"] == "auto" else values["init"]["gamma"]
    values["init"]["gamma"] = None if chosen is None else float(chosen)
    return values


class Sweep:
    """The sweep's shared pieces: the loaded model (one ``RunContext``), and per seed the task splits and
    per (seed, init) the gradient stage."""

    def __init__(self, cfg: RunConfig, *, progress: bool):
        self.cfg = cfg
        self.base = load(cfg, progress=progress)
        self.tasks: dict = {}
        self.gradients: dict = {}
        self.auto_gammas: dict = {}  # (label, seed) -> (gamma, what auto scored): the choice is the seed's

    def task(self, run_cfg: RunConfig, phase: str):
        """The run's task: train without the validation split; evaluated on it (grid) or on held-out (seeds)."""
        if run_cfg.seed not in self.tasks:  # validation from the whole training pool, then task.train_size
            pool = load_run_task(dataclasses.replace(run_cfg, task=dataclasses.replace(run_cfg.task, train_size=None)))
            skip, size = run_cfg.init.grad_examples + GAMMA_EXAMPLES, self.cfg.sweep.val_size
            rest, val = carve_validation(pool.train, size, seed=run_cfg.task.split_seed, skip=skip, min_size=1)
            if run_cfg.task.train_size is not None:
                rest = rest.select(range(min(run_cfg.task.train_size, len(rest))))
            self.tasks[run_cfg.seed] = (dataclasses.replace(pool, train=rest), val)
        task, val = self.tasks[run_cfg.seed]
        return dataclasses.replace(task, eval=val) if phase == "grid" else task

    def context(self, run_cfg: RunConfig, phase: str) -> RunContext:
        ctx = dataclasses.replace(self.base, cfg=run_cfg, task=self.task(run_cfg, phase))  # shares the compiled steps
        if run_cfg.eval.batch_size != self.cfg.eval.batch_size:
            evaluator = Evaluator(
                ctx.model,
                ctx.tokenizer,
                run_cfg.lora,
                batch_size=run_cfg.eval.batch_size,
                max_len=run_cfg.task.max_len,
                targets=ctx.targets,
            )
            ctx = dataclasses.replace(ctx, evaluator=evaluator)
        return ctx

    def gradient(self, ctx: RunContext):
        """The gradient stage of a run, shared by every run with the same seed and gradient settings (not gamma:
        one stage serves every step size), holding the factors of every gradient init of the sweep."""
        cfg, init = ctx.cfg, ctx.cfg.init
        key = (
            cfg.seed,
            cfg.lora,
            cfg.eval.diagnostics,
            init.grad_examples,
            init.grad_batch_size,
            init.micro_batches_per_step,
            init.svd,
            init.kernels_per_pass,
            init.max_bytes,
        )
        if key not in self.gradients:
            inits = gradient_inits(split_label(label)[0] for label in self.cfg.methods)
            gradient = estimate_gradient(ctx, inits=inits)
            if not gradient.passes:  # nothing needed it (a resumed run): computed by the next run that does
                return gradient
            self.gradients[key] = gradient
        return self.gradients[key]

    def auto_gamma(self, run: Run, ctx: RunContext, results: Mapping[str, Mapping]):
        """``(gamma, its gamma_auto record)`` that ``init.gamma: auto`` chooses for ``run``'s seed (the choice
        depends on the seed's gradient and training examples, not on the rate or phase): from a finished run
        of the same label and seed, else scored now (forward passes only); ``None`` where the gradient stage
        has nothing for it (a resumed run)."""
        key = (run.method, run.seed)
        for r in results.values():
            auto = (r.get("init") or {}).get("gamma_auto")
            if (r.get("method"), r.get("seed")) == key and auto:
                self.auto_gammas.setdefault(key, (float(r["init"]["gamma"]), auto))
        if key not in self.auto_gammas:
            gradient = self.gradient(ctx)
            if "lora-one" not in gradient.unit:
                return None
            _, _, chosen = auto_gamma_adapters(ctx, gradient)
            self.auto_gammas[key] = (float(chosen["init/gamma"]), gamma_auto_of(chosen))
        return self.auto_gammas[key]

    def twin(self, run: Run, ctx: RunContext, results: Mapping[str, Mapping]) -> tuple[str, dict] | None:
        """``(name, init record)`` of a finished run that trains exactly as ``run`` would (see ``twin_config``),
        or ``None``. Only a run with ``init.gamma: auto`` (or one beside such a run) can have one."""
        same_slot = {name: r for name, r in results.items() if in_one_slot(run, run_of(r))}
        if not same_slot:
            return None
        init: dict = {"gamma": twin_config(self.cfg, run)["init"]["gamma"]}
        if init["gamma"] is None:  # gamma: auto, resolved for this seed
            chosen = self.auto_gamma(run, ctx, results)
            if chosen is None:
                return None
            init = {"gamma": chosen[0], "gamma_auto": chosen[1]}
        mine = twin_config(self.cfg, run, init["gamma"])
        for name, r in same_slot.items():
            if twin_config(self.cfg, run_of(r), (r.get("init") or {}).get("gamma")) == mine:
                return name, init
        return None

    def train(self, run: Run, results: Mapping[str, Mapping] | None = None) -> dict:
        """One run of the plan, from scratch or from its checkpoint, or the result of its twin among the
        finished ``results`` (see ``twin``); its result record."""
        run_cfg = run_config(self.cfg, run)
        ctx = self.context(run_cfg, run.phase)
        print(f"=== {run.name} ===")
        twin = self.twin(run, ctx, results or {})
        if twin is not None:
            name, init = twin
            print(f"{run.name}: trains exactly as {name} (gamma {init['gamma']:g}): its result, not trained again")
            run.folder(self.cfg.out_dir).mkdir(parents=True, exist_ok=True)
            twin_init = {k: v for k, v in (results[name].get("init") or {}).items() if k != "gamma_auto"}
            return {**results[name], **record_of(run), "same_as": name, "init": {**twin_init, **init}}
        prepare_output(run_cfg)
        method = run_cfg.methods[0]
        try:
            summary = train_method(ctx, method, self.gradient(ctx))
        except errors.DivergedError as e:
            print(f"{run.name} diverged: {e}")
            return {**record_of(run), "diverged": True, "error": str(e)}
        return {**record_of(run), **results_of(run, summary)}


def in_one_slot(run: Run, other: Run) -> bool:
    """Whether ``run`` and ``other`` are two labels of one method (e.g. ``lora-one`` and
    ``lora-one+gamma=auto``) at the same rate, seed and phase: the only runs that can train exactly alike
    (see ``Sweep.twin``).

    Example:
        >>> in_one_slot(Run("lora-one+gamma=auto", 1e-3, 0, "seeds"), Run("lora-one", 1e-3, 0, "seeds"))
        True
        >>> in_one_slot(Run("lora-one+gamma=auto", 1e-3, 0, "seeds"), Run("lora-one", 1e-3, 1, "seeds"))
        False
    """
    return (
        run.method != other.method
        and (run.lr, run.seed, run.phase) == (other.lr, other.seed, other.phase)
        and split_label(run.method)[0] == split_label(other.method)[0]
    )


def run_of(record: Mapping) -> Run:
    """The run a result record (``record_of``) belongs to."""
    return Run(record["method"], record["lr"], record["seed"], record["phase"])


def record_of(run: Run) -> dict:
    return {"method": run.method, "lr": run.lr, "seed": run.seed, "phase": run.phase, "devices": str(jax.devices())}


def gamma_auto_of(record: Mapping) -> dict:
    """The report's ``gamma_auto`` (scored losses, forward passes, seconds, of which compiling) from the
    ``init/gamma*`` keys ``init.gamma: auto`` logs at step 0.

    Example:
        >>> gamma_auto_of({"init/gamma": 128.0, "init/gamma_loss/128": 1.4, "init/gamma_forward_passes": 2})
        {'losses': {'128': 1.4}, 'forward_passes': 2, 'seconds': None, 'compile_seconds': None}
    """
    return {
        "losses": {
            k.removeprefix("init/gamma_loss/"): v for k, v in record.items() if k.startswith("init/gamma_loss/")
        },
        "forward_passes": record.get("init/gamma_forward_passes"),
        "seconds": record.get("init/gamma_seconds"),
        "compile_seconds": record.get("init/gamma_compile_seconds"),
    }


def results_of(run: Run, summary: dict) -> dict:
    """What the report reads from a finished run: its final evaluation (validation or held-out), its history
    and what its init chose."""
    history = summary["history"]
    last = {"answer_loss": summary["answer_loss_after"], "score": summary["score_after"], "metric": summary["metric"]}
    first = history[0] if history and history[0]["step"] == 0 else {}
    init = {"gamma": first.get("init/gamma")}
    if "init/gamma" in first:
        init["gamma_auto"] = gamma_auto_of(first)
    init["grad_stability"] = {k: v for k, v in first.items() if k.startswith("grad_stability/")}
    plain = {k: v for k, v in summary.items() if k not in ("history", "final_state")}
    return {"val" if run.phase == "grid" else "held_out": last, "history": history, "init": init, "summary": plain}


def write_result(path: Path, record: dict) -> None:
    """``result.json`` written last and atomically: its existence marks the run as done."""
    if not is_main_process():
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def run_sweep(cfg: RunConfig, *, progress: bool = True, join: bool = False) -> Path | None:
    """Run (or resume) the sweep of ``cfg`` (see module doc); returns the report's path.

    ``join=True`` (``--join``): one more worker on the sweep already running in ``cfg``'s folder, with the same
    config (one process each; e.g. one per core or per GPU). Each run is locked while a worker trains it, so
    workers take different runs; a worker waits while every run left is another's (they decide what comes
    next). The sweep's first worker writes the report; a joined one returns ``None``.
    """
    sweep = cfg.sweep
    labels = list(sweep.methods or cfg.methods)
    grid = sweep.grid or DEFAULT_GRID
    if join:
        check_joinable(cfg)
    with contextlib.nullcontext() if join else RunLock(cfg.out_dir, enabled=is_main_process()):
        if not join:
            write_sweep_record(cfg)
        runner = Sweep(cfg, progress=progress)
        if sweep.val_size < MIN_VALIDATION:
            print(
                f"sweep: warning: {sweep.val_size} validation examples make the choice of rate noisy (>= 300 advised)"
            )
        print(f"sweep: {labels} over {list(grid)}, seeds {list(sweep.seeds)}, on {jax.devices()}")
        waiting = ()
        while True:
            results = load_results(cfg.out_dir)
            runs = plan(labels, results, grid=grid, seeds=sweep.seeds, grid_seed=sweep.grid_seed)
            todo = [r for r in runs if r.name not in results]
            if not todo:
                break
            if join:  # the first worker restarted with another config: stop (a pause of it is fine)
                check_joinable(cfg, running=False)
            if train_one(runner, todo, results):
                waiting = ()
            else:  # every run left is being trained by another worker
                if waiting != tuple(todo):
                    print(f"sweep: waiting for other workers ({', '.join(r.name for r in todo)})")
                    waiting = tuple(todo)
                time.sleep(WAIT_SECONDS)
        if join:
            print(f"sweep: nothing left to train; the sweep's first worker writes the report in {cfg.out_dir}")
            return None
        report = write_sweep_report(cfg)
    print("\n".join(verdict(list(load_results(cfg.out_dir).values()), cfg.sweep.reference)))
    print(f"report: {report}")
    return report


def train_one(runner: Sweep, todo: list[Run], results: Mapping[str, Mapping]) -> bool:
    """Train the first run of ``todo`` that no other worker holds, locked while it trains; ``False`` when
    every one is held. A run waits while an earlier run of its slot (``in_one_slot``) is held: it may train
    exactly as that one, and then takes its result instead of training (``Sweep.twin``)."""
    root, held = runner.cfg.out_dir, []
    for run in todo:
        if any(in_one_slot(run, other) for other in held):
            continue
        lock = RunLock(run.folder(root), enabled=is_main_process())
        try:
            lock.acquire()
        except errors.LockError:
            held.append(run)
            continue
        try:
            if not run.result_path(root).exists():  # not finished by another worker since ``results`` was read
                write_result(run.result_path(root), runner.train(run, results))
        finally:
            lock.release()
        return True
    return False


def sweep_record(cfg: RunConfig) -> dict:
    """What ``sweep.json`` holds: the sweep's config (without its folder) and its process count."""
    values = json.loads(json.dumps(cfg.to_dict()))
    values.pop("output_dir", None)
    return {"config": values, "processes": jax.process_count()}


def write_sweep_record(cfg: RunConfig) -> None:
    """``sweep.json`` in the sweep's folder: what a worker that joins must match (written by the first)."""
    if is_main_process():
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        write_result(cfg.out_dir / SWEEP_RECORD, sweep_record(cfg))


def check_joinable(cfg: RunConfig, *, running: bool = True) -> None:
    """Refuse to join a sweep that is not running (checked where ``running``), runs on several processes or
    has another config.

    Example:
        >>> import tempfile
        >>> from lora_one_train.config import load_config
        >>> check_joinable(load_config("sweep-tweets", [f"output_dir={tempfile.mkdtemp()}"]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        lora_one_train.errors.UserError: --join: no sweep is running in ...; start it without --join first
    """
    path = cfg.out_dir / SWEEP_RECORD
    holder = read_lock(cfg.out_dir / LOCK_NAME) if running else None
    if not path.is_file() or (running and (holder is None or not holder.alive())):
        raise errors.UserError(f"--join: no sweep is running in {cfg.out_dir}; start it without --join first")
    recorded, mine = json.loads(path.read_text()), sweep_record(cfg)
    if max(recorded["processes"], mine["processes"]) > 1:
        raise errors.UserError("--join: the workers of a sweep are single processes; a multi-process sweep runs alone")
    differences = config_differences(recorded["config"], mine["config"])
    if differences:
        raise errors.UserError(
            f"--join: the sweep running in {cfg.out_dir} has another config ({'; '.join(differences)}); "
            "join with the same config and overrides"
        )


def write_sweep_report(cfg: RunConfig) -> Path:
    """The report of the sweep of ``cfg`` from the runs finished so far (all of them at the end of
    ``run_sweep``; a partial report while it is still running: what is not finished is left out).

    Example:
        >>> import tempfile
        >>> from lora_one_train.config import load_config
        >>> cfg = load_config("sweep-tweets", [f"output_dir={tempfile.mkdtemp()}"])
        >>> write_sweep_report(cfg).name  # no run finished yet: the title alone
        'report.md'
    """
    records = list(load_results(cfg.out_dir).values())
    return write_report(
        records,
        cfg.out_dir,
        reference=cfg.sweep.reference,
        ablations=[tuple(p) for p in cfg.sweep.ablations],
        title=f"{cfg.model.spec} on {cfg.task.spec}: learning-rate sweep ({jax.devices()[0].platform})",
    )
