"""LoRA configuration and target matching.

A *module path* is the '/'-joined path of a module in the params tree, e.g.
``model/layers/0/self_attn/q_proj``; a module is a *linear* candidate when it owns a 2-D ``kernel``.

Example:
    >>> import numpy as np
    >>> params = {"layer": {"q_proj": {"kernel": np.zeros((8, 4))}}}
    >>> cfg = LoraConfig(rank=2, alpha=4.0, targets=["q_proj"])
    >>> find_targets(params, cfg)["layer/q_proj"].scale
    2.0
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_one_jax._hf import is_hf_model

# Output heads that "all-linear" leaves alone, as PEFT does (it drops the model's output layer).
OUTPUT_HEADS = ("lm_head", "cls/predictions/decoder", "classifier", "score", "qa_outputs")

Pattern = str | tuple[str, ...]

#: Adapters are data: ``{module_path: {"a": A (d_in, r), "b": B (r, d_out)}}`` (the one adapter type).
Adapters = dict[str, dict[str, jax.Array]]


def _as_pattern(value: Any, field: str) -> Pattern:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"LoraConfig.{field} must be a regex string or a list of module names, got {value!r}")


def matches(pattern: Pattern, path: str) -> bool:
    """Whether ``path`` is selected by ``pattern``.

    A string is a regular expression matched against the whole path (as PEFT does); a list/tuple
    holds module names, each matching a path equal to it or ending in ``'/' + name``.

    Example:
        >>> matches(["q_proj"], "model/layers/0/self_attn/q_proj")
        True
        >>> matches(r".*layers/1/.*", "model/layers/0/self_attn/q_proj")
        False
    """
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == name or path.endswith("/" + name) for name in pattern)


def _show(pattern: Pattern | None):
    return list(pattern) if isinstance(pattern, tuple) else pattern


def key_matches(key: str, path: str) -> bool:
    """Whether a ``rank_pattern`` / ``alpha_pattern`` key selects ``path``: the regex ``key`` matches the
    whole path or its end after a ``/`` (``"q_proj"``, ``"layers/0/.*"``), as in PEFT.

    Example:
        >>> key_matches("q_proj", "model/layers/0/self_attn/q_proj"), key_matches("proj", "model/q_proj")
        (True, False)
    """
    return re.fullmatch(rf"(?:.*/)?(?:{key})", path) is not None


def _pattern_value(table: tuple[tuple[str, Any], ...], path: str, default):
    for key, value in table:
        if key_matches(key, path):
            return value
    return default


def _real(value: Any, field: str) -> float:
    """A Python float from a Python or numpy real number (not a bool); a clear error otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"LoraConfig.{field} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"LoraConfig.{field} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(value: Any, field: str) -> float:
    value_f = _real(value, field)
    if not (math.isfinite(value_f) and value_f > 0):
        raise ValueError(f"LoraConfig.{field} must be a finite number > 0, got {value!r}")
    return value_f


