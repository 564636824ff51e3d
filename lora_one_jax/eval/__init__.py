"""Held-out evaluation: choice scoring, greedy generation with exact match, answer NLL.

Example:
    >>> from lora_one_jax.eval import Evaluator, evaluate  # doctest: +SKIP
"""

from lora_one_jax.eval.evaluate import (
    EvalResult,
    Evaluator,
    answer_nll,
    evaluate,
    generate,
    number_match,
    numbers_in,
    score_choices,
)

__all__ = [
    "EvalResult",
    "Evaluator",
    "answer_nll",
    "evaluate",
    "generate",
    "number_match",
    "numbers_in",
    "score_choices",
]
