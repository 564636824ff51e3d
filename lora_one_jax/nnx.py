"""Flax NNX models in the core: targets, merges, the gradient estimate and ``with_lora`` for ``nnx.Module``.

An NNX model's params are its ``nnx.Param`` state. ``nnx_split(model)`` returns ``(graphdef, params, rest)``
like ``nnx.split(model, nnx.Param, ...)``, with every adaptable kernel's layout recorded as Variable
metadata (``lora_in_axes``: the kernel axes the layer contracts with its input). With it, the core's
functions (``find_targets``, ``init_adapters``, ``merge``, ``estimate_gradient``, ...) take ``params``
exactly as they take a linen params dict. Adaptable layers:

* ``nnx.Linear``: kernel ``(d_in, d_out)``.
* any module with an ``einsum_str`` and one N-D ``nnx.Param`` (``nnx.Einsum``, tunix's ``Einsum`` with
  ``w``): the kernel is seen as the 2-D matrix (contracting axes, flattened) x (the other axes), in the
  kernel's axis order. tunix's ``q_proj.w`` (D, N, H) with ``'BTD,DNH->BTNH'`` is the (D, N*H) matrix, its
  ``o_proj.w`` (N, H, D) with ``'BTNH,NHD->BTD'`` the (N*H, D) one: Hugging Face's ``q_proj`` / ``o_proj``
  ``weight`` transposed, so adapters mean the same thing as PEFT's.

A plain ``nnx.split`` state works too for models whose kernels are 2-D ``kernel`` params (``nnx.Linear``).

Example:
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> graphdef, params, rest = nnx_split(model)
    >>> cfg = lj.LoraConfig(rank=2, targets=".*")
    >>> _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    >>> apply = lj.with_lora(model, cfg)
    >>> bool(jnp.allclose(apply(params, adapters, jnp.ones((1, 4))), model(jnp.ones((1, 4)))))  # B = 0
    True
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_one_jax.lowrank import low_rank_product

#: Variable metadata key holding an adaptable kernel's contracting axes (``nnx_split`` writes it).
LAYOUT_KEY = "lora_in_axes"


class Layout(NamedTuple):
    """How a module's kernel is adapted: its param's name, contracting axes and the layer's einsum (None: Linear)."""

    param: str
    in_axes: tuple[int, ...]
    einsum: str | None


def is_nnx_state(x) -> bool:
    """Whether ``x`` is an NNX ``State`` (the params of an NNX model).

    Example:
        >>> is_nnx_state({"fc": {"kernel": np.zeros((2, 2))}})
        False
    """
    return isinstance(x, nnx.State)


def is_nnx_module(x) -> bool:
    """Whether ``x`` is a ``flax.nnx.Module``.

    Example:
        >>> is_nnx_module(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        True
    """
    return isinstance(x, nnx.Module)


def _parse(einsum_str: str) -> tuple[str, str, str]:
    spec = einsum_str.replace(" ", "")
    if spec.count("->") != 1 or spec.split("->")[0].count(",") != 1:
        raise ValueError(f"einsum {einsum_str!r} is not of the form 'input,kernel->output'; it cannot be adapted")
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    return lhs, rhs, out


def einsum_in_axes(einsum_str: str, ndim: int) -> tuple[int, ...]:
    """The kernel axes an einsum ``'input,kernel->output'`` contracts with its input (the adapter's d_in).

    Example:
        >>> einsum_in_axes("BTD,DNH->BTNH", 3), einsum_in_axes("BTNH,NHD->BTD", 3)
        ((0,), (0, 1))
        >>> einsum_in_axes("BTNH,NHN->BTN", 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: einsum 'BTNH,NHN->BTN': kernel subscripts 'NHN' ... each; this layer cannot be adapted
    """
    lhs, rhs, out = _parse(einsum_str)
    if "." in rhs or len(rhs) != ndim or len(set(rhs)) != len(rhs):
        raise ValueError(
            f"einsum {einsum_str!r}: kernel subscripts {rhs!r} do not name the {ndim} axes of the kernel "
            "once each; this layer cannot be adapted"
        )
    for c in rhs:
        if c in out and c in lhs:
            raise ValueError(
                f"einsum {einsum_str!r}: kernel axis {c!r} is also an axis of the input and the output (a batch axis), "
                "so the kernel is not one matrix; this layer cannot be adapted"
            )
        if c not in out and c not in lhs:
            raise ValueError(f"einsum {einsum_str!r} sums kernel axis {c!r} away; this layer cannot be adapted")
    contract = tuple(i for i, c in enumerate(rhs) if c not in out)
    if not contract or len(contract) == ndim:
        raise ValueError(f"einsum {einsum_str!r} has no input or no output axis in its kernel; it cannot be adapted")
    return contract


