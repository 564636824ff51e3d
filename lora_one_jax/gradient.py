"""The full fine-tuning gradient of the targeted kernels, estimated over a few micro-batches.

What is averaged, exactly (as the official LoRA-One code does): ``loss_fn(params, batch)`` returns
the loss of one micro-batch, normally the mean over its tokens; ``estimate_gradient`` differentiates
it, and returns the plain mean of those per-micro-batch gradients over the micro-batches. For
equal-sized micro-batches (and a loss that is a mean over equally many tokens in each) this equals the
gradient of the mean loss over the concatenated batch; otherwise every micro-batch weighs the same,
whatever its number of tokens.

Example:
    >>> params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> loss_fn = lambda p, x: jnp.mean(x @ p["fc"]["kernel"] + p["fc"]["bias"])
    >>> batches = [jnp.ones((4, 3)), 3 * jnp.ones((4, 3))]
    >>> g = estimate_gradient(loss_fn, params, batches, lj.LoraConfig(rank=1), progress=False)
    >>> g["fc"].tolist()  # d/dW mean(x @ W) = mean over rows of x / 2 columns, averaged over batches
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_one_jax._hf import apply_hf_fixes
from lora_one_jax.config import LoraConfig, find_targets, kernel_key
from lora_one_jax.progress import progress_bar


def _make_step(loss_fn: Callable, keys: dict[str, str], order: list[str]):
    """One jitted step: accumulate the float32 gradient of the targeted kernels, flag non-finite ones."""

    def step(acc, kernels, rest, batch):
        def loss_of(kernels):
            flat = dict(rest)
            flat.update({keys[p]: k for p, k in kernels.items()})
            return loss_fn(traverse_util.unflatten_dict(flat, sep="/"), batch)

        grads = jax.grad(loss_of)(kernels)
        grads = {p: g.astype(jnp.float32) for p, g in grads.items()}
        finite = jnp.stack([jnp.isfinite(grads[p]).all() for p in order])
        return {p: acc[p] + grads[p] for p in acc}, finite

    return jax.jit(step, donate_argnums=0)


def estimate_gradient(
    loss_fn: Callable[[Any, Any], jax.Array], params, batches: Iterable, config: LoraConfig, *, progress: bool = True
) -> dict[str, jax.Array]:
    """Mean gradient of ``loss_fn`` w.r.t. every kernel ``config`` targets: ``{module_path: G (d_in, d_out)}``.

    ``loss_fn(params, batch)`` returns a scalar (the mean loss of a micro-batch); ``batches`` is any
    iterable of pytrees. Only the targeted kernels are differentiated (embeddings, norms, heads and
    other leaves are passed in as constants); one jitted step is compiled and reused for every
    micro-batch (give them equal shapes, e.g. pad, or each new shape compiles again), and the float32
    running sum is the only buffer kept besides one micro-batch's activations. The result is the sum
    divided by the number of micro-batches (see the module doc for what exactly is averaged), in
    float32 and Flax orientation: kernels listed in ``config.transposed_kernels`` (stored (d_out, d_in))
    get their gradient transposed to (d_in, d_out). A NaN or Inf gradient raises ``FloatingPointError``
    naming the module and the micro-batch index. ``progress`` shows a tqdm bar.

    Example:
        >>> params = {"fc": {"kernel": jnp.ones((3, 2))}}
        >>> loss_fn = lambda p, x: jnp.mean((x @ p["fc"]["kernel"]) ** 2)
        >>> g = estimate_gradient(loss_fn, params, [jnp.ones((4, 3))] * 3, lj.LoraConfig(rank=1), progress=False)
        >>> g["fc"].shape, g["fc"].dtype
        ((3, 2), dtype('float32'))
    """
    apply_hf_fixes()
    targets = find_targets(params, config)
    keys = {p: kernel_key(p) for p in targets}
    flat = traverse_util.flatten_dict(params, sep="/")
    kernels = {p: flat[k] for p, k in keys.items()}
    kernel_keys = set(keys.values())
    rest = {k: v for k, v in flat.items() if k not in kernel_keys}
    order = sorted(targets)
    step = _make_step(loss_fn, keys, order)
    acc = {p: jnp.zeros(jnp.shape(k), jnp.float32) for p, k in kernels.items()}

    def check(finite, index):
        finite = np.asarray(finite)
        if not finite.all():
            bad = [order[i] for i in np.flatnonzero(~finite)]
            raise FloatingPointError(
                f"non-finite (NaN/Inf) gradient for module {bad[0]!r} in micro-batch {index}"
                + (f" (also {bad[1:6]})" if len(bad) > 1 else "")
                + "; check that batch's data and the loss (e.g. divisions by a zero token count)"
            )

    total = len(batches) if hasattr(batches, "__len__") else None
    n, pending = 0, None
    for batch in progress_bar(batches, total=total, desc="gradient estimate", unit="batch", enabled=progress):
        acc, finite = step(acc, kernels, rest, batch)
        if pending is not None:  # check the previous step while this one runs
            check(*pending)
        pending, n = (finite, n), n + 1
    if pending is None:
        raise ValueError("batches is empty: estimate_gradient needs at least one micro-batch")
    check(*pending)
    return {p: (acc[p] / n).T if targets[p].transposed else acc[p] / n for p in order}
