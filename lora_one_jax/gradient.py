"""The full fine-tuning gradient of the targeted kernels, estimated over a few micro-batches.

What is averaged, exactly (as the official LoRA-One code does): ``loss_fn(params, batch)`` returns
the loss of one micro-batch, normally the mean over its tokens; ``estimate_gradient`` returns the plain
mean of the per-micro-batch gradients. For equal-sized micro-batches (and a loss that is a mean over
equally many tokens in each) this equals the gradient of the mean loss over the concatenated batch;
otherwise every micro-batch weighs the same, whatever its number of tokens (the official recipe's 8
one-example micro-batches weigh every example equally).

How it is computed: micro-batches are padded to one shape and stacked, ``micro_batches_per_step`` at a
time, and one jitted step differentiates the weighted sum of their losses (``jax.vmap`` over the stack)
w.r.t. the targeted kernels only. So 8 one-example micro-batches cost one forward/backward pass of a
batch of 8, compiled once, instead of 8 small passes each compiled for its own length.

Example:
    >>> params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> loss_fn = lambda p, x: jnp.mean(x @ p["fc"]["kernel"] + p["fc"]["bias"])
    >>> batches = [jnp.ones((4, 3)), 3 * jnp.ones((4, 3))]
    >>> g = estimate_gradient(loss_fn, params, batches, lj.LoraConfig(rank=1), progress=False)
    >>> g["fc"].tolist()  # d/dW mean(x @ W) = mean over rows of x / 2 columns, averaged over batches
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_one_jax.config import LoraConfig, Target, find_targets, kernel_key
from lora_one_jax.nnx import flat_parts, is_nnx_state
from lora_one_jax.progress import progress_bar
from lora_one_jax.sharding import BATCH_AXES, batch_sharding, mesh_of, place, to_numpy

#: Batch keys whose zeros make padding exact: a padded position is neither attended to nor scored.
MASK_KEYS = ("attention_mask", "loss_mask")


def pad_micro_batches(batches: list) -> list:
    """Micro-batches brought to one shape so that they stack (and compile once).

    Micro-batches that are dicts holding a mask (``attention_mask`` or ``loss_mask``, as
    ``lora_one_jax.data.batches`` makes them) have every array padded with zeros at the end of its first
    two axes (rows, then positions) to the largest size among the micro-batches. Zero masks keep the loss
    exactly what it was: padded rows and positions are neither attended to nor scored, and a causal
    model's real positions never see later ones. Micro-batches without masks are returned unchanged.

    Example:
        >>> a = {"input_ids": np.ones((1, 3), np.int32), "attention_mask": np.ones((1, 3), np.int32)}
        >>> b = {"input_ids": np.ones((2, 5), np.int32), "attention_mask": np.ones((2, 5), np.int32)}
        >>> [x["attention_mask"].tolist() for x in pad_micro_batches([a, b])]
        [[[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]]
    """
    shapes = [jax.tree.map(np.shape, b) for b in batches]
    structures = {jax.tree.structure(b) for b in batches}
    if len(structures) > 1:
        raise ValueError(
            f"micro-batches differ in structure ({len(structures)} different pytrees); give them all the same keys"
        )
    if all(s == shapes[0] for s in shapes[1:]):
        return batches
    if not all(isinstance(b, Mapping) and any(k in b for k in MASK_KEYS) for b in batches):
        return batches  # nothing makes padding exact: estimate_gradient groups them by shape instead
    leaves = [jax.tree.leaves(b) for b in batches]
    target = []
    for column in zip(*leaves):
        dims = {np.ndim(x) for x in column}
        if len(dims) > 1:
            raise ValueError(f"micro-batch arrays of different ranks {sorted(dims)} cannot be padded to one shape")
        target.append(tuple(max(np.shape(x)[d] for x in column) for d in range(dims.pop())))

    def pad(x, shape):
        x = np.asarray(x)
        widths = [(0, shape[d] - x.shape[d]) if d < 2 else (0, 0) for d in range(x.ndim)]
        if any(x.shape[d] != shape[d] for d in range(2, x.ndim)):
            raise ValueError(f"micro-batch arrays differ beyond their first two axes: {x.shape} vs {shape}")
        return np.pad(x, widths)

    treedef = jax.tree.structure(batches[0])
    return [jax.tree.unflatten(treedef, [pad(x, s) for x, s in zip(ls, target)]) for ls in leaves]


def _micro_batch_sharding(mesh, shape) -> NamedSharding:
    """Stacked micro-batches ``(n, rows, ...)``: split the micro-batches over the data axes when they divide,
    else their rows, else replicate."""
    data = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
    for axis in (0, 1):
        if len(shape) > axis and shape[axis] % data == 0:
            return batch_sharding(mesh, ndim=len(shape), batch_axis=axis)
    return NamedSharding(mesh, P())


def _unflatten(flat):
    return traverse_util.unflatten_dict(flat, sep="/")


@partial(jax.jit, static_argnames=("loss_fn", "keys", "out_shardings", "unflatten"), donate_argnums=0)
def _accumulate(acc, kernels, rest, stacked, weights, *, loss_fn, keys, out_shardings=None, unflatten=_unflatten):
    """Add the gradient of ``sum_j weights[j] * loss_fn(params, micro-batch j)`` w.r.t. the targeted kernels
    to the float32 sums ``acc``; also say which modules' gradients and which losses are finite. Module
    level with ``loss_fn`` static, so repeated estimates with the same loss function compile once."""

    def loss_of(kernels):
        flat = dict(rest)
        flat.update({key: kernels[path] for path, key in keys})
        params = unflatten(flat)
        losses = jax.vmap(lambda batch: loss_fn(params, batch))(stacked)
        return jnp.sum(weights * losses.astype(jnp.float32)), losses

    grads, losses = jax.grad(loss_of, has_aux=True)(kernels)
    finite = jnp.stack([jnp.isfinite(grads[path]).all() for path, _ in keys])
    acc = {p: acc[p] + grads[p].astype(jnp.float32) for p in acc}
    if out_shardings is not None:  # gradients stay sharded like their kernels: never gathered onto one device
        acc = {p: jax.lax.with_sharding_constraint(acc[p], sharding) for p, sharding in out_shardings}
    return acc, finite, jnp.isfinite(losses)


def _selected(targets: dict, modules: Iterable[str] | None) -> dict:
    if modules is None:
        return targets
    if isinstance(modules, str):
        raise TypeError(f"modules must be a list of module paths, got the string {modules!r}")
    modules = list(modules)
    unknown = sorted(set(modules) - set(targets))
    if unknown or not modules:
        raise ValueError(
            f"modules {unknown[:5] or '[]'} are not among the config's targeted modules "
            f"({sorted(targets)[:5]}{' ...' if len(targets) > 5 else ''}); pass a non-empty subset of them"
        )
    return {p: targets[p] for p in modules}


def _split(params, targets: dict) -> tuple:
    """(sorted module paths, ((path, kernel key), ...), {path: kernel}, {other flat key: leaf}, unflatten,
    matrix) of ``params``: ``unflatten`` rebuilds the params from the flat dict, ``matrix(path, g)`` turns a
    kernel's gradient into its (d_in, d_out) matrix. An NNX model's nnx.Param state works as a params dict."""
    if is_nnx_state(params):  # an NNX model's nnx.Param state: its leaves, N-D kernels seen as matrices at the end
        flat, keys, unflatten, matrix = flat_parts(params, targets)
    else:
        flat, keys, unflatten = traverse_util.flatten_dict(params, sep="/"), {p: kernel_key(p) for p in targets}, None
        matrix = lambda p, g: g.T if targets[p].transposed else g
    kernel_keys = set(keys.values())
    order = sorted(targets)
    return (
        order,
        tuple((p, keys[p]) for p in order),
        {p: flat[keys[p]] for p in order},
        {k: v for k, v in flat.items() if k not in kernel_keys},
        unflatten or _unflatten,
        matrix,
    )


def lower_gradient_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    params,
    batch,
    config: LoraConfig,
    *,
    micro_batches_per_step: int = 8,
    modules: Iterable[str] | None = None,
) -> jax.stages.Lowered:
    """The program ``estimate_gradient`` runs per step (``micro_batches_per_step`` micro-batches shaped like
    ``batch``), lowered, for its cost and memory analysis (``.compile().memory_analysis()``). ``params`` and
    ``batch`` may be ``jax.ShapeDtypeStruct`` trees: a model too large to hold can be analysed.

    Example:
        >>> params = {"fc": {"kernel": jax.ShapeDtypeStruct((512, 256), jnp.float32)}}
        >>> loss_fn = lambda p, x: jnp.mean(x @ p["fc"]["kernel"])
        >>> x = jax.ShapeDtypeStruct((4, 512), jnp.float32)
        >>> step = lower_gradient_step(loss_fn, params, x, lj.LoraConfig(rank=1))
        >>> step.compile().memory_analysis().argument_size_in_bytes >= 2 * 512 * 256 * 4  # kernel + gradient sum
        True
    """
    order, keys, kernels, rest, unflatten, _ = _split(params, _selected(find_targets(params, config), modules))
    acc = {p: jax.ShapeDtypeStruct(kernels[p].shape, jnp.float32) for p in order}
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((micro_batches_per_step, *x.shape), x.dtype), batch)
    weights = jax.ShapeDtypeStruct((micro_batches_per_step,), jnp.float32)
    return _accumulate.lower(acc, kernels, rest, stacked, weights, loss_fn=loss_fn, keys=keys, unflatten=unflatten)


def estimate_gradient(
    loss_fn: Callable[[Any, Any], jax.Array],
    params,
    batches: Iterable,
    config: LoraConfig,
    *,
    micro_batches_per_step: int = 8,
    modules: Iterable[str] | None = None,
    progress: bool = True,
    targets: dict[str, Target] | None = None,
) -> dict[str, jax.Array]:
    """Mean gradient of ``loss_fn`` w.r.t. every kernel ``config`` targets: ``{module_path: G (d_in, d_out)}``.

    ``loss_fn(params, batch)`` returns a scalar (the mean loss of a micro-batch); ``batches`` is an
    iterable of micro-batches (pytrees). Micro-batches of different lengths are padded to one shape
    (``pad_micro_batches``: exact for masked batches), then ``micro_batches_per_step`` of them go
    through one jitted, ``jax.vmap``-ed forward/backward (lower it if a step runs out of memory; the
    last step is filled with zero-weight copies, so one shape is compiled). Only the targeted kernels
    are differentiated; the float32 running sum is the only buffer kept besides one step's activations.
    The result is in float32 and Flax orientation: kernels listed in ``config.transposed_kernels``
    (stored (d_out, d_in)) get their gradient transposed to (d_in, d_out). A NaN or Inf raises
    ``FloatingPointError`` naming the module and the micro-batch. ``progress`` shows a tqdm bar. ``targets``:
    ``find_targets(params, config)`` when the caller already has it. ``modules`` (module paths, a subset of
    the targets) differentiates only those kernels: the streamed spectral init (``spectral_init_streamed``)
    computes one group's gradients per pass this way.

    Example:
        >>> params = {"fc": {"kernel": jnp.ones((3, 2))}}
        >>> loss_fn = lambda p, x: jnp.mean((x @ p["fc"]["kernel"]) ** 2)
        >>> g = estimate_gradient(loss_fn, params, [jnp.ones((4, 3))] * 3, lj.LoraConfig(rank=1), progress=False)
        >>> g["fc"].shape, g["fc"].dtype
        ((3, 2), dtype('float32'))
        >>> sorted(estimate_gradient(loss_fn, params, [jnp.ones((4, 3))], lj.LoraConfig(rank=1), modules=["fc"],
        ...                          progress=False))
        ['fc']
    """
    if (
        isinstance(micro_batches_per_step, bool)
        or not isinstance(micro_batches_per_step, int)
        or micro_batches_per_step < 1
    ):
        raise ValueError(f"micro_batches_per_step must be a positive integer, got {micro_batches_per_step!r}")
    targets = _selected(find_targets(params, config) if targets is None else targets, modules)
    batches = pad_micro_batches(list(batches))
    if not batches:
        raise ValueError("batches is empty: estimate_gradient needs at least one micro-batch")
    order, keys, kernels, rest, unflatten, matrix = _split(params, targets)
    step = partial(_accumulate, loss_fn=loss_fn, keys=keys, unflatten=unflatten)
    acc = {p: np.zeros(np.shape(k), np.float32) for p, k in kernels.items()}  # host zeros: nothing to compile
    mesh, out_shardings = mesh_of(kernels), None
    if mesh is not None:  # sharded params: sums sharded like the kernels, micro-batches split over the data axes
        out_shardings = tuple((p, kernels[p].sharding) for p in order)
        acc = {p: place(acc[p], kernels[p].sharding) for p in order}
        step = partial(step, out_shardings=out_shardings)
    n = len(batches)

    def check(finite, finite_losses, members):
        finite, finite_losses = to_numpy(finite), to_numpy(finite_losses)[: len(members)]
        if finite.all() and finite_losses.all():
            return
        bad_batches = [members[j] for j in np.flatnonzero(~finite_losses)]
        where = f"micro-batch {bad_batches[0]}" if bad_batches else f"micro-batches {members}"
        bad = [order[i] for i in np.flatnonzero(~finite)] or order
        raise FloatingPointError(
            f"non-finite (NaN/Inf) gradient for module {bad[0]!r} in {where}"
            + (f" (also {bad[1:6]})" if len(bad) > 1 else "")
            + "; check that batch's data and the loss (e.g. divisions by a zero token count)"
        )

    by_shape: dict[Any, list[int]] = {}  # unpadded micro-batches of different shapes: one compile per shape
    for i, b in enumerate(batches):
        by_shape.setdefault(str(jax.tree.map(np.shape, b)), []).append(i)
    pending = None
    bar = progress_bar(total=n, desc="gradient estimate", unit="micro-batch", enabled=progress)
    for indices in by_shape.values():
        chunk = min(micro_batches_per_step, len(indices))
        for start in range(0, len(indices), chunk):
            members = indices[start : start + chunk]
            fill = members + [members[0]] * (chunk - len(members))  # zero-weight copies keep one compiled shape
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *[batches[i] for i in fill])
            if mesh is not None:
                stacked = jax.tree.map(lambda x: place(x, _micro_batch_sharding(mesh, x.shape)), stacked)
            weights = np.array([1.0 / n] * len(members) + [0.0] * (chunk - len(members)), np.float32)
            acc, finite, finite_losses = step(acc, kernels, rest, stacked, weights)
            if pending is not None:  # check the previous step while this one runs
                check(*pending)
            pending = (finite, finite_losses, members)
            bar.update(len(members))
    bar.close()
    check(*pending)
    return {p: matrix(p, acc[p]) for p in order}