def module_layout(module) -> Layout | None:
    """How ``module`` is adapted (``Layout``), or None when it is not a linear layer we know.

    Example:
        >>> module_layout(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        Layout(param='kernel', in_axes=(0,), einsum=None)
        >>> module_layout(nnx.Einsum("bd,dnh->bnh", (4, 2, 3), rngs=nnx.Rngs(0)))
        Layout(param='kernel', in_axes=(0,), einsum='bd,dnh->bnh')
    """
    if isinstance(module, nnx.Linear):
        return Layout("kernel", (0,), None)
    einsum = getattr(module, "einsum_str", None)
    if not isinstance(einsum, str):
        return None
    params = [(k, v) for k, v in vars(module).items() if isinstance(v, nnx.Param) and np.ndim(v.get_value()) >= 2]
    if len(params) != 1:
        return None
    name, var = params[0]
    return Layout(name, einsum_in_axes(einsum, np.ndim(var.get_value())), einsum)


def _path(keys) -> str:
    return "/".join(str(k) for k in keys)


def modules(model) -> dict[str, Any]:
    """``{module path: module}`` for every ``nnx.Module`` in ``model`` ('' for the model itself).

    Example:
        >>> sorted(modules(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))
        ['']
    """
    return {_path(p): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}


def layouts(model) -> dict[str, Layout]:
    """``{module path: Layout}`` for every adaptable layer of ``model``.

    Example:
        >>> layouts(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        {'': Layout(param='kernel', in_axes=(0,), einsum=None)}
    """
    out = {}
    for path, module in modules(model).items():
        layout = module_layout(module)
        if layout is not None:
            out[path] = layout
    return out


