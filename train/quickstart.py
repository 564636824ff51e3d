"""Quickstart: add LoRA adapters to a Flax language model and train them for a few steps.

Runs in about a minute on a laptop CPU with a tiny random Llama, no downloads:

    python -m train.quickstart --steps 30
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from tqdm.auto import tqdm

import lora_one_jax as lj


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.FlaxLlamaForCausalLM(config, seed=0)
    lora = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    params, adapters = lj.init_adapters(model.params, lora, key=jax.random.key(0))
    apply = lj.with_lora(model, lora)

    # A toy task: continue a fixed repeating pattern of tokens.
    tokens = jnp.asarray(np.tile(np.arange(16) * 7 % 128, (8, 2)), jnp.int32)

    def loss_fn(adapters):
        logits = apply({"params": params}, adapters, tokens[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    optimizer = optax.adamw(args.lr)
    opt_state = optimizer.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    first = float(loss_fn(adapters))
    bar = tqdm(range(args.steps), desc="train")
    for _ in bar:
        adapters, opt_state, loss = step(adapters, opt_state)
        bar.set_postfix(loss=f"{float(loss):.3f}")
    last = float(loss_fn(adapters))
    print(f"loss {first:.3f} -> {last:.3f} with {sum(a['a'].size + a['b'].size for a in adapters.values())} "
          f"trainable adapter parameters; base parameters untouched")
    return last


if __name__ == "__main__":
    main()
