"""Spectral init, the SVD helpers and the alignment diagnostic, against independent numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_one_jax as lj
from lora_one_jax import spectral
from lora_one_jax import svd as svd_mod

GAMMA = 128.0


def ref_lora_one(g: np.ndarray, r: int, gamma: float):
    """LoRA-One init from DESIGN.md, written directly in float64 numpy."""
    p, s, qt = np.linalg.svd(-np.asarray(g, np.float64), full_matrices=False)
    c = np.sqrt(gamma * s[0])
    return p[:, :r] * np.sqrt(s[:r]) / c, np.sqrt(s[:r])[:, None] * qt[:r] / c, s


def gapped(rng, m, n, top, tail=0.05):
    """A matrix with singular values ``top`` followed by a tail of size ``tail`` (a clear gap)."""
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    s = np.concatenate([top, tail * rng.uniform(0.5, 1.0, k - len(top))])
    return (u[:, :k] * s) @ v[:, :k].T


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_spectral_init_matches_numpy(method):
    rng = np.random.default_rng(0)
    grads = {
        "l0/q": gapped(rng, 40, 24, [5.0, 4.0, 3.0]).astype(np.float32),
        "l1/q": gapped(rng, 40, 24, [2.0, 1.5, 1.0]).astype(np.float32),
        "l0/up": gapped(rng, 24, 56, [3.0, 2.0, 1.0, 0.5, 0.4]).astype(np.float32),
    }
    cfg = lj.LoraConfig(rank=3, rank_pattern={"up": 5})
    ad = lj.spectral_init({k: jnp.asarray(v) for k, v in grads.items()}, cfg, gamma=GAMMA, svd=method)
    assert list(ad) == list(grads)
    for path, g in grads.items():
        r = cfg.rank_for(path)
        a_ref, b_ref, s = ref_lora_one(g, r, GAMMA)
        a, b = np.asarray(ad[path]["a"], np.float64), np.asarray(ad[path]["b"], np.float64)
        assert a.shape == (g.shape[0], r) and b.shape == (r, g.shape[1])
        assert ad[path]["a"].dtype == jnp.float32
        np.testing.assert_allclose(a @ b, a_ref @ b_ref, atol=1e-6, rtol=1e-4)
        gram = np.diag(s[:r]) / (GAMMA * s[0])
        np.testing.assert_allclose(a.T @ a, gram, atol=1e-7)
        np.testing.assert_allclose(b @ b.T, gram, atol=1e-7)
        # the factors themselves, up to the sign of each singular pair
        signs = np.sign(np.sum(a * a_ref, axis=0))
        np.testing.assert_allclose(a * signs, a_ref, atol=1e-5)
        np.testing.assert_allclose(b * signs[:, None], b_ref, atol=1e-5)


def test_spectral_init_dtype_and_gamma():
    g = {"fc": jax.random.normal(jax.random.key(0), (16, 8))}
    ad = lj.spectral_init(g, lj.LoraConfig(rank=2, dtype="bfloat16"), gamma=4.0)
    assert ad["fc"]["a"].dtype == jnp.bfloat16 and ad["fc"]["b"].dtype == jnp.bfloat16
    a_ref, b_ref, _ = ref_lora_one(np.asarray(g["fc"]), 2, 4.0)
    np.testing.assert_allclose(
        np.asarray(ad["fc"]["a"] @ ad["fc"]["b"], np.float32), a_ref @ b_ref, atol=2e-2 * np.abs(a_ref @ b_ref).max()
    )
    with pytest.raises(ValueError, match="gamma"):
        lj.spectral_init(g, lj.LoraConfig(rank=2), gamma=0.0)


def test_one_compile_per_group(monkeypatch, compiles):
    shapes = []
    real = spectral.top_svd
    monkeypatch.setattr(spectral, "top_svd", lambda x, *a, **kw: shapes.append(x.shape) or real(x, *a, **kw))
    grads = {
        f"layers/{i}/{name}": jnp.ones(shape) * jnp.arange(shape[1]) + i
        for i in range(4)
        for name, shape in (("q", (8, 8)), ("up", (8, 16)), ("down", (16, 8)))
    }
    key = jax.random.key(0)
    with compiles as c:
        ad = lj.spectral_init(grads, lj.LoraConfig(rank=1), key=key)
    assert sorted(shapes) == [(4, 8, 8), (8, 8, 16)]  # down (16, 8) is stacked transposed with up (8, 16)
    assert list(ad) == list(grads)
    assert c.count == 6, "per group of equal shapes: one program each to stack, to SVD and to build the factors"
    for path in ("layers/2/down", "layers/1/up"):
        a_ref, b_ref, _ = ref_lora_one(np.asarray(grads[path]), 1, 128.0)
        np.testing.assert_allclose(ad[path]["a"] @ ad[path]["b"], a_ref @ b_ref, rtol=1e-4, atol=1e-7)
    other = {k: v + 1.0 for k, v in grads.items()}
    with compiles as c:
        lj.spectral_init(other, lj.LoraConfig(rank=1), key=key)
    assert c.count == 0, "same shapes: no new compile"


def test_errors_name_the_module(monkeypatch):
    cfg = lj.LoraConfig(rank=2)
    good = jax.random.normal(jax.random.key(0), (6, 5))
    with pytest.raises(ValueError, match=r"'dead/proj'.*all zero"):
        lj.spectral_init({"ok": good, "dead/proj": jnp.zeros((6, 5))}, cfg)
    with pytest.raises(ValueError, match=r"'bad'.*NaN"):
        lj.spectral_init({"bad": good.at[0, 0].set(jnp.nan)}, cfg)
    with pytest.raises(ValueError, match=r"'tiny'.*too small"):
        lj.spectral_init({"tiny": jnp.ones((6, 1))}, cfg)
    with pytest.raises(ValueError, match="2-D"):
        lj.spectral_init({"v": jnp.ones(6)}, cfg)
    with pytest.raises(ValueError, match="unknown svd method"):
        lj.spectral_init({"ok": good}, cfg, svd="fast")
    # an SVD that returns garbage is reported, not passed on (a fresh shape forces a new trace)
    monkeypatch.setattr(
        spectral, "top_svd", lambda x, r, **kw: tuple(jnp.full_like(t, jnp.nan) for t in lj.top_svd(x, r))
    )
    with pytest.raises(ValueError, match=r"SVD of the gradient of module 'odd' returned NaN"):
        lj.spectral_init({"odd": jax.random.normal(jax.random.key(1), (7, 3))}, cfg)


def test_randomized_svd_agrees_with_exact():
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.stack([gapped(rng, 120, 80, [9.0, 7.0, 5.0, 3.0, 2.0, 1.0]) for _ in range(2)]), jnp.float32)
    ue, se, ve = lj.top_svd(x, 6, method="exact")
    ur, sr, vr = lj.top_svd(x, 6, method="randomized", key=jax.random.key(3))
    np.testing.assert_allclose(sr, se, rtol=1e-5)
    for i in range(2):
        assert lj.principal_angles(ur[i], ue[i]).max() < 0.05  # degrees
        assert lj.principal_angles(vr[i], ve[i]).max() < 0.05
    s_np = np.linalg.svd(np.asarray(x[0], np.float64), compute_uv=False)[:6]
    np.testing.assert_allclose(se[0], s_np, rtol=1e-5)


def test_auto_method_threshold():
    assert svd_mod.resolve_svd_method("auto", (64, 40), 8) == "exact"  # sketch of 8 + 16 > 40 / 2
    assert svd_mod.resolve_svd_method("auto", (576, 192), 8) == "randomized"
    assert svd_mod.resolve_svd_method("auto", (2048, 4096), 16) == "randomized"
    assert svd_mod.resolve_svd_method("randomized", (20, 20), 16) == "exact"  # sketch not smaller
    with pytest.raises(ValueError, match="unknown svd method"):
        svd_mod.resolve_svd_method("qr", (4, 4), 1)


def test_best_rank():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 7))
    u, s, vt = np.linalg.svd(x)
    np.testing.assert_allclose(lj.best_rank(jnp.asarray(x, jnp.float32), 3), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)


def test_principal_angles_against_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((20, 4)), rng.standard_normal((20, 4))
    y_close = x + 1e-6 * rng.standard_normal((20, 4))
    np.testing.assert_allclose(
        lj.principal_angles(x, y), np.sort(np.degrees(scipy_linalg.subspace_angles(x, y))), atol=1e-8
    )
    np.testing.assert_allclose(
        lj.principal_angles(x, y_close), np.sort(np.degrees(scipy_linalg.subspace_angles(x, y_close))), atol=1e-8
    )
    assert lj.principal_angles(x, y_close).max() < 1e-3
    # a rank-deficient factor counts as 90 degrees in the missing directions
    assert lj.principal_angles(np.zeros((20, 2)), x[:, :2]).tolist() == [90.0, 90.0]


def test_alignment_spectral_vs_random():
    rng = np.random.default_rng(4)
    g = {"m": jnp.asarray(gapped(rng, 32, 24, [4.0, 3.0, 2.0]), jnp.float32)}
    cfg = lj.LoraConfig(rank=3)
    params = {"m": {"kernel": jnp.zeros((32, 24))}}
    _, ad_one = lj.init_adapters(params, cfg, key=jax.random.key(0), method="lora-one", grads=g)
    _, ad_lora = lj.init_adapters(params, cfg, key=jax.random.key(0))
    one, lora = lj.alignment(ad_one, g)["m"], lj.alignment(ad_lora, g)["m"]
    assert one["left"] < 0.01 and one["right"] < 0.01
    assert lora["left"] > 30 and lora["right"] == 90.0  # B = 0 has no row space
    angles = lj.subspace_angles(ad_one["m"], g["m"])
    assert angles["left"].shape == (3,) and angles["right"].shape == (3,)
    with pytest.raises(ValueError, match="lack the modules"):
        lj.alignment(ad_one, {})


def test_randomized_svd_is_accurate_on_a_flat_spectrum():
    """The issue's hard case: 1100 x 1100 with s_i = i^-0.25 (s_9 / s_8 = 0.97). The old default (r + 10
    columns, 4 power iterations) was 14.7 degrees off; the top-8 subspace must now be within 1 degree."""
    rng = np.random.default_rng(0)
    n, r = 1100, 8
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    x = jnp.asarray((u * np.arange(1, n + 1) ** -0.25) @ v.T, jnp.float32)
    assert svd_mod.resolve_svd_method("auto", x.shape, r) == "randomized"
    ur, _, vr = lj.top_svd(x, r, method="auto")
    assert lj.principal_angles(ur, u[:, :r]).max() < 1.0
    assert lj.principal_angles(vr, v[:, :r]).max() < 1.0
