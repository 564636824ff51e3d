"""with_lora / merge / unmerge on every supported model family (tiny random configs)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lora_one_jax as lj
from tests.families import FAMILIES, feature_token_copies, make_family, random_adapters


@functools.cache
def family(name):
    return make_family(name)


def config_for(fam, **kwargs):
    return lj.LoraConfig(rank=4, alpha=8.0, targets="all-linear", transposed_kernels=fam.transposed, **kwargs)


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_b_gives_base_logits_exactly(name):
    fam = family(name)
    cfg = config_for(fam)
    _, adapters = lj.init_adapters(fam.params, cfg, key=jax.random.key(0))
    assert all(float(jnp.abs(ad["a"]).max()) > 0 for ad in adapters.values())
    np.testing.assert_array_equal(fam.forward_lora(fam.params, adapters, cfg), fam.forward(fam.params))


@pytest.mark.parametrize("name", FAMILIES)
def test_adapters_equal_merged_model(name):
    fam = family(name)
    cfg = config_for(fam)
    adapters = random_adapters(fam.params, cfg)
    with_adapters = jax.jit(lambda p, a: fam.forward_lora(p, a, cfg))(fam.params, adapters)
    merged = fam.forward(lj.merge(fam.params, adapters, cfg))
    base = fam.forward(fam.params)
    assert float(jnp.abs(merged - base).max()) > 1e-3, "adapters must change the output"
    np.testing.assert_allclose(with_adapters, merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_only_adapters_and_follow_chain_rule(name):
    """dL/dA = scale * G @ B.T and dL/dB = scale * A.T @ G with G = dL/dW at the merged weights."""
    fam = family(name)
    cfg = config_for(fam)
    adapters = random_adapters(fam.params, cfg)
    before = jax.tree.map(np.array, fam.params)

    loss_lora = lambda a: jnp.mean(fam.forward_lora(fam.params, a, cfg) ** 2)
    grads = jax.jit(jax.grad(loss_lora))(adapters)

    merged = lj.merge(fam.params, adapters, cfg)
    g_full = flat(jax.jit(jax.grad(lambda p: jnp.mean(fam.forward(p) ** 2)))(merged))
    targets = lj.find_targets(fam.params, cfg)
    assert set(grads) == set(adapters)
    for path, g in grads.items():
        G = g_full[lj.config.kernel_key(path)]
        G = G.T if targets[path].transposed else G
        scale = targets[path].scale
        a, b = adapters[path]["a"], adapters[path]["b"]
        assert float(jnp.abs(g["b"]).max()) > 0, path
        np.testing.assert_allclose(g["a"], scale * G @ b.T, atol=1e-6, rtol=1e-3, err_msg=path)
        np.testing.assert_allclose(g["b"], scale * a.T @ G, atol=1e-6, rtol=1e-3, err_msg=path)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, fam.params))


@pytest.mark.parametrize("name", FAMILIES)
def test_unmerge_inverts_merge(name):
    fam = family(name)
    cfg = config_for(fam)
    adapters = random_adapters(fam.params, cfg)
    merged = lj.merge(fam.params, adapters, cfg)
    changed = [k for k, v in flat(merged).items() if not np.array_equal(v, flat(fam.params)[k])]
    assert sorted(changed) == sorted(lj.config.kernel_key(p) for p in adapters)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), lj.unmerge(merged, adapters, cfg), fam.params
    )


def test_gpt2_conv1d_layout_is_respected():
    """FlaxConv1D stores (d_out, d_in): adapters are (d_in, r), (r, d_out) and merge adds the transpose."""
    fam = family("gpt2")
    cfg = config_for(fam)
    targets = lj.find_targets(fam.params, cfg)
    t = targets["transformer/h/0/attn/c_attn"]
    assert (t.d_in, t.d_out, t.transposed) == (32, 96, True)
    wrong = lj.LoraConfig(rank=4, targets="all-linear")
    with pytest.raises(ValueError, match=r"stores its kernel as \(d_out, d_in\).*transposed_kernels.*add it \(GPT-2"):
        adapters = random_adapters(fam.params, lj.LoraConfig(rank=4, targets=["c_proj"]))
        fam.forward_lora(fam.params, adapters, wrong)


def test_lora_dropout_only_with_rng():
    fam = family("mlp")
    cfg = config_for(fam, dropout=0.5)
    adapters = random_adapters(fam.params, cfg, b_scale=1.0)
    plain = fam.forward_lora(fam.params, adapters, cfg)
    np.testing.assert_allclose(plain, fam.forward(lj.merge(fam.params, adapters, cfg)), atol=1e-5)
    d1 = fam.forward_lora(fam.params, adapters, cfg, lora_rng=jax.random.key(1))
    d1_again = fam.forward_lora(fam.params, adapters, cfg, lora_rng=jax.random.key(1))
    d2 = fam.forward_lora(fam.params, adapters, cfg, lora_rng=jax.random.key(2))
    np.testing.assert_array_equal(d1, d1_again)
    assert float(jnp.abs(d1 - plain).max()) > 1e-3 and float(jnp.abs(d1 - d2).max()) > 1e-3


def test_dropout_matches_inverted_dropout_formula():
    x = jnp.ones((4000, 8))
    ad = {"a": jnp.eye(8)[:, :2], "b": jnp.eye(2, 3)}
    rng = jax.random.key(0)
    out = lj.lora_delta(x, ad, 1.0, dropout=0.25, rng=rng)
    keep = jax.random.bernoulli(rng, 0.75, x.shape)
    np.testing.assert_allclose(out[:, :2], jnp.where(keep, 1 / 0.75, 0.0)[:, :2], rtol=1e-6)
    assert abs(float(out[:, 0].mean()) - 1.0) < 0.05


def test_bfloat16_base_with_float32_adapters():
    fam = family("llama")
    cfg = config_for(fam)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), fam.params)
    adapters = random_adapters(fam.params, cfg)
    out = fam.forward_lora(params16, adapters, cfg)
    ref = fam.forward(lj.merge(fam.params, adapters, cfg))
    assert bool(jnp.isfinite(out).all())
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.1


def test_adapter_for_missing_module_is_reported():
    fam = family("mlp")
    cfg = config_for(fam)
    _, adapters = lj.init_adapters(fam.params, cfg, key=jax.random.key(0))
    adapters["nowhere"] = adapters["up"]
    with pytest.raises(ValueError, match=r"adapters for \['nowhere'\] match no module targeted by the config"):
        fam.forward_lora(fam.params, adapters, cfg)


def test_adapter_of_a_module_that_is_never_called_is_reported():
    fam = family("mlp")
    params = {**fam.params, "unused": {"kernel": jnp.ones((12, 4))}}  # a kernel the forward pass never uses
    cfg = lj.LoraConfig(rank=2, targets=["up", "unused"])
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"adapters \['unused'\] were never applied"):
        fam.forward_lora(params, adapters, cfg)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "mlp"])
def test_all_linear_selects_what_peft_selects(name):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    fam = family(name)
    torch.manual_seed(0)
    torch_model = getattr(transformers, fam.torch_class)(fam.hf_config)
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=4, target_modules="all-linear"))
    prefix = "base_model.model."
    peft_paths = sorted(
        n[len(prefix) :].replace(".", "/")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    ours = sorted(lj.find_targets(fam.params, config_for(fam)))
    assert ours == peft_paths
    assert not any("embed" in p or "lm_head" in p for p in ours)


class _Linear(nn.Module):
    """A layer that is not nn.Dense, with its kernel stored (d_in, d_out)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(), (x.shape[-1], self.features))
        return x @ kernel


