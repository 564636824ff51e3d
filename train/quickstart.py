"""Quickstart: fine-tune a pretrained model with LoRA-One on a real task and measure held-out accuracy.

    python -m train.quickstart                                  # SmolLM2-135M on BoolQ (CPU: ~20 min)
    python -m train.quickstart --model toy-llama --steps 5 --eval 20   # tiny random model, ~1 min
    python -m train.quickstart --method lora                    # the plain LoRA baseline

Steps: load model and task -> evaluate the base model -> estimate the full fine-tuning gradient on a
few micro-batches -> spectral init -> train the adapters with the preconditioned AdamW -> evaluate.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import optax

import lora_one_jax as lj
from lora_one_jax.data import batches, load_task
from lora_one_jax.eval import Evaluator
from lora_one_jax.models import load_model
from lora_one_jax.progress import progress_bar


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="load_model spec (default: %(default)s)")
    parser.add_argument("--task", default="boolq", help="load_task spec (default: %(default)s)")
    parser.add_argument("--method", default="lora-one", choices=["lora-one", "lora", "pissa", "lora-ga"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names, or all-linear",
    )
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-batches", type=int, default=2, help="micro-batches for the gradient estimate")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--eval", type=int, default=100, help="held-out examples to evaluate (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, params, tokenizer = load_model(args.model)
    task = load_task(args.task, seed=args.seed)
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    config = lj.LoraConfig(rank=args.rank, alpha=args.alpha, targets=targets)
    evaluator = Evaluator(model, tokenizer, config, max_len=args.max_len)
    results = {}

    def held_out(base, adapters, label):
        if args.eval:
            results[label] = evaluator.evaluate(base, adapters, task, limit=args.eval)
            print(f"{label}: {results[label]}")

    held_out(params, None, "base model")

    stream = batches(
        task.train,
        tokenizer,
        args.batch_size,
        max_len=args.max_len,
        shuffle=True,
        seed=args.seed,
        epochs=None,
        drop_remainder=True,
    )  # tokenized once, endless

    start = time.perf_counter()
    key = jax.random.key(args.seed)
    if args.method in ("lora-one", "lora-ga"):
        grads = lj.estimate_gradient(
            lj.full_loss_fn(model), params, list(itertools.islice(stream, args.grad_batches)), config
        )
        base, adapters = lj.init_adapters(params, config, key=key, method=args.method, grads=grads)
    else:
        base, adapters = lj.init_adapters(params, config, key=key, method=args.method)
    optimizer = lj.lora_one(args.lr) if args.method == "lora-one" else optax.adamw(args.lr)
    lora_loss = lj.lora_loss_fn(model, config)

    @jax.jit  # the frozen base is an argument: closed over, its weights would become XLA constants
    def train_step(base, adapters, opt_state, batch):
        loss, grads = jax.value_and_grad(lora_loss, argnums=1)(base, adapters, batch)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state = optimizer.init(adapters)
    bar = progress_bar(itertools.islice(stream, args.steps), total=args.steps, desc=f"train ({args.method})")
    for batch in bar:
        adapters, opt_state, loss = train_step(base, adapters, opt_state, batch)
        bar.set_postfix(loss=f"{float(loss):.4f}")
    print(
        f"init + {args.steps} steps in {time.perf_counter() - start:.0f}s; "
        f"{sum(a['a'].size + a['b'].size for a in adapters.values()):,} trainable parameters"
    )
    # PiSSA / LoRA-GA moved part of W into the adapters: evaluate on the base they were trained with.
    held_out(base, adapters, f"after {args.method}")
    return results


if __name__ == "__main__":
    main()
