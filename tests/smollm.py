"""The real SmolLM2-135M, loaded once per test session and shared by the slow tests."""

import functools

SENTENCE = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."


@functools.cache
def smollm2():
    from lora_one_jax.models import load_model

    return load_model("smollm2-135m")
