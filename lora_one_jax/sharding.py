"""Meshes, partition rules and shardings for params, adapters, optimizer state and batches.

JAX's own sharding is the distributed engine: arrays carry a ``NamedSharding`` over a device ``Mesh``
and ``jax.jit`` partitions the computation (GSPMD). This module only decides *where* things live:

* ``make_mesh(data=None, fsdp=1, tensor=1)``: a mesh with axes ``("data", "fsdp", "tensor")`` (the
  unspecified ``data`` size is inferred from the device count), axis types ``Auto`` (with jax 0.10's
  default Explicit types, HF models' embedding gathers and ``jnp.linalg.svd`` of sharded inputs raise
  ``ShardingTypeError``).
* Partition rules: ``((path regex, PartitionSpec), ...)``, the first regex that ``fullmatch``-es a
  param's '/'-joined path wins. ``LLAMA_RULES`` shard a Llama-family model FSDP over ``fsdp`` and
  tensor-parallel (Megatron-style) over ``tensor``; add rules for another family the same way (see the
  README's "Scale out"). A dimension that an axis does not divide is left replicated.
* Adapters follow their kernel, never hand-written: A ``(d_in, r)`` takes the kernel's d_in spec and
  B ``(r, d_out)`` its d_out spec, the rank axis replicated (stacked adapters get a replicated
  leading axis). Optimizer state follows the param it belongs to; batches split over the data axes.

Example:
    >>> mesh = make_mesh()
    >>> spec_for("model/layers/0/self_attn/q_proj/kernel", (64, 64), LLAMA_RULES, mesh)
    P('fsdp', 'tensor')
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_one_jax.config import Adapters, LoraConfig, Target, find_targets, kernel_key
from lora_one_jax.nnx import adapter_specs_nnx, is_nnx_state, shard_nnx

AXES = ("data", "fsdp", "tensor")
#: The axes a batch is split over: every example lives on one (data, fsdp) coordinate.
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, P]]

#: Llama / Mistral / Gemma (and SmolLM2): FSDP over ``fsdp`` on the model dimension, Megatron tensor
#: parallelism over ``tensor`` (column-parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel head).
LLAMA_RULES: Rules = (
    (r".*embed_tokens/embedding", P("tensor", "fsdp")),
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", P("fsdp", "tensor")),
    (r".*(o_proj|down_proj)/kernel", P("tensor", "fsdp")),
    (r".*lm_head/kernel", P("fsdp", "tensor")),
    (r".*", P()),  # norms and the rest: replicated
)


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all), ``data`` inferred when None.

    Example:
        >>> make_mesh().axis_names
        ('data', 'fsdp', 'tensor')
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh {name} size must be a positive integer, got {size!r}")
    if data is None:
        if n % (fsdp * tensor):
            raise ValueError(
                f"{n} devices cannot be split into fsdp={fsdp} x tensor={tensor}; choose sizes whose "
                f"product divides {n}"
            )
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, but "
            f"{n} are available; make the product equal {n} (or leave data unset)"
        )
    auto = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), AXES, axis_types=auto)


def _axis_size(mesh: Mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[a] for a in names if a is not None]))


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """``spec`` with every entry whose mesh size does not divide its dimension replaced by None.

    Example:
        >>> fit_spec(P("fsdp", "tensor"), (6, 4), make_mesh())
        P('fsdp', 'tensor')
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = [
        e if e is None or shape[i] % _axis_size(mesh, e) == 0 else None for i, e in enumerate(entries[: len(shape)])
    ]
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def spec_for(path: str, shape: tuple[int, ...], rules: Rules, mesh: Mesh) -> P:
    """The PartitionSpec the first matching rule gives ``path`` (fitted to ``shape``); replicated if none.

    Example:
        >>> spec_for("lm_head/kernel", (64, 260), LLAMA_RULES, make_mesh())
        P('fsdp', 'tensor')
    """
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            if len(spec) > len(shape):
                raise ValueError(f"rule {pattern!r} gives {spec} to {path!r} of shape {shape}: more axes than dims")
            return fit_spec(spec, shape, mesh)
    return P()


