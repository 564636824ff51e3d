"""``init.gamma: auto``: the spectral init's step chosen from data, against a closed form and the real loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_one_jax as lj
from lora_one_jax.data import pad_batch
from lora_one_jax.models import load_model
from lora_one_jax.step_size import DEFAULT_GAMMAS, choose_gamma, rescale, unit_spectral_init

D_IN, D_OUT, RANK = 6, 5, 2
CFG = lj.LoraConfig(rank=RANK, alpha=4.0)  # scale 2


def _whitened(n: int, seed: int) -> np.ndarray:
    """n x D_IN inputs with x^T x / n = I exactly."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, D_IN)))
    return np.sqrt(n) * q


def _linear_problem(gamma_star: float):
    """Linear regression y = x (W + Delta) with a rank-r Delta whose spectral step is optimal at ``gamma_star``.

    With whitened inputs the gradient at W is G = -Delta, the init adds scale * Delta / (gamma s1), and the
    scoring loss is 0.5 ||Delta||_F^2 (1 - gamma_star / gamma)^2 with gamma_star = scale / s1.
    """
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(D_IN, RANK)))
    v, _ = np.linalg.qr(rng.normal(size=(D_OUT, RANK)))
    s1 = CFG.scale_for("w") / gamma_star
    delta = (u * np.array([s1, 0.4 * s1])) @ v.T
    w = 0.01 * rng.normal(size=(D_IN, D_OUT))  # small: float32 residuals of tiny steps stay exact

    def loss(params, adapters, batch):
        x, y = batch
        kernel = params + CFG.scale_for("w") * adapters["w"]["a"] @ adapters["w"]["b"]
        return 0.5 * jnp.mean(jnp.sum((x @ kernel - y) ** 2, axis=1))

    def batch(n, seed):
        x = _whitened(n, seed)
        return jnp.asarray(x, jnp.float32), jnp.asarray(x @ (w + delta), jnp.float32)

    grad_batch = batch(8, 10)
    full = lambda p, b: loss(p, {"w": {"a": jnp.zeros((D_IN, RANK)), "b": jnp.zeros((RANK, D_OUT))}}, b)
    grads = {"w": jax.grad(full)(jnp.asarray(w, jnp.float32), grad_batch)}
    np.testing.assert_allclose(grads["w"], -delta, atol=1e-5)  # the whitened design: G = -Delta
    expected = lambda g: 0.5 * np.sum(delta**2) * (1 - gamma_star / g) ** 2
    return loss, jnp.asarray(w, jnp.float32), grads, [batch(6, 20), batch(6, 21)], expected


@pytest.mark.parametrize(("gamma_star", "best"), [(100.0, 128.0), (300.0, 256.0), (5.0, 16.0), (1e4, 2048.0)])
def test_choose_gamma_finds_the_closed_form_optimum(gamma_star, best):
    loss, w, grads, batches, expected = _linear_problem(gamma_star)
    out = choose_gamma(loss, w, grads, CFG, batches)
    assert out.gamma == best
    assert sorted(out.losses) == list(DEFAULT_GAMMAS)
    for g, value in out.losses.items():
        assert value == pytest.approx(expected(g), rel=1e-4, abs=1e-7)
    # the loss is quadratic in 1/gamma: the best candidate is the one nearest 1/gamma_star
    assert best == min(DEFAULT_GAMMAS, key=lambda g: abs(1 / g - 1 / gamma_star))
    assert out.forward_passes == len(DEFAULT_GAMMAS) * len(batches)


@pytest.mark.parametrize("gamma_star", [5.0, 40.0, 100.0, 300.0, 700.0, 1e4])
def test_golden_search_finds_the_same_gamma_with_fewer_passes(gamma_star):
    loss, w, grads, batches, _ = _linear_problem(gamma_star)
    grid = choose_gamma(loss, w, grads, CFG, batches)
    golden = choose_gamma(loss, w, grads, CFG, batches, search="golden")
    assert golden.gamma == grid.gamma
    assert 3 <= len(golden.losses) <= 5 and golden.forward_passes == len(golden.losses) * len(batches)
    for g, value in golden.losses.items():
        assert value == pytest.approx(grid.losses[g], rel=1e-6)


def test_rescaled_unit_factors_are_the_spectral_init_at_gamma():
    _, _, grads, _, _ = _linear_problem(100.0)
    unit = unit_spectral_init(grads, CFG)
    for gamma in (16.0, 128.0, 2048.0):
        ref = lj.spectral_init(grads, CFG, gamma=gamma)
        got = rescale(unit, gamma)
        for part in ("a", "b"):
            np.testing.assert_allclose(got["w"][part], ref["w"][part], rtol=1e-5, atol=1e-7)


def test_choose_gamma_errors_name_the_problem():
    loss, w, grads, batches, _ = _linear_problem(100.0)
    with pytest.raises(ValueError, match="finite number > 0"):
        choose_gamma(loss, w, grads, CFG, batches, gammas=(16.0, 0.0))
    with pytest.raises(ValueError, match="search"):
        choose_gamma(loss, w, grads, CFG, batches, search="newton")
    with pytest.raises(ValueError, match="scoring batch"):
        choose_gamma(loss, w, grads, CFG, [])
    nan_batch = (batches[0][0], batches[0][1].at[0, 0].set(jnp.nan))
    with pytest.raises(FloatingPointError, match="NaN"):
        choose_gamma(loss, w, grads, CFG, [nan_batch])


def test_choose_gamma_on_a_language_model_is_one_compile_and_matches_the_loss():
    model, params, _ = load_model("toy-llama")
    cfg = lj.LoraConfig(rank=2, targets=["q_proj", "v_proj"])
    rng = np.random.default_rng(0)
    rows = lambda n: [{"input_ids": rng.integers(3, 60, 12).tolist(), "prompt_len": 4} for _ in range(n)]
    grad_batches = [pad_batch(rows(1), pad_id=0) for _ in range(4)]
    grads = lj.estimate_gradient(lj.full_loss_fn(model), params, grad_batches, cfg, progress=False)
    scoring = [pad_batch(rows(4), pad_id=0) for _ in range(2)]  # other examples, one shape
    lora_loss = lj.lora_loss_fn(model, cfg)
    traces = []

    def counting_loss(p, adapters, batch):
        traces.append(1)  # runs only while tracing
        return lora_loss(p, adapters, batch)

    gammas = (16.0, 128.0, 1024.0)
    out = choose_gamma(counting_loss, params, grads, cfg, scoring, gammas=gammas, key=jax.random.key(0))
    assert len(traces) == 1  # one compiled loss for every candidate and batch
    assert out.forward_passes == len(out.pass_seconds) == 6
    again = choose_gamma(counting_loss, params, grads, cfg, scoring, gammas=(64.0,), key=jax.random.key(0))
    assert len(traces) == 1 and again.forward_passes == 2  # a later call with the same loss_fn: no new compile
    # the first pass of the first call paid the compilation; the cached one's first pass did not
    assert out.compile_seconds > 0.5 * out.pass_seconds[0] and again.compile_seconds < 0.2 * out.compile_seconds
    for gamma in gammas:
        adapters = lj.spectral_init(grads, cfg, gamma=gamma, key=jax.random.key(0))
        direct = np.mean([float(lora_loss(params, adapters, b)) for b in scoring])
        assert out.losses[gamma] == pytest.approx(direct, rel=1e-5)
    base = np.mean([float(lj.full_loss_fn(model)(params, b)) for b in scoring])
    assert abs(out.losses[1024.0] - base) < abs(out.losses[16.0] - base)  # a larger gamma, a smaller step
