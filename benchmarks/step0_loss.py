"""LoRA-One's claim at step 0, on the real model: the spectral init alone (no training step) lowers
the loss on batches it was not estimated on. Prints held-out losses measured in one run.

    python benchmarks/step0_loss.py                       # SmolLM2-135M, BoolQ, rank 8 (~4 min on 2 cores)
    python benchmarks/step0_loss.py --model toy-llama --max-len 64
"""

from __future__ import annotations

import argparse
import itertools

import jax
import numpy as np

import lora_one_jax as lj
from lora_one_jax.data import batches, load_task
from lora_one_jax.models import load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="boolq")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-batches", type=int, default=2)
    parser.add_argument("--test-batches", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=256)
    args = parser.parse_args(argv)

    model, params, tok = load_model(args.model)
    task = load_task(args.task)
    config = lj.LoraConfig(
        rank=args.rank,
        alpha=2.0 * args.rank,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    stream = batches(task.train, tok, args.batch_size, max_len=args.max_len, shuffle=True, drop_remainder=True)
    grad_batches = list(itertools.islice(stream, args.grad_batches))
    test_batches = list(itertools.islice(stream, args.test_batches))  # disjoint from the estimate's

    grads = lj.estimate_gradient(lj.full_loss_fn(model), params, grad_batches, config)
    lora_loss = jax.jit(lj.lora_loss_fn(model, config))

    print(
        f"{args.model} on {args.task}, rank {args.rank}, gradient from {args.grad_batches}x{args.batch_size} examples; "
        f"mean loss on {args.test_batches}x{args.batch_size} other training examples, before any training step:"
    )
    for method in ("lora", "lora-one", "pissa", "lora-ga"):
        extra = {"grads": grads} if method in ("lora-one", "lora-ga") else {}
        base, adapters = lj.init_adapters(params, config, key=jax.random.key(0), method=method, **extra)
        loss = float(np.mean([lora_loss(base, adapters, b) for b in test_batches]))
        print(f"  {method:9s} {loss:.4f}")


if __name__ == "__main__":
    main()
