"""The recipe and the jitted train step, built by one function keyed on exactly its inputs.

The recipe of every method: clip by global norm -> (LoRA-One preconditioner) -> AdamW following the
schedule's shape (peak 1) -> scale by the peak learning rate. The peak rate is a hyperparameter held in the
optimizer state (``optax.inject_hyperparams``), so runs that differ only in learning rate or seed share one
compiled step: ``StepSpec`` (what the step's program depends on) has no learning rate.

Example:
    >>> from lora_one_jax.config import LoraConfig
    >>> from lora_one_train.config import ConfigError, OptimConfig
    >>> opt = optimizer(OptimConfig(learning_rate=0.5, warmup_steps=0, schedule="constant"), 4, precondition=False)
    >>> state = opt.init({"w": jnp.zeros(2)})
    >>> float(peak_learning_rate(state))
    0.5
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_one_jax as lj
from lora_one_jax import LoraConfig
from lora_one_jax.adapters import Layout
from lora_one_jax.data import pad_batch, pad_id_of, pad_seq2seq_batch, tokenize
from lora_one_jax.gradient import pad_micro_batches
from lora_one_jax.losses import decoder_start_id
from lora_one_jax.sharding import BATCH_AXES, batch_sharding, place
from lora_one_train.config import ConfigError, OptimConfig


def schedule(optim: OptimConfig, total_steps: int, *, peak: float | None = None) -> optax.Schedule:
    """Linear warmup to ``peak`` (default ``optim.learning_rate``), then linear decay to 0 (or cosine, or constant).

    Example:
        >>> s = schedule(OptimConfig(warmup_steps=2, learning_rate=1.0), 6)
        >>> [round(float(s(i)), 2) for i in range(7)]
        [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    peak = optim.learning_rate if peak is None else peak
    warmup = optim.warmup_steps if optim.warmup_steps is not None else int(round(optim.warmup_ratio * total_steps))
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def optimizer(optim: OptimConfig, total_steps: int, precondition: bool) -> optax.GradientTransformation:
    """The one recipe of every method (see module doc); the peak learning rate lives in the state.

    Example:
        >>> opt = optimizer(OptimConfig(learning_rate=0.25), 10, precondition=True)
        >>> state = opt.init({"m": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}})
        >>> float(peak_learning_rate(state))
        0.25
    """
    shape = schedule(optim, total_steps, peak=1.0)

    def recipe(peak_lr):
        return optax.chain(
            optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm is not None else optax.identity(),
            lj.lora_one_precond(optim.damping) if precondition else optax.identity(),
            optax.adamw(shape, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
            optax.scale(peak_lr),
        )

    return optax.inject_hyperparams(recipe)(peak_lr=optim.learning_rate)


def peak_learning_rate(opt_state) -> jax.Array:
    """The peak learning rate an ``optimizer(...)`` state carries."""
    return opt_state.hyperparams["peak_lr"]


def total_steps(cfg, n_train: int) -> int:
    """Optimizer steps of the run: ``train.steps``, or ``train.epochs`` over the training split.

    Example:
        >>> from lora_one_train.config import RunConfig
        >>> total_steps(RunConfig.from_dict({"train": {"steps": None, "epochs": 2, "batch_size": 4}}), 10)
        4
    """
    if cfg.train.steps is not None:
        return cfg.train.steps
    per_epoch = n_train // (cfg.train.batch_size * cfg.train.grad_accum)
    return max(1, int(round(cfg.train.epochs * per_epoch)))


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything the compiled train step depends on, and nothing else: its cache key (with the state's shapes).

    ``layout`` is ``stack_adapters``' layout (None: full fine-tuning, the params train). ``optim`` is kept
    without its learning rate, which the optimizer state carries.
    """

    lora: LoraConfig
    layout: Layout | None
    precondition: bool
    optim: OptimConfig
    total_steps: int
    vocab_chunk: int | None = None
    remat: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "optim", dataclasses.replace(self.optim, learning_rate=1.0))

    def optimizer(self) -> optax.GradientTransformation:
        return optimizer(self.optim, self.total_steps, self.precondition)


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _structure(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves)


def _loss_of(model, spec: StepSpec):
    """``loss(base, trainable, batch, rng)``: the full fine-tuning loss, or the LoRA loss of stacked adapters."""
    options = {"vocab_chunk": spec.vocab_chunk} if spec.vocab_chunk else {}
    if spec.remat != "none":
        options["remat"] = spec.remat
    if spec.layout is None:
        full_loss = lj.full_loss_fn(model, **options)
        return lambda base, trainable, batch, rng: full_loss(trainable, batch)
    lora_loss = lj.lora_loss_fn(model, spec.lora, **options)
    use_rng = spec.lora.dropout > 0

    def loss(base, trainable, batch, rng):
        return lora_loss(base, lj.unstack_adapters(trainable, spec.layout), batch, lora_rng=rng if use_rng else None)

    return loss


def build_train_step(model, spec: StepSpec, *, state_shardings=None, mesh=None):
    """``step(base, trainable, opt_state, batches, rng) -> (trainable, opt_state, loss, grad_norm)``, jitted.

    ``batches`` stacks ``train.grad_accum`` micro-batches (a ``lax.scan`` accumulates their gradients). The
    frozen weights are an argument (never constants); the state buffers are donated; on a mesh the state
    keeps ``state_shardings`` from step to step.
    """
    loss_of = _loss_of(model, spec)
    opt = spec.optimizer()

    def train_step(base, trainable, opt_state, batches, rng):
        def micro(acc, batch_and_index):
            batch, i = batch_and_index
            loss, g = jax.value_and_grad(loss_of, argnums=1)(base, trainable, batch, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, acc, g), loss

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        accum = jax.tree.leaves(batches)[0].shape[0]
        grads, losses = jax.lax.scan(micro, zeros, (batches, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, losses.mean(), optax.global_norm(grads)

    if mesh is None:
        return jax.jit(train_step, donate_argnums=(1, 2))
    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step, donate_argnums=(1, 2), out_shardings=(*state_shardings, replicated, replicated))


def compiled_step(ctx, spec: StepSpec, trainable, opt_state):
    """The run's train step for ``spec`` and this state's shapes, built once and cached in ``ctx.steps``."""
    key = (spec, _structure(trainable), _structure(opt_state))
    if key not in ctx.steps:
        shardings = None if ctx.mesh is None else (_shardings(trainable), _shardings(opt_state))
        ctx.steps[key] = build_train_step(ctx.model, spec, state_shardings=shardings, mesh=ctx.mesh)
    return ctx.steps[key]


def stack_micro_batches(batches: list[dict], mesh=None, *, positions: int | None = None) -> dict:
    """``train.grad_accum`` micro-batches padded to one length and stacked ``(accum, rows, length)``, with
    ``positions`` answer positions per row (``lj.with_loss_positions``: the head runs only there) when given;
    on a mesh the rows go over the data axes when they divide (every process supplies its own devices' rows)."""
    padded = pad_micro_batches(batches)
    if positions is not None:
        padded = [lj.with_loss_positions(b, size=positions) for b in padded]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *padded)
    if mesh is None:
        return stacked
    shape = stacked["input_ids"].shape
    data = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    rows = batch_sharding(mesh, ndim=len(shape), batch_axis=1) if shape[1] % data == 0 else NamedSharding(mesh, P())
    return jax.tree.map(lambda x: place(x, rows), stacked)


def example_batches(ctx, start: int, stop: int, size: int) -> list[dict]:
    """Training examples ``start:stop`` (in ``seed`` order) in batches of ``size`` rows (seq2seq ones for an
    encoder-decoder)."""
    train = ctx.task.train
    if len(train) < stop:
        raise ConfigError(f"the run needs the first {stop} training examples, but the training split has {len(train)}")
    data = tokenize(train.select(range(start, stop)), ctx.tokenizer, max_len=ctx.cfg.task.max_len)
    rows = [{"input_ids": i, "prompt_len": n} for i, n in zip(data["input_ids"], data["prompt_len"])]
    pad, decoder_start = pad_id_of(ctx.tokenizer), decoder_start_id(ctx.model)
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    if decoder_start is None:
        return [pad_batch(chunk, pad_id=pad) for chunk in chunks]
    return [pad_seq2seq_batch(chunk, pad_id=pad, decoder_start_id=decoder_start) for chunk in chunks]


def loss_positions_size(rows: list[dict], max_len: int, multiple: int = 8) -> int:
    """The answer positions per row every training batch gets (one compiled shape per bucket): the longest
    answer (+ eos) of the split, rounded up to ``multiple``, at most ``max_len``.

    Example:
        >>> loss_positions_size([{"input_ids": [5, 6, 7, 2], "prompt_len": 2}], max_len=64)
        8
    """
    longest = max((len(r["input_ids"]) - r["prompt_len"] for r in rows), default=1)
    return min(-(-max(longest, 1) // multiple) * multiple, max_len)
