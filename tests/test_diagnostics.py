"""Diagnostics logged with every evaluation: adapter/gradient subspace angles and the gradient's stability,
against numpy SVDs and scipy's subspace angles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import subspace_angles as scipy_angles

import lora_one_jax as lj
from lora_one_jax.diagnostics import (
    adapter_angles,
    alignment_summary,
    gradient_stability,
    gradient_subspaces,
    gram_principal_angles,
    summarize_angles,
)


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layer0/q": jnp.asarray(rng.normal(size=(24, 16)), jnp.float32),
        "layer1/q": jnp.asarray(rng.normal(size=(24, 16)), jnp.float32),
        "layer0/up": jnp.asarray(rng.normal(size=(16, 40)), jnp.float32),
    }


CFG = lj.LoraConfig(rank=3, rank_pattern={"up": 2})


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_gradient_subspaces_match_numpy_svd(svd):
    grads = _grads()
    sub = gradient_subspaces(grads, CFG, svd=svd)
    assert list(sub) == list(grads)
    for path, g in grads.items():
        r = CFG.rank_for(path)
        u, _, vt = np.linalg.svd(np.asarray(g, np.float64))
        assert sub[path]["left"].shape == (g.shape[0], r) and sub[path]["right"].shape == (g.shape[1], r)
        np.testing.assert_allclose(sub[path]["left"].T @ sub[path]["left"], np.eye(r), atol=1e-5)
        assert np.degrees(scipy_angles(sub[path]["left"], u[:, :r])).max() < 0.1
        assert np.degrees(scipy_angles(sub[path]["right"], vt[:r].T)).max() < 0.1


def test_adapter_angles_known_rotation():
    g = {"m": jnp.diag(jnp.array([5.0, 4.0, 3.0, 0.1, 0.05]))}  # top-2 subspaces: span(e1, e2) on both sides
    sub = gradient_subspaces(g, lj.LoraConfig(rank=2), svd="exact")
    theta = np.radians(25.0)
    e = np.eye(5)
    a = np.stack([e[0], np.cos(theta) * e[1] + np.sin(theta) * e[3]], axis=1)  # rotated 25 deg out of the subspace
    b = np.stack([3.0 * e[1], e[0] + e[1]])  # row space span(e1, e2), not orthonormal
    angles = adapter_angles({"m": {"a": jnp.asarray(a), "b": jnp.asarray(b)}}, sub)["m"]
    np.testing.assert_allclose(angles["left"], [0.0, 25.0], atol=1e-6)
    np.testing.assert_allclose(angles["right"], [0.0, 0.0], atol=1e-6)


def test_alignment_summary_spectral_vs_lora_init_and_against_scipy():
    grads = _grads()
    sub = gradient_subspaces(grads, CFG, svd="exact")
    one = alignment_summary(lj.spectral_init(grads, CFG, svd="exact"), sub)
    assert one["align/left_max"] < 0.05 and one["align/right_max"] < 0.05
    targets = {p: lj.Target(g.shape[0], g.shape[1], CFG.rank_for(p), 1.0, False) for p, g in grads.items()}
    lora = lj.lora_init(targets, jnp.float32, key=jax.random.key(0))
    out = alignment_summary(lora, sub, prefix="x/")
    assert out["x/right_mean"] == out["x/right_max"] == 90.0  # B = 0 has no row space
    reference = {p: np.degrees(scipy_angles(np.asarray(lora[p]["a"], np.float64), sub[p]["left"])) for p in grads}
    assert out["x/left_mean"] == pytest.approx(np.mean([r.mean() for r in reference.values()]), abs=1e-6)
    assert out["x/left_max_mean"] == pytest.approx(np.mean([r.max() for r in reference.values()]), abs=1e-6)
    assert out["x/left_max"] == pytest.approx(max(r.max() for r in reference.values()), abs=1e-6)
    assert out["x/left_mean"] > 30.0  # random directions in 24 or 16 dimensions are far from a 3-dim subspace


def test_summarize_angles_is_flat_floats():
    out = summarize_angles({"m": {"left": np.array([1.0, 3.0]), "right": np.array([2.0, 2.0])}})
    assert out == {"left_mean": 2.0, "left_max_mean": 3.0, "left_max": 3.0, "right_mean": 2.0,
                   "right_max_mean": 2.0, "right_max": 2.0}  # fmt: skip
    assert all(type(v) is float for v in out.values())
    with pytest.raises(ValueError, match="at least one"):
        summarize_angles({})


def test_gradient_stability_small_for_noisy_copies_large_for_unrelated():
    g = _grads(0)
    rng = np.random.default_rng(5)
    # a strong rank-3 signal shared by both estimates, plus independent noise
    signal = {
        p: 20.0 * jnp.asarray(rng.normal(size=(x.shape[0], 3)) @ rng.normal(size=(3, x.shape[1]))) for p, x in g.items()
    }
    g1 = {p: signal[p] + 0.1 * g[p] for p in g}
    g2 = {p: signal[p] + 0.1 * _grads(1)[p] for p in g}
    cfg = lj.LoraConfig(rank=2)
    stable = gradient_stability(g1, g2, cfg, svd="exact")
    unrelated = gradient_stability(_grads(0), _grads(1), cfg, svd="exact")
    assert stable["grad_stability/left_max"] < 5.0 and unrelated["grad_stability/left_mean"] > 30.0
    s1, s2 = gradient_subspaces(g1, cfg, svd="exact"), gradient_subspaces(g2, cfg, svd="exact")
    ref = [np.degrees(scipy_angles(s1[p]["right"], s2[p]["right"])).mean() for p in g]
    assert stable["grad_stability/right_mean"] == pytest.approx(np.mean(ref), abs=1e-6)
    with pytest.raises(ValueError, match="different modules"):
        gradient_stability(g1, {"other": g1["layer0/q"]}, cfg)


def test_nan_inputs_are_errors():
    g = _grads()
    with pytest.raises(ValueError, match="NaN"):
        gradient_subspaces({**g, "layer0/q": g["layer0/q"].at[0, 0].set(jnp.nan)}, CFG)
    sub = gradient_subspaces(g, CFG, svd="exact")
    ad = lj.spectral_init(g, CFG, svd="exact")
    ad["layer0/up"] = {"a": ad["layer0/up"]["a"].at[0, 0].set(jnp.inf), "b": ad["layer0/up"]["b"]}
    with pytest.raises(ValueError, match="layer0/up"):
        alignment_summary(ad, sub)
    with pytest.raises(ValueError, match="no gradient subspaces"):
        alignment_summary({"elsewhere": ad["layer0/q"]}, sub)


@pytest.mark.parametrize(("m", "k", "r"), [(40, 3, 3), (40, 5, 3), (40, 2, 4), (300, 8, 8)])
def test_gram_principal_angles_matches_principal_angles(m, k, r):
    rng = np.random.default_rng(m + k + r)
    basis = np.linalg.qr(rng.normal(size=(m, r)))[0]
    x = rng.normal(size=(m, k)) @ np.diag(np.geomspace(1.0, 1e-3, k))  # unevenly scaled columns
    np.testing.assert_allclose(gram_principal_angles(x, basis), lj.principal_angles(x, basis), atol=1e-6)
    np.testing.assert_allclose(gram_principal_angles(basis, x), lj.principal_angles(basis, x), atol=1e-6)
    # a subspace tilted by tiny known angles: accurate to ~1e-4 degrees
    tilt = np.radians([1e-2, 0.5, 3.0])[: min(r, 3)]
    z = rng.normal(size=(m, tilt.size))
    outside = np.linalg.qr(z - basis @ (basis.T @ z))[0]  # orthonormal, orthogonal to the basis
    y = (basis[:, : tilt.size] * np.cos(tilt) + outside * np.sin(tilt)) @ rng.normal(size=(tilt.size, tilt.size))
    np.testing.assert_allclose(gram_principal_angles(y, basis)[: tilt.size], np.degrees(tilt), atol=1e-6)


def test_gram_principal_angles_rank_deficient_counts_90():
    basis = np.eye(6)[:, :2]
    x = np.zeros((6, 2))
    assert gram_principal_angles(x, basis).tolist() == [90.0, 90.0]
    x[:, 0] = np.eye(6)[0]  # one direction, inside
    np.testing.assert_allclose(gram_principal_angles(x, basis), [0.0, 90.0], atol=1e-7)
    with pytest.raises(ValueError, match="matrices"):
        gram_principal_angles(np.ones(6), basis)
