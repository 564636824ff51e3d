"""Spectral init speed: batched (stacked, one jit per shape group) vs one SVD dispatch per matrix,
and randomized vs exact top-r SVD on a large matrix. Prints ratios measured in this one run.

    python benchmarks/spectral_init_speed.py            # SmolLM2-135M shapes, all-linear, r = 8
    python benchmarks/spectral_init_speed.py --layers 8 --big 1024
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_one_jax as lj


def smollm2_shaped_grads(layers: int, seed: int = 0) -> dict[str, jax.Array]:
    """Random gradients with the shapes of SmolLM2-135M's linear layers (hidden 576, kv 192, mlp 1536)."""
    shapes = {
        "self_attn/q_proj": (576, 576),
        "self_attn/k_proj": (576, 192),
        "self_attn/v_proj": (576, 192),
        "self_attn/o_proj": (576, 576),
        "mlp/gate_proj": (576, 1536),
        "mlp/up_proj": (576, 1536),
        "mlp/down_proj": (1536, 576),
    }
    rng = np.random.default_rng(seed)
    return {
        f"model/layers/{i}/{name}": jnp.asarray(rng.normal(size=shape), jnp.float32)
        for i in range(layers)
        for name, shape in shapes.items()
    }


def per_matrix_init(grads, rank, gamma=128.0):
    """The naive baseline: one un-batched SVD dispatch per matrix, from Python."""
    out = {}
    for path, g in grads.items():
        u, s, vt = jnp.linalg.svd(-g, full_matrices=False)
        root = jnp.sqrt(s[:rank]) / jnp.sqrt(gamma * s[0])
        out[path] = {"a": u[:, :rank] * root, "b": root[:, None] * vt[:rank]}
    return out


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--big", type=int, default=1536, help="side of the square matrix for exact vs randomized")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    grads = smollm2_shaped_grads(args.layers)
    config = lj.LoraConfig(rank=args.rank)
    exact = lambda: lj.spectral_init(grads, config, svd="exact")
    naive = lambda: per_matrix_init(grads, args.rank)
    exact(), naive()  # compile both
    t_batched, t_naive = best_of(exact, args.repeats), best_of(naive, args.repeats)
    ref = naive()
    out = exact()
    worst = max(float(jnp.abs(out[p]["a"] @ out[p]["b"] - ref[p]["a"] @ ref[p]["b"]).max()) for p in grads)
    print(
        f"{len(grads)} matrices, rank {args.rank}: batched {t_batched:.2f}s, per-matrix {t_naive:.2f}s, "
        f"speed-up x{t_naive / t_batched:.2f} (max |A0B0 diff| {worst:.1e})"
    )

    rand = lambda: lj.spectral_init(grads, config, svd="randomized")
    rand()
    t_rand = best_of(rand, args.repeats)
    approx = rand()
    # Gaussian matrices have a flat spectrum (the hardest case for a range finder): compare the
    # Frobenius norm of A0 @ B0, i.e. how much of the top-r spectrum the sketch captured.
    captured = min(
        float(jnp.linalg.norm(approx[p]["a"] @ approx[p]["b"]) / jnp.linalg.norm(out[p]["a"] @ out[p]["b"]))
        for p in grads
    )
    print(
        f"{len(grads)} matrices, rank {args.rank}: randomized {t_rand:.2f}s, "
        f"speed-up over exact x{t_batched / t_rand:.1f}, "
        f"worst captured top-r norm {captured:.3f} of exact (flat random spectra)"
    )

    g = jax.random.normal(jax.random.key(0), (args.big, args.big))
    u = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (args.big, args.rank)))[0]
    g = g * 0.01 + u @ jnp.diag(jnp.linspace(10.0, 5.0, args.rank)) @ u.T  # spectral gap after r
    one = {"big": g}
    ex = lambda: lj.spectral_init(one, config, svd="exact")
    rnd = lambda: lj.spectral_init(one, config, svd="randomized")
    ex(), rnd()
    t_ex, t_rnd = best_of(ex, args.repeats), best_of(rnd, args.repeats)
    angle = float(lj.principal_angles(ex()["big"]["a"], rnd()["big"]["a"]).max())
    print(
        f"{args.big}x{args.big}, rank {args.rank}: exact {t_ex:.2f}s, randomized {t_rnd:.3f}s, "
        f"speed-up x{t_ex / t_rnd:.1f}, max principal angle {angle:.2e} deg"
    )


if __name__ == "__main__":
    main()
