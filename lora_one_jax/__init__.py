"""lora-one-jax: LoRA-One fine-tuning (spectral init + preconditioned training) for Flax models.

Example:
    >>> import lora_one_jax as lj
    >>> lj.LoraConfig(rank=8, targets=["q_proj", "v_proj"]).rank
    8
"""

from lora_one_jax.compat import patch_transformers
from lora_one_jax.config import LoraConfig, Target, find_targets, linear_kernels, matches
from lora_one_jax.adapters import init_adapters, lora_init, merge, unmerge
from lora_one_jax.transform import lora_delta, with_lora
from lora_one_jax.gradient import estimate_gradient
from lora_one_jax.spectral import lora_ga_init, pissa_init, spectral_init
from lora_one_jax.svd import best_rank, principal_angles, top_svd
from lora_one_jax.optim import lora_one, lora_one_precond, precondition_pair
from lora_one_jax.diagnostics import alignment, subspace_angles
from lora_one_jax.assets import fetch_asset
from lora_one_jax.models import LoadedModel, load_model
from lora_one_jax.data import Task, load_task
from lora_one_jax.batching import batches, causal_lm_loss, token_logprobs
from lora_one_jax.evaluate import EvalResult, evaluate, generate, score_choices

patch_transformers()

__all__ = [
    "LoraConfig",
    "Target",
    "find_targets",
    "init_adapters",
    "linear_kernels",
    "lora_delta",
    "lora_init",
    "matches",
    "merge",
    "patch_transformers",
    "unmerge",
    "with_lora",
    # LoRA-One core (issue 3)
    "alignment",
    "best_rank",
    "estimate_gradient",
    "lora_ga_init",
    "lora_one",
    "lora_one_precond",
    "pissa_init",
    "precondition_pair",
    "principal_angles",
    "spectral_init",
    "subspace_angles",
    "top_svd",
    # real models, data and evaluation (issue 4)
    "EvalResult",
    "LoadedModel",
    "Task",
    "batches",
    "causal_lm_loss",
    "evaluate",
    "fetch_asset",
    "generate",
    "load_model",
    "load_task",
    "score_choices",
    "token_logprobs",
]