def nnx_split(model):
    """``(graphdef, params, rest)`` as ``nnx.split(model, nnx.Param, ...)``, each adaptable kernel's layout
    recorded in its Variable's metadata (new Variables: ``model`` is not changed).

    Example:
        >>> _, params, _ = nnx_split(nnx.Einsum("bd,dnh->bnh", (4, 2, 3), rngs=nnx.Rngs(0)))
        >>> params["kernel"].get_metadata()[LAYOUT_KEY]
        (0,)
    """
    if not is_nnx_module(model):
        raise TypeError(f"nnx_split needs a flax.nnx.Module, got {type(model).__name__}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, annotate(params, layouts(model)), rest


def annotate(params, model_layouts: dict[str, Layout]):
    """``params`` (an ``nnx.State``) with ``lora_in_axes`` metadata on the kernels ``model_layouts`` names."""
    by_key = {(path, lay.param): lay.in_axes for path, lay in model_layouts.items()}
    flat = []
    for keys, var in params.flat_state():
        axes = by_key.get((_path(keys[:-1]), str(keys[-1])))
        flat.append((keys, var.replace(**{LAYOUT_KEY: axes}) if axes is not None else var))
    return nnx.State.from_flat_path(flat)


class Kernel(NamedTuple):
    """An adaptable kernel in an NNX state: its keys, its (N-D) shape and contracting axes."""

    keys: tuple
    shape: tuple[int, ...]
    in_axes: tuple[int, ...]


def kernels(params, *, strict: bool = False) -> dict[str, Kernel]:
    """``{module path: Kernel}`` for the adaptable kernels of an NNX ``params`` state: those with
    ``lora_in_axes`` metadata, and unannotated params named ``kernel`` (taken as ``(d_in, d_out)`` when 2-D).
    ``strict`` raises for unannotated N-D ``kernel`` / ``w`` params instead of skipping them.

    Example:
        >>> _, p, _ = nnx_split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> kernels(p)
        {'': Kernel(keys=('kernel',), shape=(2, 3), in_axes=(0,))}
    """
    out = {}
    for keys, var in params.flat_state():
        shape = tuple(np.shape(var.get_value()))
        axes = var.get_metadata().get(LAYOUT_KEY)
        if axes is None and str(keys[-1]) == "kernel" and len(shape) == 2:
            axes = (0,)
        if axes is None:
            if strict and str(keys[-1]) in ("kernel", "w") and len(shape) > 2:
                raise ValueError(
                    f"{_path(keys)} is a {len(shape)}-D kernel whose layout is unknown in this state; take the params "
                    "with lora_one_jax.nnx_split(model), which reads each layer's einsum"
                )
            continue
        out[_path(keys[:-1])] = Kernel(tuple(keys), shape, tuple(axes))
    return out


def matrix_shape(shape: tuple[int, ...], in_axes: tuple[int, ...]) -> tuple[int, int]:
    """``(d_in, d_out)`` of an N-D kernel seen as a matrix.

    Example:
        >>> matrix_shape((9, 64, 576), (0, 1))
        (576, 576)
    """
    d_in = math.prod(shape[i] for i in in_axes)
    return d_in, math.prod(shape) // d_in


def _perm(ndim: int, in_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(in_axes) + tuple(i for i in range(ndim) if i not in in_axes)


def to_matrix(w, in_axes: tuple[int, ...]):
    """An N-D kernel as the ``(d_in, d_out)`` matrix (contracting axes first, in kernel order).

    Example:
        >>> to_matrix(jnp.zeros((2, 3, 4)), (1,)).shape
        (3, 8)
    """
    perm = _perm(np.ndim(w), in_axes)
    if perm != tuple(range(np.ndim(w))):
        w = jnp.transpose(w, perm)
    return jnp.reshape(w, matrix_shape(np.shape(w), tuple(range(len(in_axes)))))


def from_matrix(m, shape: tuple[int, ...], in_axes: tuple[int, ...]):
    """Inverse of ``to_matrix``: a ``(d_in, d_out)`` matrix laid out as the kernel of ``shape``.

    Example:
        >>> w = jnp.arange(24.0).reshape(2, 3, 4)
        >>> bool((from_matrix(to_matrix(w, (1,)), w.shape, (1,)) == w).all())
        True
    """
    perm = _perm(len(shape), in_axes)
    m = jnp.reshape(m, tuple(shape[i] for i in perm))
    return m if perm == tuple(range(len(shape))) else jnp.transpose(m, np.argsort(perm))


def target_view(params):
    """A linen-style params tree of shapes, ``{... module: {"kernel": (d_in, d_out)}}``, for ``find_targets``."""
    from flax import traverse_util

    flat = {}
    for path, k in kernels(params, strict=True).items():  # unannotated N-D kernels: an error naming nnx_split
        flat[f"{path}/kernel" if path else "kernel"] = jax.ShapeDtypeStruct(
            matrix_shape(k.shape, k.in_axes), jnp.float32
        )
    if not flat:
        raise ValueError(
            "this NNX state holds no adaptable kernel; take the params with lora_one_jax.nnx_split(model) "
            "(it records the layout of nnx.Linear, nnx.Einsum and einsum layers such as tunix's)"
        )
    return traverse_util.unflatten_dict({k.lstrip("/"): v for k, v in flat.items()}, sep="/")


def _value(params, keys):
    node = params
    for k in keys:
        node = node[k]
    return node.get_value()


def logical_kernels(params, targets) -> dict[str, jax.Array]:
    """``{module path: (d_in, d_out) matrix}`` of the targeted kernels (for PiSSA)."""
    ks = kernels(params)
    return {p: to_matrix(_value(params, ks[p].keys), ks[p].in_axes) for p in targets}


def shift_kernels(params, adapters, targets, sign: float):
    """``params`` with ``sign * scale * A @ B`` added to every adapted kernel (in float32), as a new State."""
    ks = kernels(params)
    by_keys = {ks[p].keys: p for p in adapters}
    flat = []
    for keys, var in params.flat_state():
        path = by_keys.get(tuple(keys))
        if path is not None:
            t, k = targets[path], ks[path]
            delta = t.scale * (
                jnp.asarray(adapters[path]["a"], jnp.float32) @ jnp.asarray(adapters[path]["b"], jnp.float32)
            )
            w = var.get_value()
            new = jnp.asarray(w, jnp.float32) + sign * from_matrix(delta, k.shape, k.in_axes)
            var = var.replace(value=new.astype(w.dtype))
        flat.append((keys, var))
    return nnx.State.from_flat_path(flat)


@dataclasses.dataclass(frozen=True)
class Unflatten:
    """Rebuilds the state from ``{str(leaf index): leaf}`` (hashable: a static argument of a jitted step)."""

    treedef: Any
    n: int

    def __call__(self, flat):
        return jax.tree.unflatten(self.treedef, [flat[str(i)] for i in range(self.n)])


def flat_parts(params, targets) -> tuple[dict, dict[str, str], Unflatten, Callable]:
    """``(flat, keys, unflatten, matrix)`` for ``estimate_gradient``: the state's leaves ``{str(i): leaf}``, each
    target's key there, the inverse of the flattening, and ``matrix(path, g)`` viewing a kernel gradient as
    ``(d_in, d_out)``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    index = {}
    for i, (key_path, _) in enumerate(leaves):
        keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in key_path)
        index[keys[:-1] if keys[-1] == "value" else keys] = str(i)
    ks = kernels(params)
    keys = {p: index[ks[p].keys] for p in targets}
    flat = {str(i): leaf for i, (_, leaf) in enumerate(leaves)}
    return flat, keys, Unflatten(treedef, len(leaves)), lambda p, g: to_matrix(g, ks[p].in_axes)


# ----------------------------------------------------------------------------- the module transform


class _Calls:
    """The adapted layers that ran during one ``with_lora`` call (hashable by identity: it rides in the graph's
    static data, so layers rebuilt inside ``nnx.remat`` report to the same object)."""

    def __init__(self):
        self.seen: set[str] = set()


class _LoraValue(nnx.Variable):
    """Adapter data attached to a merged copy of a module inside ``with_lora`` (never trained through NNX)."""


def _unused_letter(*specs: str) -> str:
    used = set("".join(specs))
    return next(c for c in string.ascii_letters if c not in used)


def _einsum_delta(x, a, b, einsum: str, in_axes: tuple[int, ...], shape: tuple[int, ...]):
    """``x (einsum) (A @ B laid out as the kernel)`` computed through the rank, on (tokens, features) views
    (``lowrank``): ``x . A_nd`` gives ``(tokens, r)``, then ``@ B`` and the output's axis order."""
    lhs, rhs, out = _parse(einsum)
    rest = tuple(i for i in range(len(shape)) if i not in in_axes)
    contract = "".join(rhs[i] for i in in_axes)
    free = "".join(rhs[i] for i in rest)
    kept = "".join(c for c in lhs if c not in contract)
    kept_shape = tuple(x.shape[lhs.index(c)] for c in kept)
    if lhs == kept + contract:  # the usual layout ('BTD,DNH', 'BTNH,NHD'): contracted axes last, in A's order
        h = x.reshape(-1, a.shape[0]) @ a
    else:
        z = _unused_letter(lhs, rhs, out)
        a_nd = jnp.reshape(a, tuple(shape[i] for i in in_axes) + (a.shape[-1],))
        h = jnp.einsum(f"{lhs},{contract}{z}->{kept}{z}", x, a_nd).reshape(-1, a.shape[-1])
    y = (h @ b).reshape(*kept_shape, *(shape[i] for i in rest))
    return jnp.einsum(f"{kept}{free}->{out}", y)


def _lora_call(self, *args, **kwargs):
    out = self._lora_base_call(*args, **kwargs)
    scale, dropout, layout, shape, path, calls = self._lora_static
    calls.seen.add(path)
    x = args[0] if args else kwargs.get("inputs", kwargs.get("x"))
    a, b = self.lora_a.get_value(), self.lora_b.get_value()
    x = x.astype(a.dtype)
    key = getattr(self, "lora_key", None)
    if key is not None and dropout > 0.0:
        keep = jax.random.bernoulli(key.get_value(), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0.0).astype(a.dtype)
    if layout.einsum is None:
        delta = low_rank_product(x, a, b)
    else:
        einsum = kwargs.get("einsum_str") or layout.einsum
        if einsum.replace(" ", "") != layout.einsum.replace(" ", ""):
            raise ValueError(f"layer called with einsum {einsum!r}, but it was adapted as {layout.einsum!r}")
        delta = _einsum_delta(x, a, b, layout.einsum, layout.in_axes, shape)
    return out + (scale * delta).astype(out.dtype)


@cache
def _lora_class(cls: type) -> type:
    """One subclass per layer class (cached: NNX registers every class it sees) whose call adds the adapter."""
    return type(f"Lora{cls.__name__}", (cls,), {"__call__": _lora_call, "_lora_base_call": cls.__call__})


def attach(model, adapters, targets, config, *, lora_rng=None, calls: _Calls | None = None) -> None:
    """Turn the targeted layers of ``model`` (a throwaway copy: ``with_lora`` merges one per call) into layers
    that add ``scale * dropout(x) @ A @ B``; raises for a module that is missing or cannot be adapted."""
    found, lays = modules(model), layouts(model)
    for i, path in enumerate(sorted(adapters)):
        module = found.get(path)
        if module is None or path not in lays:
            why = "no module has that path" if module is None else f"{type(module).__name__} is not a linear layer"
            raise ValueError(f"adapter {path!r} cannot be applied: {why} (nnx.Linear or an einsum layer)")
        layout = lays[path]
        shape = tuple(np.shape(getattr(module, layout.param).get_value()))
        module.__class__ = _lora_class(type(module))
        module.lora_a = _LoraValue(adapters[path]["a"])
        module.lora_b = _LoraValue(adapters[path]["b"])
        if lora_rng is not None and config.dropout > 0.0:
            module.lora_key = _LoraValue(jax.random.fold_in(lora_rng, i))
        module._lora_static = (targets[path].scale, config.dropout, layout, shape, path, calls or _Calls())


def with_lora_nnx(model, config, *, targets=None) -> Callable[..., Any]:
    """``with_lora`` for an ``nnx.Module``: ``apply(params, adapters, *args, lora_rng=None, **kwargs)`` calls
    ``model(*args, **kwargs)`` on a merged copy (``nnx.merge(graphdef, params, rest)``) whose targeted layers
    add the adapters. ``model`` itself is never mutated; ``rest`` (non-Param state) is taken from it once.
    Gradients flow to the adapters only: the base ``params`` are frozen (``jax.lax.stop_gradient``).

    Example:
        >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        >>> _, params, _ = nnx_split(model)
        >>> ad = {"": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}}
        >>> apply = with_lora_nnx(model, lj.LoraConfig(rank=1, alpha=1.0, targets=".*"))
        >>> (apply(params, ad, jnp.ones((1, 3))) - model(jnp.ones((1, 3)))).tolist()
        [[3.0, 3.0]]
    """
    from lora_one_jax.adapters import check_adapters
    from lora_one_jax.config import LoraConfig, find_targets

    if not isinstance(config, LoraConfig):
        raise TypeError(f"with_lora needs a LoraConfig, got {type(config).__name__}")
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, adapters, *args, lora_rng: jax.Array | None = None, **kwargs):
        if not is_nnx_state(params):
            raise TypeError(
                f"apply's first argument is the model's nnx.Param state (lora_one_jax.nnx_split(model)[1]), "
                f"got {type(params).__name__}"
            )
        resolved = find_targets(params, config) if targets is None else targets
        check_adapters(adapters, resolved)
        # the base is frozen (stop_gradient): its Variables then live at the caller's trace level, which nnx.remat
        # inside the model (tunix's RematConfig) needs when differentiating w.r.t. the adapters alone
        copy = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, params), rest)
        calls = _Calls()
        attach(copy, adapters, resolved, config, lora_rng=lora_rng, calls=calls)
        out = copy(*args, **kwargs)
        unused = sorted(set(adapters) - calls.seen)
        if unused:
            raise ValueError(f"adapters {unused[:10]} were never applied: their layers did not run in this call")
        return out

    return apply


