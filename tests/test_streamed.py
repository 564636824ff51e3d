"""The streamed spectral init (one group's gradients per pass) against the one-pass init, on a tiny Llama."""

import jax
import numpy as np
import pytest

import lora_one_jax as lj
from lora_one_jax import gradient_stage, spectral
from lora_one_jax.data import pad_batch
from lora_one_jax.models import load_model
from lora_one_jax.sharding import make_mesh, shard_params

CONFIG = lj.LoraConfig(rank=2, alpha=4.0, targets=["q_proj", "v_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def toy():
    model, params, _ = load_model("toy-llama")
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(3, 250, size=k).tolist(), "prompt_len": k // 3} for k in rng.integers(6, 15, 6)]
    micro = [pad_batch(rows[i : i + 2], pad_id=0) for i in range(0, 6, 2)]
    return model, params, micro


@pytest.fixture(scope="module")
def one_pass(toy):
    model, params, micro = toy
    grads = lj.estimate_gradient(lj.full_loss_fn(model), params, micro, CONFIG, progress=False)
    return grads, {m: lj.spectral_init(grads, CONFIG, svd=m) for m in ("exact", "randomized")}


def recorded_passes(monkeypatch):
    """Every pass's gradients, as spectral_init_streamed computes them."""
    seen = []
    real = spectral.estimate_gradient

    def record(*args, **kwargs):
        grads = real(*args, **kwargs)
        seen.append(grads)
        return grads

    monkeypatch.setattr(spectral, "estimate_gradient", record)
    return seen


def assert_same_adapters(got, want, tol):
    assert sorted(got) == sorted(want)
    for path in want:
        a, b = np.asarray(got[path]["a"]), np.asarray(got[path]["b"])
        a_ref, b_ref = np.asarray(want[path]["a"]), np.asarray(want[path]["b"])
        signs = np.sign(np.sum(a * a_ref, axis=0))  # each singular pair up to its sign
        np.testing.assert_allclose(a * signs, a_ref, atol=tol * np.abs(a_ref).max(), err_msg=path)
        np.testing.assert_allclose(b * signs[:, None], b_ref, atol=tol * np.abs(b_ref).max(), err_msg=path)


def test_passes_follow_the_svd_groups(toy):
    _, params, _ = toy
    # three (shape, rank) groups: v (64x32) x 2, q (64x64) x 2, up and down (64x128, down taken transposed) x 4
    whole = lj.gradient_passes(params, CONFIG, kernels_per_pass=4)
    assert sorted(p for ps in whole for p in ps) == sorted(lj.find_targets(params, CONFIG))
    assert [len(ps) for ps in whole] == [4, 4]  # v and q packed whole into one pass, the MLP group in another
    assert all(len(ps) == 1 for ps in lj.gradient_passes(params, CONFIG, kernels_per_pass=1))
    # a byte budget of one 64x128 float32 kernel: q and v groups packed, the MLP group split into 4 passes
    passes = lj.gradient_passes(params, CONFIG, max_bytes=64 * 128 * 4)
    assert [len(ps) for ps in passes] == [2, 2, 1, 1, 1, 1]
    assert lj.gradient_passes(params, CONFIG) == [sum(passes, [])]  # by default one pass when memory allows
    with pytest.raises(ValueError, match="not both"):
        lj.gradient_passes(params, CONFIG, kernels_per_pass=2, max_bytes=10)
    with pytest.raises(ValueError, match="kernels_per_pass must be a positive integer"):
        lj.gradient_passes(params, CONFIG, kernels_per_pass=0)


@pytest.mark.parametrize("per_pass", [1, 3])
def test_streamed_equals_one_pass_exact_svd(toy, one_pass, monkeypatch, per_pass):
    model, params, micro = toy
    grads, adapters = one_pass
    seen = recorded_passes(monkeypatch)
    got = lj.spectral_init_streamed(
        lj.full_loss_fn(model), params, micro, CONFIG, kernels_per_pass=per_pass, svd="exact", progress=False
    )
    assert all(len(g) <= per_pass for g in seen) and len(seen) == len(
        lj.gradient_passes(params, CONFIG, kernels_per_pass=per_pass)
    )
    for g in seen:  # each pass's gradients are the one-pass gradients of its modules
        for path, x in g.items():
            np.testing.assert_allclose(
                np.asarray(x), np.asarray(grads[path]), rtol=1e-5, atol=1e-6 * np.abs(grads[path]).max()
            )
    assert_same_adapters(got, adapters["exact"], 1e-4)


def test_streamed_whole_groups_equal_one_pass_randomized(toy, one_pass):
    model, params, micro = toy
    _, adapters = one_pass
    key = jax.random.key(0)  # the one-pass init's default key
    got = lj.spectral_init_streamed(
        lj.full_loss_fn(model), params, micro, CONFIG, kernels_per_pass=2, svd="randomized", key=key, progress=False
    )
    assert_same_adapters(got, adapters["randomized"], 1e-4)


def test_streamed_sharded_gradients_follow_their_kernels(toy, one_pass, monkeypatch):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    model, params, micro = toy
    _, adapters = one_pass
    sharded = shard_params(params, make_mesh(2, 2, 2))
    seen = recorded_passes(monkeypatch)
    got = lj.spectral_init_streamed(
        lj.full_loss_fn(model), sharded, micro, CONFIG, kernels_per_pass=2, svd="exact", progress=False
    )
    for g in seen:
        for path, x in g.items():
            kernel = sharded
            for part in (path + "/kernel").split("/"):
                kernel = kernel[part]
            assert x.sharding.is_equivalent_to(kernel.sharding, 2), f"{path}: gradient not sharded like its kernel"
    assert_same_adapters(got, adapters["exact"], 1e-3)


def test_modules_must_be_targets(toy):
    model, params, micro = toy
    with pytest.raises(ValueError, match=r"not among the config's targeted modules"):
        lj.estimate_gradient(lj.full_loss_fn(model), params, micro, CONFIG, modules=["lm_head"], progress=False)
    with pytest.raises(TypeError, match="list of module paths"):
        lj.estimate_gradient(lj.full_loss_fn(model), params, micro, CONFIG, modules="q_proj", progress=False)


# ----------------------------------------------------------------------------- gradient_factors: the trainer's stage


def recorded_gradients(monkeypatch):
    """The modules and micro-batch count of every estimate_gradient call gradient_factors makes."""
    calls = []
    real = gradient_stage.estimate_gradient

    def record(loss_fn, params, batches, **kwargs):
        calls.append((list(kwargs["modules"]), len(batches)))
        return real(loss_fn, params, batches, **kwargs)

    monkeypatch.setattr(gradient_stage, "estimate_gradient", record)
    return calls


def assert_same_subspaces(got, want, tol_degrees):
    assert list(got) == list(want)
    for path in want:
        for side in ("left", "right"):
            angles = lj.principal_angles(got[path][side], want[path][side])
            assert angles.max() < tol_degrees, (path, side, angles)


def test_factors_from_halves_equal_the_one_pass_stage(toy, one_pass, monkeypatch):
    """With the stability, G is the weighted mean of the halves' gradients (3 micro-batches: 1 + 1 + the odd one
    out): one pass over the data instead of three, and the same inits, subspaces and stability."""
    model, params, micro = toy
    grads, _ = one_pass
    loss = lj.full_loss_fn(model)
    calls = recorded_gradients(monkeypatch)
    out = lj.gradient_factors(
        loss,
        params,
        micro,
        CONFIG,
        inits=("lora-one", "lora-ga"),
        subspaces=True,
        stability=True,
        svd="exact",
        kernels_per_pass=100,
        progress=False,
    )
    assert len(out.passes) == 1 and sorted(out.passes[0]) == sorted(grads)
    assert [n for _, n in calls] == [1, 1, 1]  # the two halves and the odd one out, each micro-batch once
    key = jax.random.key(0)
    assert_same_adapters(out.unit["lora-one"], lj.unit_spectral_init(grads, CONFIG, svd="exact", key=key), 1e-4)
    assert_same_adapters(out.unit["lora-ga"], lj.lora_ga_init(grads, CONFIG, gamma=1.0, svd="exact"), 1e-4)
    assert out.unit["lora-one"][sorted(grads)[0]]["a"].dtype == np.float32
    assert_same_subspaces(out.subspaces, lj.gradient_subspaces(grads, CONFIG, svd="exact"), 1e-2)
    halves = [lj.estimate_gradient(loss, params, [m], CONFIG, progress=False) for m in micro[:2]]
    want = lj.gradient_stability(*halves, CONFIG, svd="exact")
    assert sorted(out.stability) == sorted(want)
    np.testing.assert_allclose([out.stability[k] for k in want], list(want.values()), atol=1e-2)


@pytest.mark.parametrize("stream", [{"kernels_per_pass": 1}, {"max_bytes": 2 * 64 * 128 * 4}])
def test_streamed_factors_equal_one_pass(toy, monkeypatch, stream):
    model, params, micro = toy
    loss = lj.full_loss_fn(model)
    options = dict(inits=("lora-one", "lora-ga"), subspaces=True, stability=True, svd="exact", progress=False)
    whole = lj.gradient_factors(loss, params, micro, CONFIG, kernels_per_pass=100, **options)
    calls = recorded_gradients(monkeypatch)
    got = lj.gradient_factors(loss, params, micro, CONFIG, **stream, **options)
    # max_bytes with the stability: a group's running mean and one half's gradients: one MLP kernel per pass
    assert [len(p) for p in got.passes] == ([1] * 8 if "kernels_per_pass" in stream else [2, 2, 1, 1, 1, 1])
    assert len(calls) == 3 * len(got.passes) and all(modules in got.passes for modules, _ in calls)
    for init in whole.unit:
        assert_same_adapters(got.unit[init], whole.unit[init], 1e-4)
    assert_same_subspaces(got.subspaces, whole.subspaces, 1e-2)
    np.testing.assert_allclose([got.stability[k] for k in whole.stability], list(whole.stability.values()), atol=1e-2)


def test_factors_refuse_what_cannot_be_built(toy):
    model, params, micro = toy
    loss = lj.full_loss_fn(model)
    with pytest.raises(ValueError, match=r"inits \['pissa'\] do not start from the gradient"):
        lj.gradient_factors(loss, params, micro, CONFIG, inits=("pissa",), progress=False)
    big = lj.LoraConfig(rank=20, targets=["v_proj"])  # v_proj is 64 x 32: no room for LoRA-GA's 2 x 20 triplets
    with pytest.raises(ValueError, match=r"too small for 2 \* rank = 40"):
        lj.gradient_factors(loss, params, micro, big, inits=("lora-ga",), progress=False)
