"""lora-one-jax: LoRA-One fine-tuning (spectral init + preconditioned training) for Flax models.

The core (this package) imports only jax, flax, optax and numpy. Models, data and evaluation live
beside it: ``lora_one_jax.models``, ``lora_one_jax.data``, ``lora_one_jax.eval``.

Example:
    >>> import lora_one_jax as lj
    >>> lj.LoraConfig(rank=8, targets=["q_proj", "v_proj"]).rank
    8
"""

from lora_one_jax.adapters import (
    check_adapters,
    lora_init,
    merge,
    stack_adapters,
    unmerge,
    unstack_adapters,
)
from lora_one_jax.config import Adapters, LoraConfig, Target, find_targets, linear_kernels, matches
from lora_one_jax.diagnostics import (
    alignment,
    alignment_summary,
    gradient_stability,
    gradient_subspaces,
    subspace_angles,
    subspace_shifts,
)
from lora_one_jax.gradient import estimate_gradient, lower_gradient_step
from lora_one_jax.gradient_stage import GRADIENT_INITS, GradientFactors, gradient_factors
from lora_one_jax.head import with_loss_positions
from lora_one_jax.losses import (
    causal_lm_loss,
    decoder_start_id,
    full_loss_fn,
    is_encoder_decoder,
    lora_loss_fn,
    mean_nll,
    seq2seq_loss,
    sequence_logprob,
    token_logprobs,
)
from lora_one_jax.methods import INITS, METHODS, Init, Method, init_adapters
from lora_one_jax.nnx import nnx_split
from lora_one_jax.optim import lora_one, lora_one_precond, precondition_pair
from lora_one_jax.spectral import gradient_passes, lora_ga_init, pissa_init, spectral_init, spectral_init_streamed
from lora_one_jax.step_size import GammaChoice, choose_gamma, rescale, unit_spectral_init
from lora_one_jax.svd import best_rank, principal_angles, top_svd
from lora_one_jax.transform import lora_delta, with_lora

__all__ = [
    # configuration and adapters
    "Adapters",
    "LoraConfig",
    "Target",
    "check_adapters",
    "find_targets",
    "init_adapters",
    "linear_kernels",
    "lora_delta",
    "lora_init",
    "matches",
    "merge",
    "nnx_split",
    "stack_adapters",
    "unmerge",
    "unstack_adapters",
    "with_lora",
    # methods: the registry every trainer, export and benchmark reads
    "INITS",
    "METHODS",
    "Init",
    "Method",
    # LoRA-One: gradient, spectral init, preconditioner
    "estimate_gradient",
    "GRADIENT_INITS",
    "GradientFactors",
    "gradient_factors",
    "gradient_passes",
    "lower_gradient_step",
    "lora_ga_init",
    "lora_one",
    "lora_one_precond",
    "pissa_init",
    "precondition_pair",
    "spectral_init",
    "spectral_init_streamed",
    # LoRA-One's own step (init.gamma: auto)
    "GammaChoice",
    "choose_gamma",
    "rescale",
    "unit_spectral_init",
    # linear algebra and diagnostics
    "alignment",
    "alignment_summary",
    "gradient_stability",
    "gradient_subspaces",
    "best_rank",
    "principal_angles",
    "subspace_angles",
    "subspace_shifts",
    "top_svd",
    # losses
    "causal_lm_loss",
    "decoder_start_id",
    "full_loss_fn",
    "is_encoder_decoder",
    "lora_loss_fn",
    "mean_nll",
    "seq2seq_loss",
    "sequence_logprob",
    "token_logprobs",
    "with_loss_positions",
]