# ----------------------------------------------------------------------------- losses (tunix call convention)


def tunix_inputs(batch) -> tuple:
    """``(tokens, positions, cache, attention_mask)`` for a tunix-style causal LM from a batch of ``input_ids``,
    ``attention_mask`` and ``position_ids`` (``lora_one_jax.data`` batches); the mask is made (B, L, L), causal
    and padding together, and positions count the real tokens when the batch has none.

    Example:
        >>> tokens, positions, cache, mask = tunix_inputs({"input_ids": jnp.ones((1, 3), jnp.int32)})
        >>> positions.tolist(), mask.shape, cache
        ([[0, 1, 2]], (1, 3, 3), None)
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    positions = batch.get("position_ids")
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    length = ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return ids, positions, None, causal[None] & mask[:, None, :]


def logits_of(out) -> jax.Array:
    """The logits of a model's output: tunix returns ``(logits, cache)``."""
    return out[0] if isinstance(out, tuple) else out


def nnx_call(model) -> Callable:
    """``call(params, *args, **kwargs)``: ``model(*args, **kwargs)`` on a merged copy (``nnx.merge(graphdef, params,
    rest)``), so jitted code takes the params as an argument and ``model`` is never mutated.

    Example:
        >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        >>> _, params, _ = nnx_split(model)
        >>> bool(jnp.allclose(nnx_call(model)(params, jnp.ones((1, 3))), model(jnp.ones((1, 3)))))
        True
    """
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return lambda params, *args, **kwargs: nnx.merge(graphdef, params, rest)(*args, **kwargs)