class _Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Linear(3, name="lin")(nn.Dense(4, name="fc")(x))


def test_kernel_layout_comes_from_the_config_and_is_checked_against_the_layer():
    """No registry of layer classes: a wrong transposed_kernels is caught from the layer's own shapes (non-square)
    or from nn.Dense's fixed (d_in, d_out) layout (any shape)."""
    model = _Pair()
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]

    def run(config):
        return lj.with_lora(model, config)({"params": params}, random_adapters(params, config), x)

    run(lj.LoraConfig(rank=1, targets=".*"))  # the right layout
    with pytest.raises(ValueError, match=r"'lin' \(_Linear\) does not store its kernel as \(d_out, d_in\).*remove it"):
        run(lj.LoraConfig(rank=1, targets=".*", transposed_kernels=["lin"]))
    with pytest.raises(ValueError, match=r"'fc' is a flax.linen.Dense, which stores its kernel as \(d_in, d_out\)"):
        run(lj.LoraConfig(rank=1, targets=".*", transposed_kernels=["fc"]))  # fc is square: 4 -> 4


def test_adapter_gradients_need_no_transposed_activations():
    """The adapters' backward pass works on (tokens, features) views: XLA:CPU transposed a (features, tokens)
    copy of the output's gradient for every adapter when the products kept the batch dims (the SmolLM2 step
    was 1.5x slower; ``benchmarks/speed.py --sections products``)."""
    fam = family("llama")
    cfg = config_for(fam)
    adapters = random_adapters(fam.params, cfg)
    tokens = int(np.prod(fam.inputs["input_ids"].shape))
    loss = lambda a: jnp.mean(fam.forward_lora(fam.params, a, cfg) ** 2)
    widths = {t.d_out for t in lj.find_targets(fam.params, cfg).values()}
    transposed = feature_token_copies(jax.grad(loss), adapters, tokens=tokens, widths=widths)
    assert widths and not transposed, transposed