def param_specs(params, rules: Rules, mesh: Mesh):
    """A PartitionSpec for every leaf of ``params`` (same tree structure).

    Example:
        >>> param_specs({"mlp": {"up_proj": {"kernel": np.zeros((4, 8))}}}, LLAMA_RULES, make_mesh())
        {'mlp': {'up_proj': {'kernel': P('fsdp', 'tensor')}}}
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: spec_for(k, np.shape(v), rules, mesh) for k, v in flat.items()}, sep="/")


def shardings(specs, mesh: Mesh):
    """``NamedSharding`` for every PartitionSpec of a tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh, rules: Rules = LLAMA_RULES):
    """``params`` placed on ``mesh`` by ``rules`` (leaf by leaf: no device holds more than its share).

    Example:
        >>> p = shard_params({"lm_head": {"kernel": np.ones((4, 6), np.float32)}}, make_mesh())
        >>> p["lm_head"]["kernel"].sharding.spec
        P('fsdp', 'tensor')
    """
    if is_nnx_state(params):  # an NNX model's params: placed by their own sharding metadata (tunix's names)
        return shard_nnx(params, mesh)
    specs = param_specs(params, rules, mesh)
    return jax.tree.map(
        lambda x, s: place(x, NamedSharding(mesh, s)), params, specs, is_leaf=lambda x: isinstance(x, P)
    )


def adapter_specs(
    params, config: LoraConfig, rules: Rules, mesh: Mesh, *, targets: dict[str, Target] | None = None
) -> dict[str, dict[str, P]]:
    """Adapter PartitionSpecs derived from each targeted kernel's: A ``P(kernel d_in, None)``, B
    ``P(None, kernel d_out)`` (for kernels stored (d_out, d_in) the two swap). ``targets``:
    ``find_targets(params, config)`` when the caller already has it.

    Example:
        >>> p = {"mlp": {"up_proj": {"kernel": np.zeros((8, 16))}}}
        >>> adapter_specs(p, LoraConfig(rank=2), LLAMA_RULES, make_mesh())["mlp/up_proj"]
        {'a': P('fsdp',), 'b': P(None, 'tensor')}
    """
    targets = find_targets(params, config) if targets is None else targets
    if is_nnx_state(params):  # an NNX model's params: specs from the kernels' own sharding metadata (rules unused)
        return adapter_specs_nnx(params, targets, mesh)
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, t in targets.items():
        spec = tuple(spec_for(kernel_key(path), np.shape(flat[kernel_key(path)]), rules, mesh)) + (None, None)
        d_in, d_out = (spec[1], spec[0]) if t.transposed else (spec[0], spec[1])
        out[path] = {
            "a": fit_spec(P(d_in, None), (t.d_in, t.rank), mesh),
            "b": fit_spec(P(None, d_out), (t.rank, t.d_out), mesh),
        }
    return out


def stacked_adapter_specs(layout, per_module: dict[str, dict[str, P]]) -> dict[str, dict[str, P]]:
    """Specs for ``stack_adapters`` output: the leading stack axis replicated, the rest as the group's modules.

    Example:
        >>> stacked_adapter_specs((("g", ("x", "y")),), {"x": {"a": P("fsdp"), "b": P(None, "tensor")},
        ...                                              "y": {"a": P("fsdp"), "b": P(None, "tensor")}})
        {'g': {'a': P(None, 'fsdp'), 'b': P(None, None, 'tensor')}}
    """

    def full(spec: P) -> tuple:
        return tuple(spec) + (None,) * (2 - len(spec))

    out = {}
    for group, paths in layout:
        a_specs, b_specs = {full(per_module[p]["a"]) for p in paths}, {full(per_module[p]["b"]) for p in paths}
        if len(a_specs) != 1 or len(b_specs) != 1:
            raise ValueError(
                f"modules of group {group!r} are sharded differently ({a_specs}, {b_specs}); "
                "give same-shaped kernels one partition rule"
            )
        (a,), (b,) = a_specs, b_specs
        out[group] = {"a": _trim(P(None, *a)), "b": _trim(P(None, *b))}
    return out


def _trim(spec: P) -> P:
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def shard_adapters(adapters: Adapters, specs: dict[str, dict[str, P]], mesh: Mesh) -> Adapters:
    """``adapters`` (or stacked adapters) placed by ``specs``."""
    return {p: {k: place(v, NamedSharding(mesh, specs[p][k])) for k, v in ad.items()} for p, ad in adapters.items()}