def _cache_dtype(model, params):
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    if dtype is not None:
        return dtype
    floats = [x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return floats[0] if floats else jnp.float32


def init_cache(model, params, batch_size: int, cache_size: int):
    """An empty KV cache for a tunix-style causal LM: ``model.init_cache(batch_size, cache_size, dtype)`` when the
    model has one (tunix's Qwen 3), else tunix's own layout built from ``model.config`` (``num_layers``,
    ``num_kv_heads``, ``head_dim``): ``{"layer_i": {"k", "v": zeros (B, S, K, H), "end_index": zeros (B,) int32}}``,
    which tunix 0.1.7's Llama 3 / Gemma 3 attention reads and tunix's sampler builds for them. The dtype is the
    config's ``dtype`` (the computation dtype) when it has one, else the params'.

    Example:
        >>> from lora_one_jax.models.tunix import toy_tunix
        >>> model, params = toy_tunix("llama3")
        >>> cache = init_cache(model, params, 2, 16)
        >>> sorted(cache), cache["layer_0"]["k"].shape
        (['layer_0', 'layer_1'], (2, 16, 2, 8))
    """
    dtype = _cache_dtype(model, params)
    if callable(getattr(model, "init_cache", None)):
        return model.init_cache(batch_size, cache_size, dtype)
    config = getattr(model, "config", None)
    sizes = [getattr(config, k, None) for k in ("num_layers", "num_kv_heads", "head_dim")]
    if any(not isinstance(n, int) for n in sizes):
        raise TypeError(
            f"{type(model).__name__} has no init_cache and its config lacks num_layers / num_kv_heads / head_dim; "
            "generation needs a tunix-style causal LM (model(tokens, positions, cache, mask) -> (logits, cache))"
        )
    layers, kv_heads, head_dim = sizes
    shape = (batch_size, cache_size, kv_heads, head_dim)
    layer = lambda: {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "end_index": jnp.zeros((batch_size,), jnp.int32),
    }
    return {f"layer_{i}": layer() for i in range(layers)}


def cached_inputs(ids, attention_mask, position_ids, cache) -> tuple:
    """``(tokens, positions, cache, mask)`` for a tunix-style call that appends ``ids`` (B, T) to ``cache``: the
    (B, T, S) mask lets token ``t`` see cache slots ``s <= end + t`` (``end``: the cache's ``end_index``, shared by
    the rows as tunix's attention reads it) that ``attention_mask`` (B, S, over the whole cache) marks real.

    Example:
        >>> cache = {"layer_0": {"end_index": jnp.array([2, 2])}}
        >>> mask = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]])
        >>> cached_inputs(jnp.ones((2, 1), jnp.int32), mask, jnp.ones((2, 1), jnp.int32), cache)[3][:, 0].tolist()
        [[False, True, True, False], [True, True, True, False]]
    """
    end = next(iter(cache.values()))["end_index"][0]
    length, size = ids.shape[1], attention_mask.shape[1]
    causal = jnp.arange(size)[None, :] <= end + jnp.arange(length)[:, None]
    return ids, position_ids, cache, causal[None] & jnp.asarray(attention_mask).astype(bool)[:, None, :]


def nnx_forward(model) -> Callable:
    """``forward(params, batch) -> logits`` for an NNX causal LM (tunix's call, ``tunix_inputs``) on a merged copy.

    Example:
        >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        >>> callable(nnx_forward(model))
        True
    """
    call = nnx_call(model)
    return lambda params, batch: logits_of(call(params, *tunix_inputs(batch)))


# ----------------------------------------------------------------------------- sharding over the user's mesh


def param_spec(var, mesh):
    """The ``PartitionSpec`` a Variable's own sharding metadata (``out_sharding`` / ``sharding``: tunix's
    ``('fsdp', 'tp', None)``) gives it on ``mesh``: axis names the mesh lacks, or sizes that do not divide, are
    left replicated.

    Example:
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
        >>> param_spec(nnx.Param(jnp.zeros((4, 6)), out_sharding=("fsdp", "data"), eager_sharding=False), mesh)
        P('fsdp',)
    """
    from jax.sharding import PartitionSpec as P

    from lora_one_jax.sharding import fit_spec

    meta = var.get_metadata()
    names = meta.get("out_sharding") or meta.get("sharding") or meta.get("sharding_names") or ()
    names = [n if isinstance(n, str) and n in mesh.axis_names else None for n in names]
    return fit_spec(P(*names), tuple(np.shape(var.get_value())), mesh)


def shard_nnx(params, mesh):
    """``params`` (an NNX state) with every value placed on ``mesh`` by its Variable's sharding metadata.

    Example:
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("fsdp", "tp"))
        >>> _, p, _ = nnx_split(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
        >>> shard_nnx(p, mesh)["kernel"].get_value().shape
        (8, 4)
    """
    from jax.sharding import NamedSharding

    from lora_one_jax.sharding import place

    flat = [
        (keys, var.replace(value=place(var.get_value(), NamedSharding(mesh, param_spec(var, mesh)))))
        for keys, var in params.flat_state()
    ]
    return nnx.State.from_flat_path(flat)


def _merged_entry(entries) -> Any:
    """One spec entry for axes flattened into one: the major axis's, if every other is whole."""
    head, *tail = list(entries) or [None]
    return head if all(e is None for e in tail) else None


def adapter_specs_nnx(params, targets, mesh) -> dict:
    """Adapter PartitionSpecs derived from each targeted kernel's (``param_spec``): A ``P(kernel d_in, None)``, B
    ``P(None, kernel d_out)``, where the d_in / d_out of an N-D kernel keep the sharding of its leading axis.

    Example:
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("fsdp", "tp"))
        >>> _, p, _ = nnx_split(nnx.Einsum("btd,dnh->btnh", (8, 2, 4), rngs=nnx.Rngs(0)))
        >>> tunix_like = dict(out_sharding=("fsdp", "tp", None), eager_sharding=False)
        >>> p = nnx.State.from_flat_path([(k, v.replace(**tunix_like)) for k, v in p.flat_state()])
        >>> adapter_specs_nnx(p, lj.find_targets(p, lj.LoraConfig(rank=2)), mesh)[""]["a"]
        P('fsdp',)
    """
    from jax.sharding import PartitionSpec as P

    from lora_one_jax.sharding import fit_spec

    ks = kernels(params)
    out = {}
    for path, t in targets.items():
        k = ks[path]
        node = params
        for key in k.keys:
            node = node[key]
        spec = tuple(param_spec(node, mesh)) + (None,) * len(k.shape)
        rest = [i for i in range(len(k.shape)) if i not in k.in_axes]
        d_in, d_out = _merged_entry(spec[i] for i in k.in_axes), _merged_entry(spec[i] for i in rest)
        out[path] = {
            "a": fit_spec(P(d_in, None), (t.d_in, t.rank), mesh),
            "b": fit_spec(P(None, d_out), (t.rank, t.d_out), mesh),
        }
    return out
