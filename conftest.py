import os

# Simulated devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import flax.linen as nn

    import lora_one_jax as lj

    doctest_namespace.update(np=np, jnp=jnp, jax=jax, nn=nn, lj=lj)


class CompileCounter:
    """Counts XLA backend compilations (every jit cache miss compiles once)."""

    def __init__(self):
        self.count = 0
        self.active = False

    def __call__(self, name, seconds, **kwargs):
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COUNTER = CompileCounter()
jax.monitoring.register_event_duration_secs_listener(_COUNTER)


@pytest.fixture
def compiles():
    """``with compiles as c: ...`` then ``c.count``: XLA compilations inside the block."""

    class Block:
        def __enter__(self):
            _COUNTER.count, _COUNTER.active = 0, True
            return _COUNTER

        def __exit__(self, *exc):
            _COUNTER.active = False

    return Block()
