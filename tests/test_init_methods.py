"""init_adapters(method=...): LoRA-One on a tiny HF FlaxLlama, PiSSA and LoRA-GA against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_one_jax as lj
from tests.families import build_hf, tiny_llama_config

GAMMA = 128.0


def best_rank_np(x, r):
    u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.fixture(scope="module")
def llama():
    model = build_hf("FlaxLlamaForCausalLM", tiny_llama_config(intermediate_size=64), input_shape=(1, 8), seed=0)
    rng = np.random.default_rng(0)
    batches = [{"input_ids": jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)} for _ in range(2)]
    return model, batches


def lm_loss(model):
    def loss_fn(params, batch):
        ids = batch["input_ids"]
        logits = model(ids, params=params).logits[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    return loss_fn


def test_lora_one_on_flax_llama(llama):
    model, batches = llama
    cfg = lj.LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "up_proj"])
    params = model.params
    grads = lj.estimate_gradient(lm_loss(model), params, batches, cfg, progress=False)
    assert len(grads) == 6 and grads["model/layers/0/self_attn/v_proj"].shape == (32, 16)
    base, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0), method="lora-one", grads=grads, gamma=GAMMA)
    assert base is params  # LoRA-One leaves the base alone
    ids = batches[0]["input_ids"]
    merged = lj.merge(params, adapters, cfg)
    apply, forward = jax.jit(lj.with_lora(model, cfg)), jax.jit(lambda p, ids: model(ids, params=p).logits)
    got = apply({"params": params}, adapters, ids).logits
    want = forward(merged, ids)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(jnp.abs(want - forward(params, ids)).max()) > 1e-6  # the adapters do something
    flat_w = lj.adapters.traverse_util.flatten_dict(params, sep="/")
    flat_m = lj.adapters.traverse_util.flatten_dict(merged, sep="/")
    for path, g in grads.items():
        g = np.asarray(g, np.float64)
        s1 = np.linalg.svd(g, compute_uv=False)[0]
        expect = np.asarray(flat_w[path + "/kernel"], np.float64) - cfg.scale_for(path) / (GAMMA * s1) * best_rank_np(
            g, 4
        )
        np.testing.assert_allclose(flat_m[path + "/kernel"], expect, atol=1e-6)

    # the init is a descent direction: d/dt loss(W + t * scale * A0 @ B0) at t = 0 equals
    # <G, scale * best_rank_r(-G) / (gamma s1)> = -scale * sum(s[:r] ** 2) / (gamma s1), summed over modules
    def along(t):
        moved = lj.merge(params, {p: {"a": t * ad["a"], "b": ad["b"]} for p, ad in adapters.items()}, cfg)
        return sum(lm_loss(model)(moved, b) for b in batches) / len(batches)

    _, slope = jax.jit(lambda t: jax.jvp(along, (t,), (1.0,)))(0.0)
    expect = 0.0
    for path, g in grads.items():
        s = np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)
        expect -= cfg.scale_for(path) * np.sum(s[:4] ** 2) / (GAMMA * s[0])
    np.testing.assert_allclose(float(slope), expect, rtol=1e-3)


def test_pissa_residual_base():
    rng = np.random.default_rng(1)
    w, wt = rng.standard_normal((10, 7)).astype(np.float32), rng.standard_normal((6, 9)).astype(np.float32)
    params = {"fc": {"kernel": jnp.asarray(w)}, "conv": {"kernel": jnp.asarray(wt)}}  # conv stored (d_out, d_in)
    cfg = lj.LoraConfig(
        rank=3, alpha=6.0, targets=["fc", "conv"], transposed_kernels=["conv"], rank_pattern={"conv": 2}
    )
    base, ad = lj.init_adapters(params, cfg, key=jax.random.key(0), method="pissa", svd="exact")
    for path, logical, r in (("fc", w, 3), ("conv", wt.T, 2)):
        prod = cfg.scale_for(path) * np.asarray(ad[path]["a"] @ ad[path]["b"], np.float64)
        np.testing.assert_allclose(prod, best_rank_np(logical, r), atol=1e-5)
        a, b = np.asarray(ad[path]["a"], np.float64), np.asarray(ad[path]["b"], np.float64)
        np.testing.assert_allclose(a.T @ a, b @ b.T, atol=1e-5)  # balanced factors
    np.testing.assert_allclose(base["fc"]["kernel"], w - best_rank_np(w, 3), atol=1e-5)
    np.testing.assert_allclose(base["conv"]["kernel"], (wt.T - best_rank_np(wt.T, 2)).T, atol=1e-5)
    merged = lj.merge(base, ad, cfg)
    np.testing.assert_allclose(merged["fc"]["kernel"], w, atol=1e-5)
    np.testing.assert_allclose(merged["conv"]["kernel"], wt, atol=1e-5)


def test_lora_ga_disjoint_directions():
    rng = np.random.default_rng(2)
    w, g = rng.standard_normal((12, 10)).astype(np.float32), rng.standard_normal((12, 10)).astype(np.float32)
    params = {"fc": {"kernel": jnp.asarray(w)}}
    cfg = lj.LoraConfig(rank=2, alpha=4.0, targets=["fc"])
    base, ad = lj.init_adapters(params, cfg, key=jax.random.key(0), method="lora-ga", grads={"fc": jnp.asarray(g)})
    p, _, qt = np.linalg.svd(g.astype(np.float64))
    c2 = np.sqrt(10) / 16.0  # (d_out ** 0.25 / sqrt(gamma)) ** 2 with the official stable_gamma = 16
    a, b = np.asarray(ad["fc"]["a"], np.float64), np.asarray(ad["fc"]["b"], np.float64)
    np.testing.assert_allclose(a @ a.T, c2 * p[:, :2] @ p[:, :2].T, atol=1e-5)  # span of the first r left vectors
    np.testing.assert_allclose(b.T @ b, c2 * qt[2:4].T @ qt[2:4], atol=1e-5)  # span of the next r right vectors
    np.testing.assert_allclose(base["fc"]["kernel"], w - 2.0 * a @ b, atol=1e-5)
    np.testing.assert_allclose(lj.merge(base, ad, cfg)["fc"]["kernel"], w, atol=1e-5)
    with pytest.raises(ValueError, match="2 \\* rank"):
        lj.init_adapters(
            params,
            lj.LoraConfig(rank=6, targets=["fc"]),
            key=jax.random.key(0),
            method="lora-ga",
            grads={"fc": jnp.asarray(g)},
        )


def test_dispatch_errors_and_lora_still_works():
    params = {"fc": {"kernel": jnp.ones((4, 3))}}
    cfg = lj.LoraConfig(rank=1)
    base, ad = lj.init_adapters(params, cfg, key=jax.random.key(0))
    assert base is params and float(jnp.abs(ad["fc"]["b"]).max()) == 0.0
    with pytest.raises(ValueError, match=r"unknown init method 'dora'.*'lora', 'lora-ga', 'lora-one', 'pissa'"):
        lj.init_adapters(params, cfg, key=jax.random.key(0), method="dora")
    with pytest.raises(TypeError, match="needs grads"):
        lj.init_adapters(params, cfg, key=jax.random.key(0), method="lora-one")
    with pytest.raises(TypeError, match="does not take \\['gamma'\\]"):
        lj.init_adapters(params, cfg, key=jax.random.key(0), method="pissa", gamma=2.0)
    with pytest.raises(TypeError, match="takes no|does not take"):
        lj.init_adapters(params, cfg, key=jax.random.key(0), grads={})
    with pytest.raises(ValueError, match="expected \\(d_in, d_out\\) = \\(4, 3\\)"):
        lj.init_adapters(params, cfg, key=jax.random.key(0), method="lora-one", grads={"fc": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match="missing \\['fc'\\]"):
        lj.init_adapters(params, cfg, key=jax.random.key(0), method="lora-one", grads={"other": jnp.ones((4, 3))})
