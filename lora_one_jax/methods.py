"""The fine-tuning methods, in one registry that the trainer, the exports and the benchmarks read.

Two tables:

* ``INITS``: how adapters start. ``name -> Init(init, needs_gradient, residual_base, options)``, where
  ``init(params, targets, config, *, key, **options)`` returns the adapters. ``init_adapters`` dispatches
  through it (and makes the frozen base the residual ``W - scale * A0 @ B0`` when ``residual_base``).
* ``METHODS``: what a run compares. ``name -> Method(name, init, preconditioned)``: an init of ``INITS``
  (``None``: full fine-tuning) and whether the optimizer is preconditioned (``lora_one_precond``).

Adding a method is one ``METHODS`` entry (and, for a new init, one ``INITS`` entry plus its function).

Example:
    >>> METHODS["lora-one"].init, METHODS["lora-one"].preconditioned, METHODS["lora-one"].needs_gradient
    ('lora-one', True, True)
    >>> [name for name, m in METHODS.items() if m.residual_base]
    ['pissa', 'lora-ga']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_one_jax.adapters import lora_init, unmerge
from lora_one_jax.config import Adapters, LoraConfig, Target, find_targets, kernel_key
from lora_one_jax.nnx import is_nnx_state, logical_kernels
from lora_one_jax.spectral import lora_ga_init, pissa_init, spectral_init


@dataclasses.dataclass(frozen=True)
class Init:
    """An adapter init: ``init(params, targets, config, *, key, **options) -> adapters``.

    ``needs_gradient``: it takes ``grads=`` (the full fine-tuning gradient from ``estimate_gradient``);
    ``residual_base``: ``scale * A0 @ B0 != 0``, so the frozen base becomes ``W - scale * A0 @ B0``;
    ``options``: the keyword arguments it accepts (their defaults live in the init function).

    Example:
        >>> INITS["pissa"].needs_gradient, INITS["pissa"].residual_base, INITS["pissa"].options
        (False, True, ('svd',))
    """

    init: Callable[..., Adapters]
    needs_gradient: bool
    residual_base: bool
    options: tuple[str, ...]


def _checked_grads(grads, targets: dict[str, Target]) -> dict[str, jax.Array]:
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"grads must be a dict {{module_path: G (d_in, d_out)}} from estimate_gradient, got {type(grads).__name__}"
        )
    missing, extra = sorted(set(targets) - set(grads)), sorted(set(grads) - set(targets))
    if missing or extra:
        raise ValueError(
            f"grads do not cover the targeted modules (missing {missing[:10]}, unexpected {extra[:10]}); "
            "estimate them with estimate_gradient(loss_fn, params, batches, config) using this same config"
        )
    for path, t in targets.items():
        if tuple(grads[path].shape) != (t.d_in, t.d_out):
            raise ValueError(
                f"grads[{path!r}] has shape {tuple(grads[path].shape)}, expected (d_in, d_out) = {(t.d_in, t.d_out)} "
                "(Flax orientation, as estimate_gradient returns it)"
            )
    return {p: grads[p] for p in targets}


def _logical_kernels(params, targets: dict[str, Target]) -> dict[str, jax.Array]:
    if is_nnx_state(params):  # an NNX model's nnx.Param state: N-D kernels as (d_in, d_out) matrices
        return logical_kernels(params, targets)
    flat = traverse_util.flatten_dict(params, sep="/")
    return {p: (flat[kernel_key(p)].T if t.transposed else flat[kernel_key(p)]) for p, t in targets.items()}


def _lora(params, targets, config: LoraConfig, *, key):
    return lora_init(targets, jnp.dtype(config.dtype), key=key)


def _lora_one(params, targets, config: LoraConfig, *, key, grads, **options):
    return spectral_init(_checked_grads(grads, targets), config, key=key, **options)


def _pissa(params, targets, config: LoraConfig, *, key, **options):
    return pissa_init(_logical_kernels(params, targets), config, key=key, **options)


def _lora_ga(params, targets, config: LoraConfig, *, key, grads, **options):
    return lora_ga_init(_checked_grads(grads, targets), config, key=key, **options)


#: init name -> ``Init``; ``init_adapters(..., method=name)`` dispatches through it.
INITS: dict[str, Init] = {
    "lora": Init(_lora, needs_gradient=False, residual_base=False, options=()),
    "lora-one": Init(
        _lora_one, needs_gradient=True, residual_base=False, options=("grads", "gamma", "svd", "tol", "mesh")
    ),
    "pissa": Init(_pissa, needs_gradient=False, residual_base=True, options=("svd",)),
    "lora-ga": Init(_lora_ga, needs_gradient=True, residual_base=True, options=("grads", "gamma", "svd")),
}


def _init_entry(method: str) -> Init:
    if method not in INITS:
        raise ValueError(f"unknown init method {method!r}; available: {sorted(INITS)}")
    return INITS[method]


def init_adapters(
    params,
    config: LoraConfig,
    *,
    key: jax.Array,
    method: str = "lora",
    targets: dict[str, Target] | None = None,
    **options,
):
    """Create adapters for every module ``config`` targets; returns ``(base_params, adapters)``.

    ``method`` is an init of ``INITS`` (one entry point, so benchmarks compare inits on the same code path):

    * ``"lora"``: PEFT's default (``lora_init``): A Kaiming-uniform, B = 0. Base unchanged.
    * ``"lora-one"``: ``spectral_init(grads, config, gamma=128.0, svd="auto")``; needs ``grads`` from
      ``estimate_gradient``. Base unchanged.
    * ``"pissa"``: ``pissa_init`` (top-r SVD of each kernel, ``svd="auto"``). The base becomes the
      residual ``W - scale * A @ B``.
    * ``"lora-ga"``: ``lora_ga_init(grads, config, gamma=16.0, svd="auto")``. The base has
      ``scale * A @ B`` subtracted, so the merged model equals the original at step 0.

    ``base_params`` is ``params`` itself for methods that leave the base alone and the new frozen base
    otherwise. ``key`` seeds the random init (``"lora"``) or the randomized SVD sketch. ``targets``:
    ``find_targets(params, config)`` when the caller already has it (it is resolved here otherwise).

    Example:
        >>> import numpy as np
        >>> params = {"fc": {"kernel": np.ones((4, 3), np.float32)}}
        >>> base, ad = init_adapters(params, LoraConfig(rank=1), key=jax.random.key(0))
        >>> base is params, sorted(ad)
        (True, ['fc'])
        >>> base, ad = init_adapters(params, LoraConfig(rank=1), key=jax.random.key(0), method="pissa")
        >>> float(jnp.abs(base["fc"]["kernel"]).max()) < 1e-5  # a rank-1 kernel moves entirely into A @ B
        True
    """
    entry = _init_entry(method)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise TypeError(f"method {method!r} does not take {unknown}; it accepts {list(entry.options)}")
    if entry.needs_gradient and "grads" not in options:
        raise TypeError(
            f"method {method!r} needs grads=...: the full fine-tuning gradients from "
            "estimate_gradient(loss_fn, params, batches, config)"
        )
    targets = find_targets(params, config) if targets is None else targets
    adapters = entry.init(params, targets, config, key=key, **options)
    if entry.residual_base:
        return unmerge(params, adapters, config, targets=targets), adapters
    return params, adapters


@dataclasses.dataclass(frozen=True)
class Method:
    """A fine-tuning method a run can train: an init of ``INITS`` (``None``: full fine-tuning) and whether
    the optimizer is preconditioned (``lora_one_precond`` before AdamW).

    Example:
        >>> m = METHODS["pissa"]
        >>> m.init, m.preconditioned, m.needs_gradient, m.residual_base
        ('pissa', False, False, True)
        >>> METHODS["full"].needs_gradient, METHODS["full"].residual_base
        (False, False)
    """

    name: str
    init: str | None
    preconditioned: bool

    def __post_init__(self):
        if self.init is not None:
            _init_entry(self.init)

    @property
    def needs_gradient(self) -> bool:
        """Whether the init needs the full fine-tuning gradient (``estimate_gradient``)."""
        return self.init is not None and INITS[self.init].needs_gradient

    @property
    def residual_base(self) -> bool:
        """Whether the frozen base is ``W - scale * A0 @ B0`` (exports fold it back: ``fold_residual``)."""
        return self.init is not None and INITS[self.init].residual_base


def _methods(*entries: tuple[str, str | None, bool]) -> dict[str, Method]:
    return {name: Method(name, init, preconditioned) for name, init, preconditioned in entries}


#: method name -> ``Method``: every method the trainer and the benchmarks can run.
METHODS: dict[str, Method] = _methods(
    ("lora", "lora", False),
    ("lora-one-init", "lora-one", False),  # the spectral init alone, plain AdamW (the official release)
    ("lora-one", "lora-one", True),  # spectral init + preconditioned AdamW
    ("lora-precond", "lora", True),
    ("pissa", "pissa", False),
    ("lora-ga", "lora-ga", False),
    ("full", None, False),  # full fine-tuning: no adapters
)
