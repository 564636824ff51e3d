"""The trainer's configuration: one frozen dataclass per YAML section, unknown keys are errors.

A run config is a YAML file (see ``configs/``) with the sections below, plus command-line overrides
``--set train.steps=200 lora.rank=16`` (values parsed as YAML). ``load_config(name_or_path, overrides)``
returns a validated ``RunConfig``.

Example:
    >>> cfg = RunConfig.from_dict({"train": {"steps": 3}, "lora": {"rank": 4}})
    >>> cfg.train.steps, cfg.lora.rank, cfg.methods
    (3, 4, ('lora-one',))
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lora_one_jax import METHODS, LoraConfig
from lora_one_train.errors import ConfigError

CONFIG_DIR = Path(str(importlib.resources.files("lora_one_train.configs")))  # package data (configs/ in the repo)
DEFAULT_CONFIG = "default"

#: the placeholders ``output_dir`` may use, and ``logging.run_name`` (which also has ``{method}``)
OUTPUT_DIR_FIELDS = ("name",)
RUN_NAME_FIELDS = ("name", "method")
#: where metrics can go (``logging.loggers``)
LOGGERS = ("jsonl", "tensorboard", "wandb")

_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2 floats: PyYAML implements YAML 1.1, where ``1e-4`` (no dot) and ``1E8`` are strings.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads YAML 1.2 floats: ``1e-4`` and ``1E8`` are numbers, not strings.

    Example:
        >>> yaml.load("lr: 1e-4\\neps: 1.0e-8\\nsteps: 5\\nname: 1.2.3", YamlLoader)
        {'lr': 0.0001, 'eps': 1e-08, 'steps': 5, 'name': '1.2.3'}
    """


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML (with YAML 1.2 floats); a syntax error is one ``ConfigError`` line naming ``where``.

    Example:
        >>> parse_yaml("optim: {learning_rate: 3e-4}", "my.yaml")
        {'optim': {'learning_rate': 0.0003}}
        >>> parse_yaml("[q_proj, v_proj", "override 'lora.targets=[q_proj, v_proj'")
        Traceback (most recent call last):
        lora_one_train.errors.ConfigError: override 'lora.targets=[q_proj, v_proj' is not valid YAML: expected ',' or ']', but got '<stream end>' (line 1, column 16)
    """  # noqa: E501
    try:
        return yaml.load(text, YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where_in = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{where_in}") from None


def check_template(template: Any, what: str, fields: tuple[str, ...]) -> None:
    """Refuse a ``str.format`` template with placeholders other than ``fields``, naming them and the valid ones.

    Example:
        >>> check_template("runs/{nam}", "output_dir", ("name",))
        Traceback (most recent call last):
        lora_one_train.errors.ConfigError: output_dir 'runs/{nam}' has the unknown placeholder {nam}; valid: {name}
    """
    valid = ", ".join("{" + f + "}" for f in fields)
    if not isinstance(template, str) or not template:
        raise ConfigError(f"{what} must be a non-empty string (placeholders: {valid}), got {template!r}")
    try:
        used = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as e:
        raise ConfigError(f"{what} {template!r} is not a valid template ({e}); placeholders: {valid}") from None
    unknown = [f for f in used if f not in fields]
    if unknown:
        names = ", ".join("{" + f + "}" for f in unknown)
        raise ConfigError(f"{what} {template!r} has the unknown placeholder {names}; valid: {valid}")
    try:
        template.format(**dict.fromkeys(fields, "x"))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{what} {template!r} is not a valid template ({e}); placeholders: {valid}") from None


def _section(cls, values: Any, name: str):
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {name!r} must be a mapping, got {values!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section {name!r}; valid keys: {known}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"section {name!r}: {e}") from None


def _plain(value):
    """Tuples as lists, recursively (YAML's safe dumper writes no tuples)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _positive_int(value, what, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _number(value, what, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{what} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{what} must be <= {high}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``spec``: a ``lora_one_jax.models.load_model`` spec; ``dtype``: params and compute dtype; ``backend``:
    ``linen`` (Hugging Face Flax classes) or ``nnx`` (tunix's NNX classes, ``pip install -e ".[nnx]"``)."""

    spec: str = "smollm2-135m"
    dtype: str = "float32"
    backend: str = "linen"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.backend not in ("linen", "nnx"):
            raise ConfigError(f"model.backend must be 'linen' or 'nnx', got {self.backend!r}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """``spec``: a ``lora_one_jax.data.load_task`` spec; ``options``: its extra keyword arguments;
    ``train_size``: use only the first examples of the (shuffled) training split."""

    spec: str = "asdiv"
    max_len: int = 128
    eval_size: int | None = None
    train_size: int | None = None
    split_seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _positive_int(self.max_len, "task.max_len")
        if self.train_size is not None:
            _positive_int(self.train_size, "task.train_size")
        if self.max_len < 16:
            raise ConfigError(f"task.max_len must be at least 16, got {self.max_len}")


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """How adapters start: the gradient estimate (methods that need it) and the SVD.

    ``grad_examples`` training examples (the first ones of the shuffled train split, never evaluated)
    in micro-batches of ``grad_batch_size`` (the official recipe: 8 of 1); ``gamma`` is LoRA-One's
    (128, or ``auto``: chosen by LoRA-One's own step on held-out batches) and ``lora_ga_gamma`` LoRA-GA's
    stable gamma (16).

    ``kernels_per_pass`` / ``max_bytes`` (give at most one; None: one pass): the gradient stage streams, one
    group of targeted kernels per pass over the gradient examples, holding at most that many kernels'
    float32 gradients (or that many bytes of them, per device) at once instead of every kernel's (Llama-2-7B,
    all linear layers: 26 GB); each extra pass costs a forward/backward over the gradient examples. The inits
    and diagnostics are the one-pass ones (``lora_one_jax.gradient_factors``; with ``svd: randomized`` a group
    split across passes gets sketches of its own).
    """

    grad_examples: int = 8
    grad_batch_size: int = 1
    micro_batches_per_step: int = 8
    gamma: float | str = 128.0
    lora_ga_gamma: float = 16.0
    svd: str = "auto"
    kernels_per_pass: int | None = None
    max_bytes: int | None = None

    def __post_init__(self):
        _positive_int(self.grad_examples, "init.grad_examples")
        _positive_int(self.grad_batch_size, "init.grad_batch_size")
        _positive_int(self.micro_batches_per_step, "init.micro_batches_per_step")
        if self.gamma != "auto" and not _positive_number(self.gamma):
            raise ConfigError(f"init.gamma must be a positive number or 'auto', got {self.gamma!r}")
        _number(self.lora_ga_gamma, "init.lora_ga_gamma", 0, low_open=True)
        if self.svd not in ("auto", "exact", "randomized"):
            raise ConfigError(f"init.svd must be 'auto', 'exact' or 'randomized', got {self.svd!r}")
        for name in ("kernels_per_pass", "max_bytes"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), f"init.{name}")
        if self.kernels_per_pass is not None and self.max_bytes is not None:
            raise ConfigError(
                "give init.kernels_per_pass or init.max_bytes, not both (set the other to null): "
                "both bound the gradients one pass holds"
            )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """One recipe for every method: clip -> (preconditioner) -> AdamW, linear decay after linear warmup.

    ``warmup_steps`` (or, when None, ``warmup_ratio`` of the steps); ``schedule``: ``linear`` (decay to 0,
    as the paper), ``cosine`` or ``constant``; ``damping`` is the preconditioner's.
    """

    learning_rate: float = 2e-4
    schedule: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    damping: float = 1e-6

    def __post_init__(self):
        _number(self.learning_rate, "optim.learning_rate", 0, low_open=True)
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"optim.schedule must be 'linear', 'cosine' or 'constant', got {self.schedule!r}")
        if self.warmup_steps is not None:
            _positive_int(self.warmup_steps, "optim.warmup_steps", allow_zero=True)
        _number(self.warmup_ratio, "optim.warmup_ratio", 0, 1)
        _number(self.weight_decay, "optim.weight_decay", 0)
        _number(self.b1, "optim.b1", 0, 1)
        _number(self.b2, "optim.b2", 0, 1)
        _number(self.eps, "optim.eps", 0)
        if self.clip_norm is not None:
            _number(self.clip_norm, "optim.clip_norm", 0, low_open=True)
        _number(self.damping, "optim.damping", 0, low_open=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``steps`` optimizer steps of ``batch_size`` x ``grad_accum`` examples (or ``epochs`` over train).

    ``loss_positions``: the output head runs only where the loss is (the answer tokens), not at every
    position (no batch x length x vocab logits; the same loss). ``vocab_chunk``: the cross-entropy over the
    vocabulary in chunks of that many tokens (large vocabularies). ``remat``: rematerialise ``layers`` or
    ``dots`` in the backward pass (less memory, more time; linen models).
    """

    steps: int | None = 200
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    log_every: int = 10
    loss_positions: bool = True
    vocab_chunk: int | None = None
    remat: str = "none"

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of train.steps and train.epochs (set the other to null)")
        if self.steps is not None:
            _positive_int(self.steps, "train.steps")
        if self.epochs is not None:
            _number(self.epochs, "train.epochs", 0, low_open=True)
        _positive_int(self.batch_size, "train.batch_size")
        _positive_int(self.grad_accum, "train.grad_accum")
        _positive_int(self.log_every, "train.log_every")
        if not isinstance(self.loss_positions, bool):
            raise ConfigError(f"train.loss_positions must be true or false, got {self.loss_positions!r}")
        if self.vocab_chunk is not None:
            _positive_int(self.vocab_chunk, "train.vocab_chunk")
        if self.remat not in ("none", "layers", "dots"):
            raise ConfigError(f"train.remat must be 'none', 'layers' or 'dots', got {self.remat!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation every ``every`` steps (0: only before and after) on ``limit`` examples (None: all).

    Every evaluation measures the held-out answer loss; ``score: false`` skips the task metric (accuracy or
    exact match), which for generation tasks costs far more than the loss. The last evaluation can look
    wider: ``final_limit`` / ``final_score`` (None: as ``limit`` / ``score``). ``diagnostics``: with every
    evaluation, the principal angles between the adapters and the initial gradient's top-r subspaces, and
    once at step 0 how stable those subspaces are between two halves of the gradient examples (the run then
    estimates the gradient even when no method starts from it).
    """

    every: int = 0
    limit: int | None = 200
    batch_size: int = 16
    max_new_tokens: int = 16
    score: bool = True
    final_limit: int | None = None
    final_score: bool | None = None
    diagnostics: bool = True

    def __post_init__(self):
        _positive_int(self.every, "eval.every", allow_zero=True)
        for name in ("limit", "final_limit"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), f"eval.{name}")
        for name in ("score", "final_score", "diagnostics"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "final_score"):
                raise ConfigError(f"eval.{name} must be true or false, got {value!r}")
        _positive_int(self.batch_size, "eval.batch_size")
        _positive_int(self.max_new_tokens, "eval.max_new_tokens")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints every ``every`` steps (0: only at the end), ``keep`` of them."""

    every: int = 50
    keep: int = 2

    def __post_init__(self):
        _positive_int(self.every, "checkpoint.every", allow_zero=True)
        _positive_int(self.keep, "checkpoint.keep")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What to write at the end: our adapter files, a PEFT folder, a merged model folder."""

    adapters: bool = True
    peft: bool = True
    merged: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh of a sharded run (see the README's "Scale out"). The default (1, 1, 1) is one device;
    ``data: null`` uses every device left over by ``fsdp`` x ``tensor``. ``rules`` names the partition
    rules (``llama`` or ``replicated``). ``distributed`` calls ``jax.distributed.initialize`` first (on a
    TPU pod or SLURM cluster the three fields after it can stay null: JAX finds them)."""

    data: int | None = 1
    fsdp: int = 1
    tensor: int = 1
    rules: str = "llama"
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        if self.data is not None:
            _positive_int(self.data, "mesh.data")
        _positive_int(self.fsdp, "mesh.fsdp")
        _positive_int(self.tensor, "mesh.tensor")


def _require_wandb() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.loggers lists 'wandb' but wandb is not installed; `pip install wandb` (and `wandb login`, or "
            "WANDB_MODE=offline), or drop 'wandb' from logging.loggers"
        )


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go, besides the progress lines: ``loggers`` among ``jsonl`` (``metrics.jsonl``, always
    kept: resume and the summary read it), ``tensorboard`` (event files under ``tensorboard/``) and ``wandb``
    (needs ``pip install wandb``; its own variables apply, e.g. ``WANDB_MODE=offline``). ``project`` is the
    W&B project, ``run_name`` the run's name with placeholders ``{name}`` and ``{method}`` (None:
    ``{name}/{method}``).

    Example:
        >>> LoggingConfig(loggers=["jsonl"], run_name="{name}-{method}").name_for("default", "lora-one")
        'default-lora-one'
    """

    loggers: tuple[str, ...] = ("jsonl", "tensorboard")
    project: str = "lora-one-jax"
    run_name: str | None = None

    def __post_init__(self):
        loggers = (self.loggers,) if isinstance(self.loggers, str) else self.loggers
        if not isinstance(loggers, (list, tuple)) or any(not isinstance(x, str) for x in loggers):
            raise ConfigError(f"logging.loggers must be a list of names among {list(LOGGERS)}, got {self.loggers!r}")
        object.__setattr__(self, "loggers", tuple(loggers))
        bad = [x for x in loggers if x not in LOGGERS]
        if bad or len(set(loggers)) != len(loggers):
            raise ConfigError(f"logging.loggers {list(loggers)}: unknown or repeated; choose from {list(LOGGERS)}")
        if "jsonl" not in loggers:
            raise ConfigError(f"logging.loggers {list(loggers)} must include 'jsonl' (resume and the summary read it)")
        if not isinstance(self.project, str) or not self.project:
            raise ConfigError(f"logging.project must be a non-empty string, got {self.project!r}")
        if self.run_name is not None:
            check_template(self.run_name, "logging.run_name", RUN_NAME_FIELDS)
        if "wandb" in loggers:
            _require_wandb()

    def name_for(self, name: str, method: str) -> str:
        """The run name a logger shows for ``method`` of the run ``name``."""
        return (self.run_name or "{name}/{method}").format(name=name, method=method)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A fair comparison (``lora-one-train ... --sweep``, or ``enabled: true``): for each of ``methods``
    (None: the run's ``methods``; a label ``<method>+<key>=<value>`` is a variant with ``init.<key>`` (or
    ``<section>.<key>``, sections ``init`` and ``optim``) set, e.g. ``lora-one+gamma=auto``), a learning-rate
    ``grid`` (None: 5 points 3e-5..3e-3, log-spaced; extended once past an edge that wins) on ``grid_seed``,
    each run scored by its final answer loss on ``val_size`` validation examples carved from train; then
    ``seeds`` runs at each method's chosen rate, evaluated as the ``eval`` section says; a report paired
    against ``reference``, with ``ablations`` rows (``[variant, baseline]`` pairs). ``grid_score``: grid runs
    also report the task metric on the validation split (false saves ASDiv's generation)."""

    enabled: bool = False
    methods: tuple[str, ...] | None = None
    grid: tuple[float, ...] | None = None
    grid_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    val_size: int = 300
    reference: str = "lora"
    ablations: tuple[tuple[str, str], ...] = ()
    grid_score: bool = True

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"sweep.enabled must be true or false, got {self.enabled!r}")
        for name in ("methods", "grid", "seeds", "ablations"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ConfigError(f"sweep.{name} must be a list, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        if self.grid is not None and not all(_positive_number(x) for x in self.grid):
            raise ConfigError(f"sweep.grid must list positive learning rates, got {list(self.grid)}")
        if not self.seeds or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.seeds):
            raise ConfigError(f"sweep.seeds must list seeds >= 0, got {list(self.seeds)}")
        _positive_int(self.grid_seed, "sweep.grid_seed", allow_zero=True)
        _positive_int(self.val_size, "sweep.val_size")
        if any(len(pair) != 2 for pair in self.ablations):
            raise ConfigError(f"sweep.ablations must be [variant, baseline] pairs, got {list(self.ablations)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run. ``methods`` lists one method, or several to compare on identical data and seed.

    ``output_dir`` may use ``{name}``; ``seed`` is >= 0; ``restart: true`` (``--restart``) deletes the run's
    checkpoints and starts over instead of resuming.
    """

    name: str = "run"
    output_dir: str = "runs/{name}"
    seed: int = 0
    restart: bool = False
    methods: tuple[str, ...] = ("lora-one",)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    lora: LoraConfig = dataclasses.field(default_factory=lambda: LoraConfig(rank=8, alpha=16.0, rslora=True))
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)

    SECTIONS = {
        "model": ModelConfig,
        "task": TaskConfig,
        "init": InitConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
        "checkpoint": CheckpointConfig,
        "export": ExportConfig,
        "mesh": MeshConfig,
        "logging": LoggingConfig,
        "sweep": SweepConfig,
    }

    def __post_init__(self):
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        object.__setattr__(self, "methods", methods)
        if not methods:
            raise ConfigError("methods is empty; choose from " + ", ".join(METHODS))
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ConfigError(f"methods {list(methods)} repeat a method")
        _positive_int(self.seed, "seed", allow_zero=True)
        if not isinstance(self.restart, bool):
            raise ConfigError(f"restart must be true or false, got {self.restart!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(
                f"name must be a non-empty string (quote numbers: name: '{self.name}'), got {self.name!r}"
            )
        check_template(self.output_dir, "output_dir", OUTPUT_DIR_FIELDS)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from plain data (a parsed YAML file); unknown keys are errors naming the valid ones.

        Example:
            >>> RunConfig.from_dict({"optim": {"lr": 1e-4}})
            Traceback (most recent call last):
            lora_one_train.errors.ConfigError: unknown key(s) ['lr'] in section 'optim'; valid keys: ['learning_rate', 'schedule', 'warmup_steps', 'warmup_ratio', 'weight_decay', 'b1', 'b2', 'eps', 'clip_norm', 'damping']
        """  # noqa: E501
        if not isinstance(values, Mapping):
            raise ConfigError(f"a run config is a mapping of sections, got {type(values).__name__}")
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - top)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown}; valid top-level keys: {sorted(top)}")
        kwargs = {k: v for k, v in values.items() if k not in cls.SECTIONS and k != "lora"}
        for name, section in cls.SECTIONS.items():
            if name in values:
                kwargs[name] = _section(section, values[name], name)
        if "lora" in values:
            lora = values["lora"]
            if not isinstance(lora, (Mapping, LoraConfig)):
                raise ConfigError(f"section 'lora' must be a mapping, got {lora!r}")
            try:
                kwargs["lora"] = lora if isinstance(lora, LoraConfig) else LoraConfig.from_dict(lora)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"section 'lora': {e}") from None
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Plain data (``from_dict``'s inverse), e.g. to save beside a run."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, LoraConfig):
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = _plain(value)
        return out

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))


