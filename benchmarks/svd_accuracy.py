"""Randomized top-r SVD at the shapes of 1B-8B Llama models, on flat spectra: accuracy and time against exact.

    python benchmarks/svd_accuracy.py                  # 8 shapes x 2 spectra, rank 8 (~30 min on 2 CPU cores)
    python benchmarks/svd_accuracy.py --quick          # 3 smaller shapes
    python benchmarks/svd_accuracy.py --shapes 1B,8B   # only the shapes whose names contain these

Each matrix is ``U diag(s) V^T`` with random orthonormal U, V and a chosen spectrum: ``flat`` (s_i = i^-0.25,
the hard case: s_9 / s_8 = 0.97) and ``gradient-like`` (s_i = i^-1). Reported: the largest principal angle
between our randomized top-r subspaces (left and right) and the exact ones, the subspace angle of the
official recipe's ``torch.svd_lowrank(q=512, niter=16)`` when torch is installed, and the times. The exact
SVD is float64 LAPACK on the host (numpy), the reference; ours runs on JAX's default device.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lora_one_jax.svd import principal_angles, top_svd

SHAPES = {  # (d_in, d_out) of the linear layers of Llama-3.2-1B, Llama-3.2-3B, Llama-2-7B and Llama-3-8B
    "1B attn (2048, 2048)": (2048, 2048),
    "1B mlp (2048, 8192)": (2048, 8192),
    "3B attn (3072, 3072)": (3072, 3072),
    "3B mlp (8192, 3072)": (8192, 3072),
    "7B attn (4096, 4096)": (4096, 4096),
    "7B mlp (4096, 11008)": (4096, 11008),
    "8B kv (4096, 1024)": (4096, 1024),
    "8B mlp (14336, 4096)": (14336, 4096),
}
QUICK = {"(1100, 1100)": (1100, 1100), "(1024, 2816)": (1024, 2816), "(2048, 512)": (2048, 512)}


def orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)).astype(np.float32))
    return q


def matrix(rng, shape, spectrum):
    m, n = shape
    k = min(m, n)
    s = np.arange(1, k + 1, dtype=np.float64) ** (-0.25 if spectrum == "flat" else -1.0)
    u, v = orthonormal(rng, m, k), orthonormal(rng, n, k)
    return ((u * s.astype(np.float32)) @ v.T).astype(np.float32), u, v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--shapes", default="", help="comma-separated names (or parts of them) to run, e.g. '7B,8B kv'")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    if args.no_torch:
        torch = None
    r = args.rank
    print(f"JAX {jax.__version__} on {jax.devices()}; rank {r}")
    print(
        "\n| matrix | spectrum | ours: worst angle | ours: time | exact (f64 LAPACK): time | "
        "svd_lowrank q=512: worst angle | its time |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    rng = np.random.default_rng(0)
    worst = 0.0
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        wanted = [w.strip() for w in args.shapes.split(",")]
        shapes = {name: shape for name, shape in shapes.items() if any(w in name for w in wanted)}
        if not shapes:
            raise SystemExit(f"--shapes {args.shapes!r} matched none of {list(SHAPES)}")
    for name, shape in shapes.items():
        exact_s = None  # the exact SVD's time does not depend on the spectrum: measured once per shape
        for spectrum in ("flat", "gradient-like"):
            x, u_true, v_true = matrix(rng, shape, spectrum)
            xj = jnp.asarray(x)
            jax.block_until_ready(top_svd(xj, r, method="randomized"))  # compile
            start = time.perf_counter()
            u, _, v = jax.block_until_ready(top_svd(xj, r, method="randomized"))
            ours_s = time.perf_counter() - start
            angle = max(
                principal_angles(np.asarray(u), u_true[:, :r]).max(),
                principal_angles(np.asarray(v), v_true[:, :r]).max(),
            )
            worst = max(worst, angle)
            if exact_s is None:
                start = time.perf_counter()
                np.linalg.svd(x.astype(np.float64), full_matrices=False)
                exact_s = time.perf_counter() - start
            theirs = "-", "-"
            if torch is not None:
                t = torch.as_tensor(x)
                start = time.perf_counter()
                tu, _, tv = torch.svd_lowrank(t, q=min(512, *shape), niter=16)
                t_s = time.perf_counter() - start
                t_angle = max(
                    principal_angles(tu[:, :r].numpy(), u_true[:, :r]).max(),
                    principal_angles(tv[:, :r].numpy(), v_true[:, :r]).max(),
                )
                theirs = f"{t_angle:.4f} deg", f"{t_s:.2f} s"
            print(
                f"| {name} | {spectrum} | {angle:.4f} deg | {ours_s:.2f} s | {exact_s:.2f} s | {theirs[0]} | "
                f"{theirs[1]} |",
                flush=True,
            )
    print(f"\nworst angle of ours over every matrix: {worst:.4f} degrees (target: < 1)")


if __name__ == "__main__":
    main()
