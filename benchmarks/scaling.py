"""Scaling: the gradient estimate and the SVD phase against the number of devices and the model size.

    python benchmarks/scaling.py                              # 1, 2, 4, 8 devices x tiny, small, 135M (~8 min)
    python benchmarks/scaling.py --devices 1,8 --models tiny  # a quick look

Each (devices, model) point runs in its own process over a ``fsdp``-only mesh of that many devices (on a CPU
they are simulated with ``--xla_force_host_platform_device_count``; on a GPU/TPU machine the real ones are
used, so the same command measures real scaling there). The gradient estimate is 8 one-example micro-batches
of 64 tokens; the SVD phase is LoRA-One's randomized spectral init of every q/k/v/o/gate/up/down kernel at
rank 8. Times are medians of 3 runs after a warm-up. On this 2-core CPU the simulated devices share the two
cores, so the numbers show the overhead of partitioning, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {  # name -> toy_llama overrides (None: the real SmolLM2-135M)
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
    "small": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "135M": None,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measure(devices: int, model_name: str, reps: int = 3) -> dict:
    import jax
    import numpy as np

    import lora_one_jax as lj
    from lora_one_jax.data import pad_batch
    from lora_one_jax.models import load_model, toy_llama
    from lora_one_jax.sharding import make_mesh, shard_params

    overrides = MODELS[model_name]
    model, params, _ = load_model("smollm2-135m") if overrides is None else toy_llama(**overrides)
    mesh = make_mesh(1, devices, 1, devices=jax.devices()[:devices]) if devices > 1 else None
    if mesh is not None:
        params = shard_params(params, mesh)
    config = lj.LoraConfig(rank=8, targets=TARGETS)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    micro = [
        pad_batch([{"input_ids": rng.integers(3, vocab, 64).tolist(), "prompt_len": 32}], pad_id=0) for _ in range(8)
    ]
    loss = lj.full_loss_fn(model)

    def timed(fn):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        first = time.perf_counter() - start
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return out, first, statistics.median(times)

    grads, grad_first, grad_s = timed(lambda: lj.estimate_gradient(loss, params, micro, config, progress=False))
    _, svd_first, svd_s = timed(lambda: lj.spectral_init(grads, config, svd="randomized", mesh=mesh))
    n_params = sum(np.size(x) for x in jax.tree.leaves(params))
    return {
        "devices": devices,
        "model": model_name,
        "params": int(n_params),
        "grad_s": grad_s,
        "svd_s": svd_s,
        "grad_first_s": grad_first,
        "svd_first_s": svd_first,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per (devices, model) point")
    parser.add_argument("--worker", nargs=2, metavar=("DEVICES", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(measure(int(args.worker[0]), args.worker[1])), flush=True)
        return
    import jax

    platform = jax.devices()[0].platform
    available = len(jax.devices())
    print(f"JAX {jax.__version__}; {available} {platform} device(s) here: {jax.devices()[0].device_kind}")
    print("\n| model | params | devices | gradient estimate | SVD phase | first call (grad + SVD, with compiles) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model_name in args.models.split(","):
        for devices in map(int, args.devices.split(",")):
            env = dict(os.environ, LORA_ONE_PROGRESS="0")
            if platform == "cpu":
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            elif devices > available:
                continue
            try:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", str(devices), model_name],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
            except subprocess.TimeoutExpired:  # report it and go on (XLA:CPU hung on some simulated meshes)
                print(f"| {model_name} | - | {devices} | timed out after {args.timeout} s | | |", flush=True)
                continue
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not lines:
                print(f"| {model_name} | - | {devices} | failed: {out.stderr.strip().splitlines()[-1:]} | | |")
                continue
            r = json.loads(lines[-1][len("RESULT ") :])
            print(
                f"| {model_name} | {r['params'] / 1e6:.1f}M | {devices} | {r['grad_s']:.3f} s | {r['svd_s']:.3f} s "
                f"| {r['grad_first_s'] + r['svd_first_s']:.1f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