def parse_overrides(items: list[str]) -> dict:
    """``["train.steps=200", "lora.targets=[q_proj, v_proj]"]`` -> nested dict (values parsed as YAML 1.2).

    Example:
        >>> parse_overrides(["train.steps=200", "lora.targets=[q_proj, v_proj]", "optim.learning_rate=1e-4"])
        {'train': {'steps': 200}, 'lora': {'targets': ['q_proj', 'v_proj']}, 'optim': {'learning_rate': 0.0001}}
    """
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.steps=200)")
        value = parse_yaml(raw, f"override {item!r}") if raw.strip() else None
        node = out
        *parents, leaf = parts
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return out


def merge(base: dict, override: Mapping) -> dict:
    """Nested update of ``base`` by ``override`` (sections merge key by key, values replace).

    Example:
        >>> merge({"train": {"steps": 1, "batch_size": 8}}, {"train": {"steps": 5}})
        {'train': {'steps': 5, 'batch_size': 8}}
    """
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key not in ("options",):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def config_path(name_or_path: str) -> Path:
    """A YAML path for ``name_or_path``: an existing file, or ``configs/<name>.yaml``.

    Example:
        >>> config_path("default").name
        'default.yaml'
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a name in {CONFIG_DIR}; available: {available}")


def load_config(name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (a path or a name in ``configs/``) and apply ``--set`` style overrides.

    Example:
        >>> load_config("default", ["train.steps=3"]).train.steps
        3
    """
    path = config_path(name_or_path)
    values = parse_yaml(path.read_text(), str(path))
    if values is None:
        raise ConfigError(f"{path} is empty; a run config is a mapping of sections, e.g. configs/default.yaml")
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{path} holds a {type(values).__name__}; a run config is a mapping of sections, e.g. configs/default.yaml"
        )
    return RunConfig.from_dict(merge(values, parse_overrides(overrides or [])))


#: The parts of a config that must not change when a run resumes (``methods`` may: each has its own folder).
RESUMABLE_SECTIONS = ("seed", "model", "task", "lora", "init", "optim", "train")
#: Keys inside those sections that change the memory a stage holds, never the numbers: free to change on resume.
MEMORY_ONLY = (("init", "kernels_per_pass"), ("init", "max_bytes"))


def resumable(cfg: RunConfig) -> dict:
    """The part of a config a resumed run must share with its checkpoints (``RESUMABLE_SECTIONS``), as plain data.

    Keys that only set how much memory a stage holds (``MEMORY_ONLY``: the streamed gradient stage's
    ``init.kernels_per_pass`` / ``init.max_bytes``) may change: a run resumed on a smaller device streams.

    Example:
        >>> sorted(resumable(RunConfig()))
        ['init', 'lora', 'model', 'optim', 'seed', 'task', 'train']
        >>> "max_bytes" in resumable(RunConfig())["init"]
        False
    """
    data = cfg.to_dict()
    out = {k: data[k] for k in RESUMABLE_SECTIONS}
    for section, key in MEMORY_ONLY:
        out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


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