def leaf_placer(dtype, mesh: Mesh | None = None, rules: Rules | None = None):
    """``put(path, host_array) -> jax.Array``: cast floating leaves to ``dtype`` and place each one on its own,
    into its ``rules`` sharding (default ``LLAMA_RULES``) over ``mesh`` when given (so a sharded model is never
    whole on one device). The loaders place every weight with it as they read it.

    Example:
        >>> put = leaf_placer(jnp.bfloat16)
        >>> put("lm_head/kernel", np.ones((2, 3), np.float32)).dtype
        dtype(bfloat16)
        >>> leaf_placer(jnp.float32, make_mesh())("lm_head/kernel", np.ones((8, 8), np.float32)).sharding.spec
        P('fsdp', 'tensor')
    """

    def put(path: str, x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            x = x.astype(jnp.dtype(dtype))
        if mesh is None:
            return jnp.asarray(x)
        return place(x, NamedSharding(mesh, spec_for(path, x.shape, rules or LLAMA_RULES, mesh)))

    return put


def mesh_of(tree) -> Mesh | None:
    """The mesh of the first array in ``tree`` that is sharded (``NamedSharding``) over several devices.

    Example:
        >>> mesh_of({"w": np.ones(3)}) is None
        True
    """
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def place(x, sharding):
    """Host data ``x`` (the same on every process) as one global array with ``sharding``: each process
    transfers only the shards its own devices hold, so it works across hosts (``device_put`` of host
    data does not) and no device ever holds more than its share.

    Example:
        >>> place(np.arange(8.0), NamedSharding(make_mesh(), P(BATCH_AXES))).shape
        (8,)
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_numpy(x) -> np.ndarray:
    """A numpy copy of ``x``, also when it is a global array spread over other processes' devices
    (then gathered with ``multihost_utils.process_allgather``: every process must call this).

    Example:
        >>> to_numpy(jnp.arange(3)).tolist()
        [0, 1, 2]
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` a batch is split over: those of ``BATCH_AXES`` it has (tunix's ``('fsdp', 'tp')``:
    ``('fsdp',)``).

    Example:
        >>> batch_axes(make_mesh()), batch_axes(Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("fsdp", "tp")))
        (('data', 'fsdp'), ('fsdp',))
    """
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    """Rows of a batch split over the mesh's data axes (``batch_axes``), every other axis whole.

    Example:
        >>> batch_sharding(make_mesh(), ndim=3, batch_axis=1).spec
        P(None, ('data', 'fsdp'))
    """
    entries = [None] * ndim
    entries[batch_axis] = batch_axes(mesh) or None
    while entries and entries[-1] is None:
        entries.pop()
    return NamedSharding(mesh, P(*entries))


def like_params(state, params):
    """Shardings for an optimizer state: every array shaped like a param gets that param's sharding,
    everything else (counts, scalars) is replicated. Use as ``jax.jit(opt.init, out_shardings=...)``.

    Example:
        >>> import optax
        >>> p = shard_params({"lm_head": {"kernel": np.ones((4, 6), np.float32)}}, make_mesh())
        >>> s = like_params(jax.eval_shape(optax.adam(1e-3).init, p), p)
        >>> s[0].mu["lm_head"]["kernel"].spec
        P('fsdp', 'tensor')
    """
    mesh = next(
        x.sharding.mesh for x in jax.tree.leaves(params) if isinstance(getattr(x, "sharding", None), NamedSharding)
    )
    replicated = NamedSharding(mesh, P())
    by_structure = jax.tree.structure(params)

    def visit(node):
        if jax.tree.structure(node) == by_structure:
            return jax.tree.map(lambda p: p.sharding, params)
        return None

    def walk(node):
        matched = visit(node) if not isinstance(node, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)) else None
        if matched is not None:
            return matched
        if isinstance(node, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)) or np.isscalar(node):
            return replicated
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(x) for x in node))
        if isinstance(node, (list, tuple)):
            return type(node)(walk(x) for x in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return jax.tree.map(lambda _: replicated, node)

    return walk(state)
