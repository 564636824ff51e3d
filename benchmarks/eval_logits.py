"""The evaluator with logits only at the scored positions against every position's logits, in one process.

    python benchmarks/eval_logits.py                      # SmolLM2-135M, 300 held-out tweets (a few minutes)
    python benchmarks/eval_logits.py --model toy-llama    # a quick smoke run

One evaluation as the trainer runs it (accuracy + held-out answer loss, ``answer_loss=True``) of the default
run's task and adapters shape (rank 8 on the 7 projections, B random so the adapters matter), timed in turns
(``--reps`` each, after a warm-up on one example per length bucket that compiles every shape), and the
compiled memory of the scoring program on the largest batch shape (``memory_analysis``: temporaries and
total). Prints the accuracy and answer loss of both paths (equal) and their times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import lora_one_jax as lj
from lora_one_jax.data import load_task
from lora_one_jax.data.batching import bucket_lengths
from lora_one_jax.eval import Evaluator
from lora_one_jax.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapters(params, config, seed=0):
    _, adapters = lj.init_adapters(params, config, key=jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(adapters))
    return {
        p: {"a": a["a"], "b": 0.02 * jax.random.normal(k, a["b"].shape)} for k, (p, a) in zip(keys, adapters.items())
    }


def one_per_bucket(ev: Evaluator, split) -> list[int]:
    """One example index per length bucket its scored row falls in (prompt + answer + eos)."""
    buckets = bucket_lengths(ev.max_len)
    lengths = [len(p) + len(a) + 1 for p, a in zip(ev._ids(split["prompt"]), ev._ids(split["answer"]))]
    first = {}
    for i, n in enumerate(lengths):
        first.setdefault(next((b for b in buckets if b >= n), buckets[-1]), i)
    return sorted(first.values())


def program_memory(ev: Evaluator, params, adapters, split) -> dict:
    """Compiled memory of the single-token scoring program on the longest batch of the split."""
    prompts, answers = split["prompt"], split["answer"]
    ids = ev._ids(prompts)
    tails = [a + [ev._eos()] for a in ev._ids(answers)]
    rows = sorted(
        (dict(input_ids=p + a, prompt_len=len(p)) for p, a in zip(ids, tails)), key=lambda r: -len(r["input_ids"])
    )
    rows = [{"input_ids": r["input_ids"][: ev.max_len], "prompt_len": min(r["prompt_len"], ev.max_len)} for r in rows]
    batch = ev._pad(rows[: ev.batch_size], adapters)
    n_choices = max(len(c) for c in split["choices"])
    cand = np.zeros((ev.batch_size, n_choices), np.int32)
    at = np.zeros(ev.batch_size, np.int32)
    compiled = ev._program("next_token", True).lower(params, adapters, batch, cand, at).compile()
    m = compiled.memory_analysis()
    return {
        "shape": tuple(batch["input_ids"].shape),
        "temp_mib": m.temp_size_in_bytes / 2**20,
        "total_mib": (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="tweet-sentiment")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()

    model, params, tok = load_model(args.model)
    config = lj.LoraConfig(rank=8, alpha=16.0, rslora=True, targets=TARGETS)
    targets = lj.find_targets(params, config)
    adapters = random_adapters(params, config)
    split = load_task(args.task).eval
    split = split.select(range(min(args.limit, len(split))))
    print(f"{args.model} on {len(split)} {args.task} examples, eval batch {args.batch_size}, devices {jax.devices()}")
    evs = {
        name: Evaluator(
            model, tok, config, batch_size=args.batch_size, max_len=args.max_len, targets=targets, full_logits=f
        )
        for name, f in (("full logits", True), ("scored positions", False))
    }
    for ev in evs.values():  # warm-up: one example per length bucket compiles every batch shape
        ev.evaluate(params, adapters, split.select(one_per_bucket(ev, split)), answer_loss=True, progress=False)
    results, times = {}, {name: [] for name in evs}
    for _ in range(args.reps):  # in turns: the machine's load hits both alike
        for name, ev in evs.items():
            start = time.perf_counter()
            results[name] = ev.evaluate(params, adapters, split, answer_loss=True, progress=False)
            times[name].append(time.perf_counter() - start)
    print("| path | accuracy | answer loss | time (median) | compiled temporaries | compiled total | batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ev in evs.items():
        r, mem = results[name], program_memory(ev, params, adapters, split)
        print(
            f"| {name} | {r.value:.4f} | {r.answer_loss:.6f} | {statistics.median(times[name]):.2f} s "
            f"({', '.join(f'{t:.2f}' for t in times[name])}) | {mem['temp_mib']:.1f} MiB | {mem['total_mib']:.1f} MiB "
            f"| {mem['shape']} |"
        )
    a, b = results["full logits"], results["scored positions"]
    print(
        f"answer loss relative difference {abs(a.answer_loss - b.answer_loss) / abs(a.answer_loss):.2e}; "
        f"same predictions: {a.predictions == b.predictions}"
    )
    ratio = statistics.median(times["scored positions"]) / statistics.median(times["full logits"])
    print(f"time ratio scored / full: {ratio:.3f}")


if __name__ == "__main__":
    main()