def _float_dtype_name(value: Any) -> str:
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"LoraConfig.dtype {value!r} is not a dtype name (try 'float32' or 'bfloat16')") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"LoraConfig.dtype {value!r} is not a floating-point dtype; adapters need 'float32', "
            "'bfloat16' or 'float16'"
        )
    return dtype.name


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    Attributes:
        rank: adapter rank r.
        alpha: scale numerator; the adapter adds ``scale * x @ A @ B`` with ``scale = alpha / r``
            (``alpha / sqrt(r)`` when ``rslora``).
        rslora: use rank-stabilised scaling.
        dropout: dropout rate on the adapter input (active only when ``with_lora``'s apply gets a
            ``dropout_rng``).
        targets: ``"all-linear"`` (every 2-D dense kernel except embeddings and output heads),
            a regex over module paths, or a list of module names.
        exclude: paths to leave alone, same forms as ``targets`` (``None`` for none).
        rank_pattern / alpha_pattern: ``{regex: value}`` overrides per module; a key matches a path
            that ends with it (``"q_proj"`` or ``"layers/0/.*"``). First match wins.
        transposed_kernels: modules whose kernel is stored (d_out, d_in), e.g. GPT-2's ``FlaxConv1D``
            (``["c_attn", "c_proj", "c_fc"]``). Same forms as ``targets``. The only source of a kernel's
            layout: ``with_lora`` checks it against each layer (a non-square kernel read the wrong way round,
            or an ``nn.Dense`` listed here, raises), but a square kernel of another class cannot show its
            layout (GPT-2's attention ``c_proj``): list it right.
        dtype: adapter dtype name.

    Example:
        >>> LoraConfig(rank=8, alpha=16.0, targets=["q_proj", "v_proj"]).scale_for("a/q_proj")
        2.0
    """

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: Pattern = "all-linear"
    exclude: Pattern | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    transposed_kernels: Pattern = ()
    dtype: str = "float32"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("targets", _as_pattern(self.targets, "targets"))
        if self.exclude is not None:
            set_("exclude", _as_pattern(self.exclude, "exclude"))
        set_("transposed_kernels", _as_pattern(self.transposed_kernels, "transposed_kernels"))
        set_("rank", _positive_int(self.rank, "rank"))
        set_("alpha", _positive_float(self.alpha, "alpha"))
        for name, check in (("rank_pattern", _positive_int), ("alpha_pattern", _positive_float)):
            value = getattr(self, name)
            items = dict(value).items() if isinstance(value, Mapping) else map(tuple, value)
            set_(name, tuple((str(k), check(v, f"{name}[{k!r}]")) for k, v in items))
        if isinstance(self.rslora, (bool, np.bool_)):
            set_("rslora", bool(self.rslora))
        else:
            raise TypeError(f"LoraConfig.rslora must be True or False, got {self.rslora!r}")
        dropout = _real(self.dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        set_("dropout", dropout)
        set_("dtype", _float_dtype_name(self.dtype))
        for pattern in (
            self.targets,
            self.exclude,
            self.transposed_kernels,
            *(k for k, _ in self.rank_pattern + self.alpha_pattern),
        ):
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"LoraConfig pattern {pattern!r} is not a valid regex: {e}") from e

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraConfig:
        """Build from a plain dict (e.g. a YAML section), rejecting unknown keys.

        Example:
            >>> LoraConfig.from_dict({"rank": 4, "targets": ["q_proj"]}).rank
            4
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LoraConfig key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form (lists and dicts), inverse of ``from_dict``."""
        out = dataclasses.asdict(self)
        for name in ("targets", "exclude", "transposed_kernels"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        out["rank_pattern"] = dict(self.rank_pattern)
        out["alpha_pattern"] = dict(self.alpha_pattern)
        return out

    def rank_for(self, path: str) -> int:
        """Adapter rank of the module at ``path``."""
        return _pattern_value(self.rank_pattern, path, self.rank)

    def scale_for(self, path: str, rank: int | None = None) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)``) for the module at ``path``."""
        rank = self.rank_for(path) if rank is None else rank
        alpha = _pattern_value(self.alpha_pattern, path, self.alpha)
        return float(alpha) / (math.sqrt(rank) if self.rslora else rank)


class Target(NamedTuple):
    """A targeted module: its kernel's logical shape (d_in, d_out), rank, scale and layout."""

    d_in: int
    d_out: int
    rank: int
    scale: float
    transposed: bool  # kernel stored as (d_out, d_in)


def kernel_key(path: str) -> str:
    """The flattened params key of a module's kernel.

    Example:
        >>> kernel_key("model/layers/0/self_attn/q_proj"), kernel_key("")
        ('model/layers/0/self_attn/q_proj/kernel', 'kernel')
    """
    return f"{path}/kernel" if path else "kernel"


#: Flax leaf names that PyTorch / transformers call ``weight``.
PYTORCH_WEIGHT_LEAVES = ("kernel", "embedding", "scale")


def pytorch_name(path: str) -> str:
    """The PyTorch (transformers, PEFT) name of a '/'-joined Flax path: dots for slashes, and a ``kernel``,
    ``embedding`` or ``scale`` leaf renamed ``weight``. Module paths (adapter keys) keep their last name.

    Example:
        >>> pytorch_name("model/layers/0/self_attn/q_proj/kernel"), pytorch_name("model/norm/scale")
        ('model.layers.0.self_attn.q_proj.weight', 'model.norm.weight')
        >>> pytorch_name("model/layers/0/self_attn/q_proj")  # a module path, as PEFT names it
        'model.layers.0.self_attn.q_proj'
    """
    *prefix, leaf = path.split("/")
    return ".".join([*prefix, "weight" if leaf in PYTORCH_WEIGHT_LEAVES else leaf])


def linear_kernels(params) -> dict[str, tuple[int, ...]]:
    """``{module_path: kernel shape}`` for every module in ``params`` that owns a ``kernel``.

    Example:
        >>> linear_kernels({"mlp": {"fc": {"kernel": np.zeros((3, 5)), "bias": np.zeros(5)}}})
        {'mlp/fc': (3, 5)}
    """
    flat = traverse_util.flatten_dict(check_params(params), sep="/")
    return {k[: -len("kernel")].rstrip("/"): tuple(v.shape) for k, v in flat.items() if k.split("/")[-1] == "kernel"}


def check_params(params, what: str = "params"):
    """``params`` itself if it is a params pytree (nested dicts of arrays); a clear error for the usual mix-ups.

    Example:
        >>> check_params({"params": {"fc": {"kernel": np.zeros((2, 2))}}})
        Traceback (most recent call last):
        TypeError: params is a variables dict {'params': ...}; pass variables['params'] (the params tree itself)
    """
    if not isinstance(params, Mapping):
        is_model = isinstance(params, nn.Module) or is_hf_model(params)
        hint = " (it is a model: pass its params, e.g. model.params or variables['params'])" if is_model else ""
        raise TypeError(f"{what} must be a params pytree (nested dicts of arrays), got {type(params).__name__}{hint}")
    if set(params) == {"params"}:
        raise TypeError(
            f"{what} is a variables dict {{'params': ...}}; pass variables['params'] (the params tree itself)"
        )
    return params


def _nnx_view(params):
    """An NNX ``State`` seen as a linen params tree of (d_in, d_out) kernel shapes (``lora_one_jax.nnx``)."""
    from lora_one_jax.nnx import is_nnx_state, target_view

    return target_view(params) if is_nnx_state(params) else params


def _is_output_head(path: str) -> bool:
    return any(path == head or path.endswith("/" + head) for head in OUTPUT_HEADS)


def _chosen(kernels: dict[str, tuple[int, ...]], config: LoraConfig, available: str) -> list[str]:
    """The module paths ``config.targets`` and ``config.exclude`` select (unsorted), or a clear error."""
    two_d = [p for p, s in kernels.items() if len(s) == 2]
    if config.targets == "all-linear":
        chosen = [p for p in two_d if not _is_output_head(p)]
    else:
        chosen = [p for p in kernels if matches(config.targets, p)]
        if not chosen:
            hint = (
                " (a string is a regex matched against the whole path; pass a list like ['q_proj'] "
                "to match module names)"
                if isinstance(config.targets, str)
                else ""
            )
            raise ValueError(
                f"target pattern {_show(config.targets)!r} matched no kernel{hint}; available: {available}"
            )
        bad = [p for p in chosen if len(kernels[p]) != 2]
        if bad:
            raise ValueError(
                f"targets {bad} have kernels of shape {[kernels[p] for p in bad]}; only 2-D kernels can be adapted"
            )
    if config.exclude is not None:
        chosen = [p for p in chosen if not matches(config.exclude, p)]
        if not chosen:
            raise ValueError(f"exclude pattern {_show(config.exclude)!r} removed every target; available: {available}")
    return chosen


def _check_patterns(config: LoraConfig, chosen: list[str], kernels, available: str) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` key and ``transposed_kernels`` must select something."""
    for pattern_kind, table in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key, _ in table:
            if not any(key_matches(key, p) for p in chosen):
                raise ValueError(
                    f"{pattern_kind} key {key!r} matched no targeted module; targeted: {sorted(chosen)[:8]}"
                )
    if config.transposed_kernels and not any(matches(config.transposed_kernels, p) for p in kernels):
        raise ValueError(
            f"transposed_kernels {_show(config.transposed_kernels)!r} matched no kernel; available: {available}"
        )


def _target(path: str, shape: tuple[int, ...], config: LoraConfig) -> Target:
    transposed = matches(config.transposed_kernels, path) if config.transposed_kernels else False
    rows, cols = shape
    d_in, d_out = (cols, rows) if transposed else (rows, cols)
    rank = config.rank_for(path)
    if rank > min(d_in, d_out):
        raise ValueError(
            f"rank {rank} for {path!r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of its kernel "
            f"(d_in={d_in}, d_out={d_out}); lower LoraConfig.rank or add a rank_pattern entry"
        )
    return Target(d_in, d_out, rank, config.scale_for(path, rank), transposed)


def find_targets(params, config: LoraConfig) -> dict[str, Target]:
    """The modules of ``params`` that ``config`` adapts, sorted by path, validated.

    Raises ``ValueError`` naming the problem and what exists when a pattern matches nothing or a
    rank does not fit a kernel. Functions that need the targets (``init_adapters``, ``merge``, ``with_lora``,
    ``estimate_gradient``, ...) take them as ``targets=`` so that a caller resolves them once.

    Example:
        >>> p = {"fc": {"kernel": np.zeros((6, 4))}, "lm_head": {"kernel": np.zeros((4, 9))}}
        >>> list(find_targets(p, LoraConfig(rank=2)))
        ['fc']
    """
    params = _nnx_view(params)
    kernels = linear_kernels(params)
    if not kernels:
        raise ValueError("params hold no module with a 'kernel'; pass the params collection (e.g. model.params)")
    two_d = sorted(p for p, s in kernels.items() if len(s) == 2)
    names = sorted({p.rsplit("/", 1)[-1] for p in two_d})
    available = f"module names {names}, e.g. paths {two_d[:4]}"
    chosen = _chosen(kernels, config, available)
    _check_patterns(config, chosen, kernels, available)
    return {path: _target(path, kernels[path], config) for path in sorted(chosen)}
