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
