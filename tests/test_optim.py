"""lora_one_precond / lora_one against numpy, invariance, and composition with optax wrappers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_one_jax as lj


def ref_precond(ga, gb, a, b, damping):
    a, b, ga, gb = (np.asarray(x, np.float64) for x in (a, b, ga, gb))
    r = a.shape[1]
    return ga @ np.linalg.inv(b @ b.T + damping * np.eye(r)), np.linalg.inv(a.T @ a + damping * np.eye(r)) @ gb


def tree(seed, d_in=6, d_out=5, r=3):
    k = iter(jax.random.split(jax.random.key(seed), 8))
    return {
        "layers/0/q": {"a": jax.random.normal(next(k), (d_in, r)), "b": jax.random.normal(next(k), (r, d_out))},
        "layers/1/q": {"a": jax.random.normal(next(k), (d_in, r)), "b": jax.random.normal(next(k), (r, d_out))},
        "bias": jax.random.normal(next(k), (d_out,)),
        "other": {"a": jax.random.normal(next(k), (4,)), "c": jax.random.normal(next(k), (4,))},  # not a pair
    }


@pytest.mark.parametrize("damping", [1e-6, 0.3])
def test_precond_matches_numpy(damping):
    params, grads = tree(0), tree(1)
    out, state = jax.jit(lj.lora_one_precond(damping).update)(grads, optax.EmptyState(), params)
    assert isinstance(state, optax.EmptyState)
    for path in ("layers/0/q", "layers/1/q"):
        ga, gb = ref_precond(grads[path]["a"], grads[path]["b"], params[path]["a"], params[path]["b"], damping)
        np.testing.assert_allclose(out[path]["a"], ga, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[path]["b"], gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["bias"], grads["bias"])
    np.testing.assert_array_equal(out["other"]["a"], grads["other"]["a"])


def test_precond_dtypes_and_stacked_layers():
    params = {
        "q": {
            "a": jax.random.normal(jax.random.key(0), (2, 6, 3)),
            "b": jax.random.normal(jax.random.key(1), (2, 3, 5)),
        }
    }
    grads = {"q": {"a": jnp.ones((2, 6, 3), jnp.bfloat16), "b": jnp.ones((2, 3, 5), jnp.bfloat16)}}
    out, _ = jax.jit(lj.lora_one_precond(1e-2).update)(
        grads, optax.EmptyState(), jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    )
    assert out["q"]["a"].dtype == jnp.bfloat16 and out["q"]["b"].dtype == jnp.bfloat16
    p16 = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16), np.float64), params)
    for i in range(2):  # each stacked layer preconditioned on its own
        ga, gb = ref_precond(np.ones((6, 3)), np.ones((3, 5)), p16["q"]["a"][i], p16["q"]["b"][i], 1e-2)
        np.testing.assert_allclose(np.asarray(out["q"]["a"][i], np.float32), ga, rtol=2e-2)
        np.testing.assert_allclose(np.asarray(out["q"]["b"][i], np.float32), gb, rtol=2e-2)


def test_precond_needs_params():
    opt = lj.lora_one_precond()
    with pytest.raises(ValueError, match="not passing `params`.*pre-step A and B"):
        opt.update(tree(0), opt.init(tree(0)))
    with pytest.raises(ValueError, match="damping"):
        lj.lora_one_precond(-1.0)


def test_invariance_to_factorization():
    """One preconditioned step moves A @ B by the same first-order amount for (A, B) and (A R, R^-1 B)."""
    k = jax.random.split(jax.random.key(0), 5)
    d_in, d_out, r, scale = 8, 7, 3, 2.0
    a, b = jax.random.normal(k[0], (d_in, r)), jax.random.normal(k[1], (r, d_out))
    target = jax.random.normal(k[2], (d_in, d_out))
    rmat = jax.random.normal(k[3], (r, r)) + 2 * jnp.eye(r)  # well-conditioned, not orthogonal

    def loss(ad):
        return 0.5 * jnp.sum((scale * ad["w"]["a"] @ ad["w"]["b"] - target) ** 2)

    @functools.partial(jax.jit, static_argnums=1)
    def first_order_change(ad, precond):
        g = jax.grad(loss)(ad)
        if precond:
            g, _ = lj.lora_one_precond(1e-10).update(g, optax.EmptyState(), ad)
        da, db = -g["w"]["a"], -g["w"]["b"]
        return da @ ad["w"]["b"] + ad["w"]["a"] @ db

    ad1 = {"w": {"a": a, "b": b}}
    ad2 = {"w": {"a": a @ rmat, "b": jnp.linalg.solve(rmat, b)}}
    np.testing.assert_allclose(ad1["w"]["a"] @ ad1["w"]["b"], ad2["w"]["a"] @ ad2["w"]["b"], atol=1e-4)
    np.testing.assert_allclose(first_order_change(ad1, True), first_order_change(ad2, True), rtol=1e-3, atol=1e-3)
    # without the preconditioner the step depends on the factorization (so the check above can fail)
    plain_gap = jnp.abs(first_order_change(ad1, False) - first_order_change(ad2, False)).max()
    assert plain_gap > 1.0


def test_chain_jit_and_lora_one_alias():
    params, grads = tree(0), tree(1)
    opt = optax.chain(lj.lora_one_precond(1e-3), optax.sgd(1.0))
    upd, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    ga, gb = ref_precond(
        grads["layers/0/q"]["a"], grads["layers/0/q"]["b"], params["layers/0/q"]["a"], params["layers/0/q"]["b"], 1e-3
    )
    np.testing.assert_allclose(upd["layers/0/q"]["a"], -ga, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["bias"], -grads["bias"])
    # lora_one = chain(precond, adamw); equal to composing it by hand, with a schedule
    sched = optax.linear_schedule(1e-2, 0.0, 10)
    ours, hand = (
        lj.lora_one(sched, damping=1e-3, weight_decay=0.1),
        optax.chain(lj.lora_one_precond(1e-3), optax.adamw(sched, weight_decay=0.1)),
    )
    s1, s2 = ours.init(params), hand.init(params)
    for _ in range(2):
        u1, s1 = jax.jit(ours.update)(grads, s1, params)
        u2, s2 = jax.jit(hand.update)(grads, s2, params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u1, u2)


def test_masked():
    params, grads = tree(0), tree(1)
    mask = {
        "layers/0/q": {"a": True, "b": True},
        "layers/1/q": {"a": False, "b": False},
        "bias": False,
        "other": {"a": False, "c": False},
    }
    opt = optax.masked(lj.lora_one_precond(1e-3), mask)
    upd, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    ga, gb = ref_precond(
        grads["layers/0/q"]["a"], grads["layers/0/q"]["b"], params["layers/0/q"]["a"], params["layers/0/q"]["b"], 1e-3
    )
    np.testing.assert_allclose(upd["layers/0/q"]["a"], ga, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["layers/0/q"]["b"], gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(upd["layers/1/q"]["a"], grads["layers/1/q"]["a"])  # masked out: untouched
    np.testing.assert_array_equal(upd["bias"], grads["bias"])


def test_multisteps():
    params, g1, g2 = tree(0), tree(1), tree(2)
    opt = optax.MultiSteps(optax.chain(lj.lora_one_precond(1e-3), optax.sgd(1.0)), every_k_schedule=2)
    state = opt.init(params)
    update = jax.jit(opt.update)
    u1, state = update(g1, state, params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u1))  # accumulating
    u2, state = update(g2, state, params)
    mean = jax.tree.map(lambda x, y: (x + y) / 2, g1, g2)
    for path in ("layers/0/q", "layers/1/q"):
        ga, gb = ref_precond(mean[path]["a"], mean[path]["b"], params[path]["a"], params[path]["b"], 1e-3)
        np.testing.assert_allclose(u2[path]["a"], -ga, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(u2[path]["b"], -gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(u2["bias"], -mean["bias"], rtol=1e-6)


def test_batched_preconditioner_equals_the_per_pair_one():
    rng = np.random.default_rng(3)
    shapes = [(6, 3, 5), (6, 3, 5), (8, 2, 4), (6, 3, 5), (4, 4, 9)]  # (d_in, r, d_out): groups and ranks mix
    params, grads = {}, {}
    for i, (d_in, r, d_out) in enumerate(shapes):
        params[f"m{i}"] = {
            "a": jnp.asarray(rng.normal(size=(d_in, r)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(r, d_out)), jnp.float32),
        }
        grads[f"m{i}"] = {
            "a": jnp.asarray(rng.normal(size=(d_in, r)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(r, d_out)), jnp.float32),
        }
    params["stacked"] = {
        "a": jnp.asarray(rng.normal(size=(3, 6, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32),
    }
    grads["stacked"] = jax.tree.map(lambda x: x * 0.5, params["stacked"])
    out, _ = jax.jit(lj.lora_one_precond(1e-3).update)(grads, optax.EmptyState(), params)
    for path in params:
        one = lj.precondition_pair(grads[path], params[path], 1e-3)
        np.testing.assert_allclose(out[path]["a"], one["a"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out[path]["b"], one["b"], rtol=1e-4, atol=1e-6)
    ga, gb = ref_precond(grads["m2"]["a"], grads["m2"]["b"], params["m2"]["a"], params["m2"]["b"], 1e-3)
    np.testing.assert_allclose(out["m2"]["a"], ga, rtol=1e-4, atol=1e-5)
