"""init_adapters(method=...): LoRA-One on a tiny HF FlaxLlama, PiSSA and LoRA-GA against numpy."""

import flax.linen as nn
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


# ----------------------------------------------------------------------------- the registry of methods


def test_methods_registry_names_and_properties():
    assert {n: (m.init, m.preconditioned) for n, m in lj.METHODS.items()} == {
        "lora": ("lora", False),
        "lora-one-init": ("lora-one", False),
        "lora-one": ("lora-one", True),
        "lora-precond": ("lora", True),
        "pissa": ("pissa", False),
        "lora-ga": ("lora-ga", False),
        "full": (None, False),
    }
    assert all(name == m.name for name, m in lj.METHODS.items())
    assert sorted(n for n, m in lj.METHODS.items() if m.needs_gradient) == ["lora-ga", "lora-one", "lora-one-init"]
    assert sorted(n for n, m in lj.METHODS.items() if m.residual_base) == ["lora-ga", "pissa"]
    with pytest.raises(ValueError, match="unknown init method 'dora'"):
        lj.Method("dora", "dora", False)


@pytest.mark.parametrize("init", sorted(lj.INITS))
def test_every_init_keeps_the_merged_model_where_its_registry_entry_says(init):
    """A residual-base init moves scale * A0 @ B0 out of the base (merged == original); the others keep the base
    object itself; the gradient inits need grads=."""
    rng = np.random.default_rng(3)
    params = {"fc": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}}
    cfg = lj.LoraConfig(rank=2, alpha=4.0, targets=["fc"])
    entry = lj.INITS[init]
    options = {"grads": {"fc": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}} if entry.needs_gradient else {}
    base, ad = lj.init_adapters(params, cfg, key=jax.random.key(0), method=init, **options)
    assert (base is not params) == entry.residual_base
    product = cfg.scale_for("fc") * np.asarray(ad["fc"]["a"] @ ad["fc"]["b"])
    assert (np.abs(product).max() > 1e-3) == (init != "lora")  # only PEFT's init starts at A @ B = 0
    np.testing.assert_allclose(lj.merge(base, ad, cfg)["fc"]["kernel"] - product * (not entry.residual_base),
                               params["fc"]["kernel"], atol=1e-5)  # fmt: skip


def test_a_new_method_is_one_entry_plus_its_init(monkeypatch):
    def zeros(params, targets, config, *, key, value=0.0):
        return {p: {"a": jnp.full((t.d_in, t.rank), value), "b": jnp.full((t.rank, t.d_out), value)}
                for p, t in targets.items()}  # fmt: skip

    monkeypatch.setitem(lj.INITS, "const", lj.Init(zeros, needs_gradient=False, residual_base=True, options=("value",)))
    monkeypatch.setitem(lj.METHODS, "const", lj.Method("const", "const", preconditioned=True))
    params = {"fc": {"kernel": jnp.ones((3, 2))}}
    cfg = lj.LoraConfig(rank=1, alpha=1.0, targets=["fc"])
    base, ad = lj.init_adapters(params, cfg, key=jax.random.key(0), method=lj.METHODS["const"].init, value=0.5)
    np.testing.assert_allclose(base["fc"]["kernel"], np.full((3, 2), 0.75))  # 1 - 0.5 * 0.5: the residual base
    assert lj.METHODS["const"].residual_base and not lj.METHODS["const"].needs_gradient


# ----------------------------------------------------------------------------- find_targets once


def test_resolved_targets_are_passed_along_and_give_the_same_results(monkeypatch):
    import lora_one_jax.adapters
    import lora_one_jax.gradient
    import lora_one_jax.methods
    import lora_one_jax.sharding
    import lora_one_jax.transform

    rng = np.random.default_rng(4)
    model = nn.Dense(5, name="fc")
    params = {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), "bias": jnp.zeros(5)}
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    cfg = lj.LoraConfig(rank=2, targets=".*")
    loss_fn = lambda p, batch: jnp.mean(model.apply({"params": p}, batch) ** 2)

    def everything(targets):
        grads = lj.estimate_gradient(loss_fn, params, [x, 2 * x], cfg, progress=False, targets=targets)
        base, ad = lj.init_adapters(params, cfg, key=jax.random.key(0), method="lora-ga", grads=grads, targets=targets)
        out = lj.with_lora(model, cfg, targets=targets)({"params": base}, ad, x)
        merged = lj.merge(base, ad, cfg, targets=targets)
        specs = lora_one_jax.sharding.adapter_specs(params, cfg, (), lora_one_jax.sharding.make_mesh(), targets=targets)
        return grads, out, merged, lj.unmerge(merged, ad, cfg, targets=targets), specs

    want = everything(None)
    targets = lj.find_targets(params, cfg)
    calls = []
    for module in (lora_one_jax.adapters, lora_one_jax.gradient, lora_one_jax.methods, lora_one_jax.sharding,
                   lora_one_jax.transform):  # fmt: skip
        monkeypatch.setattr(module, "find_targets", lambda *a, **k: calls.append(a) or lj.find_targets(*a, **k))
    got = everything(targets)
    assert calls == []
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got[:4], want[:4])
    assert got[4] == want[4]
