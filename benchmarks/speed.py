"""Speed of LoRA-One here against plain LoRA and against the PyTorch path, measured in one run.

    python benchmarks/speed.py                       # SmolLM2-135M, 8 ASDiv examples (~6 min on 2 CPU cores)
    python benchmarks/speed.py --model toy-llama --official-svd-q 64   # a quick smoke run

What it measures, on the same weights and the same 8 training examples:

* our gradient estimate (the official recipe's 8 one-example micro-batches of natural lengths) and SVD
  phase (randomized and exact), first call (with compiles) and steady state, against one training step
  on the same 8 examples; compile counts of each phase;
* a training step with plain AdamW (LoRA) and with ``lora_one_precond`` + AdamW (LoRA-One);
* PyTorch + PEFT: a LoRA step with AdamW, the same step with the preconditioner as a Python loop, and
  the official LoRA-One init recipe (per-parameter gradient accumulation over the 8 micro-batches,
  ``torch.svd_lowrank(-G, q=512, niter=16)`` per matrix, rank 8, gamma 128), with the subspace accuracy
  of both inits against an exact float64 SVD;
* the peak resident memory (RSS) of each phase.

Times are medians of ``--reps`` runs after a warm-up. It runs unchanged on a GPU/TPU (JAX's default
backend; PyTorch on CUDA when available) and prints the devices it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_one_jax as lj
from lora_one_jax.data import load_task, pad_batch, pad_id_of, tokenize
from lora_one_jax.export import pytorch_state_dict
from lora_one_jax.gradient import _accumulate  # the compiled step, for its memory analysis
from lora_one_jax.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MiB = 1 << 20


# ----------------------------------------------------------------------------- measurement helpers


class Meter:
    """Wall time, peak RSS (sampled every 5 ms) and XLA compilations of named phases."""

    def __init__(self):
        self.results: dict[str, dict] = {}
        self._peak = 0
        self._compiles = 0
        self._compile_s = 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

        def on_event(name, seconds, **_):
            if name == "/jax/core/compile/backend_compile_duration":
                self._compiles += 1
                self._compile_s += seconds

        jax.monitoring.register_event_duration_secs_listener(on_event)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process peak so far
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self.rss())
            time.sleep(0.005)

    @contextlib.contextmanager
    def phase(self, name: str):
        self._peak, compiles, compile_s = self.rss(), self._compiles, self._compile_s
        at_start = self._peak
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self._peak = max(self._peak, self.rss())
        self.results[name] = {
            "seconds": seconds,
            "peak_rss_mib": self._peak / MiB,
            "start_rss_mib": at_start / MiB,
            "compiles": self._compiles - compiles,
            "compile_s": self._compile_s - compile_s,
        }


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in jax.tree.leaves(tree))


def worst_angle(adapters, exact) -> float:
    """Largest principal angle (degrees) between each adapter and the exact top-r subspaces of its -G."""
    worst = 0.0
    for path, (u, v) in exact.items():
        a, b = np.asarray(adapters[path]["a"], np.float64), np.asarray(adapters[path]["b"], np.float64)
        worst = max(worst, lj.principal_angles(a, u).max(), lj.principal_angles(b.T, v).max())
    return float(worst)


def exact_subspaces(grads, rank):
    out = {}
    for path, g in grads.items():
        u, _, vt = np.linalg.svd(-np.asarray(g, np.float64), full_matrices=False)
        out[path] = (u[:, :rank], vt[:rank].T)
    return out


# ----------------------------------------------------------------------------- JAX


def jax_side(args, meter, model, params, config, micro, batch):
    res = {}
    loss_fn = lj.full_loss_fn(model)
    with meter.phase("gradient estimate (first call)"):
        grads = jax.block_until_ready(lj.estimate_gradient(loss_fn, params, micro, config, progress=False))
    with meter.phase("gradient estimate"):
        res["grad_s"] = median_time(
            lambda: jax.block_until_ready(lj.estimate_gradient(loss_fn, params, micro, config, progress=False)),
            args.reps,
        )
    # expected peak: params + float32 targeted gradients (+ their running sum) + one step's activations
    padded = lj.gradient.pad_micro_batches(micro)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *padded)
    targets = lj.find_targets(params, config)
    kernels = {p: _kernel(params, p) for p in targets}
    rest = _rest(params, targets)
    acc = {p: jnp.zeros(k.shape, jnp.float32) for p, k in kernels.items()}
    keys = tuple((p, f"{p}/kernel") for p in sorted(targets))
    compiled = _accumulate.lower(
        acc, kernels, rest, stacked, np.ones(len(micro), np.float32), loss_fn=loss_fn, keys=keys
    ).compile()
    analysis = compiled.memory_analysis()
    res["expected_grad_mib"] = (nbytes(params) + 2 * nbytes(acc) + getattr(analysis, "temp_size_in_bytes", 0)) / MiB
    res["grad_activations_mib"] = getattr(analysis, "temp_size_in_bytes", 0) / MiB

    exact = exact_subspaces(grads, args.rank)
    for method in ("randomized", "exact"):
        with meter.phase(f"SVD phase, {method} (first call)"):
            adapters = jax.block_until_ready(lj.spectral_init(grads, config, svd=method))
        with meter.phase(f"SVD phase, {method}"):
            res[f"svd_{method}_s"] = median_time(
                lambda m=method: jax.block_until_ready(lj.spectral_init(grads, config, svd=m)), args.reps
            )
        res[f"svd_{method}_angle"] = worst_angle(adapters, exact)
    with meter.phase("SVD phase, randomized tol=1e-4 (first call)"):
        adapters = jax.block_until_ready(lj.spectral_init(grads, config, svd="randomized", tol=1e-4))
    with meter.phase("SVD phase, randomized tol=1e-4"):
        res["svd_accurate_s"] = median_time(
            lambda: jax.block_until_ready(lj.spectral_init(grads, config, svd="randomized", tol=1e-4)), args.reps
        )
    res["svd_accurate_angle"] = worst_angle(adapters, exact)
    _, spectral = lj.init_adapters(params, config, key=jax.random.key(0), method="lora-one", grads=grads)

    lora_loss = lj.lora_loss_fn(model, config)
    stacked, layout = lj.stack_adapters(spectral)  # the trainer's form: one leaf per shape, not per module
    arms = [
        ("lora", optax.adamw(1e-4, weight_decay=0.0), True),
        ("lora-one", lj.lora_one(1e-4), True),
        ("lora, per-module adapters", optax.adamw(1e-4, weight_decay=0.0), False),
        ("lora-one, per-module adapters", lj.lora_one(1e-4), False),
    ]
    for name, optimizer, stack in arms:

        def train_step(base, adapters, opt_state, batch, optimizer=optimizer, stack=stack):
            loss_of = (lambda b, s, x: lora_loss(b, lj.unstack_adapters(s, layout), x)) if stack else lora_loss
            loss, g = jax.value_and_grad(loss_of, argnums=1)(base, adapters, batch)
            updates, opt_state = optimizer.update(g, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state, loss

        start = stacked if stack else spectral
        state = [jax.tree.map(jnp.copy, start), optimizer.init(start)]
        with meter.phase(f"train step {name} (compile)"):
            step = jax.jit(train_step, donate_argnums=(1, 2)).lower(params, *state, batch).compile()

        def run(step=step, state=state):
            *state[:], loss = step(params, *state, batch)
            jax.block_until_ready(loss)

        run()  # warm-up
        with meter.phase(f"train step {name}"):
            res[f"step_{name}_s"] = median_time(run, args.steps)
        res[f"step_{name}_compile_s"] = meter.results[f"train step {name} (compile)"]["seconds"]
    return res, grads, spectral


def _kernel(params, path):
    node = params
    for part in path.split("/"):
        node = node[part]
    return node["kernel"]


def _rest(params, targets):
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: v for k, v in flat.items() if k not in {f"{p}/kernel" for p in targets}}


# ----------------------------------------------------------------------------- PyTorch


def torch_side(args, meter, model, params, config, micro, batch, spectral, grads_jax):
    import torch
    import transformers
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"torch_device": device, "torch_threads": torch.get_num_threads()}
    tensor = lambda x, dtype=None: torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

    def torch_batch(b):
        ids = tensor(b["input_ids"], torch.long)
        labels = torch.where(tensor(b["loss_mask"]) > 0, ids, torch.full_like(ids, -100))
        return {
            "input_ids": ids,
            "attention_mask": tensor(b["attention_mask"], torch.long),
            "position_ids": tensor(b["position_ids"], torch.long),
            "labels": labels,
        }

    def base_model():
        pt = transformers.LlamaForCausalLM(model.config).to(device)
        state = {k: torch.as_tensor(v) for k, v in pytorch_state_dict(params).items()}
        missing, unexpected = pt.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "rotary" not in m and m != "lm_head.weight"]:
            raise RuntimeError(f"weights did not map onto PyTorch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return pt

    with meter.phase("PyTorch: load weights"):
        pt = base_model()
    tb = torch_batch(batch)
    with torch.no_grad():
        ours = np.asarray(
            model(
                batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                params=params,
            ).logits
        )
        theirs = pt(**{k: v for k, v in tb.items() if k != "labels"}).logits.cpu().numpy()
    res["logits_max_abs_diff"] = float(np.abs(ours - theirs).max())

    # --- the official init recipe: gradients of the target weights over 8 one-example micro-batches ---
    targets = lj.find_targets(params, config)
    names = {p: p.replace("/", ".") + ".weight" for p in targets}
    weights = dict(pt.named_parameters())
    for name, p in pt.named_parameters():
        p.requires_grad_(name in names.values())

    def official_gradient():
        acc = {n: torch.zeros_like(weights[n]) for n in names.values()}
        for mb in micro:
            pt(**torch_batch(mb)).loss.backward()
            for n in names.values():
                acc[n] += weights[n].grad / len(micro)
                weights[n].grad = None
        return acc

    with meter.phase("PyTorch: official gradient estimate"):
        res["official_grad_s"] = median_time(official_gradient, args.reps)
    g_pt = official_gradient()
    res["grad_max_rel_diff"] = max(
        float(
            (g_pt[names[p]].cpu().numpy().T - np.asarray(grads_jax[p])).__abs__().max()
            / np.abs(np.asarray(grads_jax[p])).max()
        )
        for p in targets
    )

    def official_svd():
        out = {}
        for p, n in names.items():
            g = -g_pt[n].float()  # (d_out, d_in)
            q = min(args.official_svd_q, *g.shape)
            u, s, v = torch.svd_lowrank(g, q=q, niter=16)
            root = torch.sqrt(s[: args.rank]) / torch.sqrt(args.gamma * s[0])
            # PyTorch orientation: lora_A (r, d_in) from the right singular vectors, lora_B (d_out, r) from the left
            out[p] = {
                "a": (v[:, : args.rank] * root).cpu().numpy(),
                "b": (root[:, None] * u[:, : args.rank].T).cpu().numpy(),
            }
        return out

    with meter.phase("PyTorch: official SVD phase"):
        start = time.perf_counter()
        official = official_svd()
        res["official_svd_s"] = time.perf_counter() - start
    exact = exact_subspaces({p: g_pt[n].cpu().numpy().T for p, n in names.items()}, args.rank)
    res["official_angle"] = worst_angle(official, exact)

    # --- PEFT LoRA training steps on the same batch, from the same spectral init ---
    for p in pt.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(
        pt, PeftConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    )
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for path, ad in spectral.items():
            layer = modules["base_model.model." + path.replace("/", ".")]
            layer.lora_A["default"].weight.copy_(tensor(np.asarray(ad["a"]).T))
            layer.lora_B["default"].weight.copy_(tensor(np.asarray(ad["b"]).T))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    pairs = [
        (m.lora_A["default"].weight, m.lora_B["default"].weight)
        for m in modules.values()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    ]

    def precondition(damping=1e-6):  # LoRA-One's scaled GD as the official Python loop would do it
        with torch.no_grad():
            for a, b in pairs:  # a: (r, d_in) = A^T, b: (d_out, r) = B^T
                eye = torch.eye(a.shape[0], device=a.device)
                ga = torch.linalg.solve(b.T @ b + damping * eye, a.grad)
                gb = torch.linalg.solve(a @ a.T + damping * eye, b.grad.T).T
                a.grad.copy_(ga)
                b.grad.copy_(gb)

    for name, pre in (("peft-lora", None), ("peft-lora-precond", precondition)):
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

        def step(pre=pre, optimizer=optimizer):
            loss = peft_model(**tb).loss
            loss.backward()
            if pre is not None:
                pre()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()

        step()  # warm-up
        with meter.phase(f"PyTorch: train step {name}"):
            res[f"step_{name}_s"] = median_time(step, args.steps)
    return res


# ----------------------------------------------------------------------------- report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="asdiv")
    parser.add_argument("--examples", type=int, default=8, help="training examples (= micro-batches of one)")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--gamma", type=float, default=128.0)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each init phase (median)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps of each kind (median)")
    parser.add_argument("--official-svd-q", type=int, default=512, help="q of torch.svd_lowrank (official: 512)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    meter = Meter()
    with meter.phase("load model"):
        model, params, tok = load_model(args.model)
    config = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    rows = tokenize(load_task(args.task).train.select(range(args.examples)), tok, max_len=args.max_len)
    rows = [{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows]
    micro = [pad_batch([r], pad_id=pad_id_of(tok)) for r in rows]  # natural lengths, as the official recipe
    batch = pad_batch(rows, pad_id=pad_id_of(tok))  # the same examples as one batch, padded to the longest
    lengths = [len(r["input_ids"]) for r in rows]

    res, grads, spectral = jax_side(args, meter, model, params, config, micro, batch)
    if not args.no_torch:
        res.update(torch_side(args, meter, model, params, config, micro, batch, spectral, grads))

    step = res["step_lora_s"]
    init_steady = res["grad_s"] + res["svd_randomized_s"]
    init_first = (
        meter.results["gradient estimate (first call)"]["seconds"]
        + meter.results["SVD phase, randomized (first call)"]["seconds"]
    )
    print(
        f"\n## Speed: {args.model}, {args.examples} {args.task} examples (lengths {min(lengths)}-{max(lengths)}), "
        f"rank {args.rank}, {len(lj.find_targets(params, config))} adapted matrices"
    )
    print(
        f"JAX {jax.__version__} on {jax.devices()}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores"
        + (f"; PyTorch on {res['torch_device']} ({res['torch_threads']} threads)" if "torch_device" in res else "")
    )
    print("\n| what | ours | PyTorch path | ratio |\n| --- | --- | --- | --- |")
    rows_out = [
        ("training step, LoRA + AdamW (batch of the 8 examples)", step, res.get("step_peft-lora_s")),
        (
            "training step, LoRA-One (preconditioner + AdamW)",
            res["step_lora-one_s"],
            res.get("step_peft-lora-precond_s"),
        ),
        ("training step, LoRA, per-module adapters (not stacked)", res["step_lora, per-module adapters_s"], None),
        ("training step, LoRA-One, per-module adapters", res["step_lora-one, per-module adapters_s"], None),
        ("gradient estimate, 8 one-example micro-batches", res["grad_s"], res.get("official_grad_s")),
        (
            "SVD phase, randomized (ours) / svd_lowrank q=512 niter=16",
            res["svd_randomized_s"],
            res.get("official_svd_s"),
        ),
        ("SVD phase, randomized with tol=1e-4 (official's accuracy)", res["svd_accurate_s"], res.get("official_svd_s")),
        ("SVD phase, exact", res["svd_exact_s"], None),
        (
            "whole init (gradient + randomized SVD), steady",
            init_steady,
            None if "official_grad_s" not in res else res["official_grad_s"] + res["official_svd_s"],
        ),
        (
            "whole init, first call (with compiles)",
            init_first,
            None if "official_grad_s" not in res else res["official_grad_s"] + res["official_svd_s"],
        ),
    ]
    for what, ours, theirs in rows_out:
        ratio = f"{ours / theirs:.2f}" if theirs else "-"
        print(
            f"| {what} | {ours:.2f} s | {theirs:.2f} s | {ratio} |" if theirs else f"| {what} | {ours:.2f} s | - | - |"
        )
    print("\n| derived ratio | value | target |\n| --- | --- | --- |")
    print(f"| preconditioner overhead on a step (LoRA-One / LoRA) | {res['step_lora-one_s'] / step:.3f} | <= 1.05 |")
    for suffix in ("", ", per-module adapters"):
        one, plain = res[f"step_lora-one{suffix}_compile_s"], res[f"step_lora{suffix}_compile_s"]
        print(
            f"| compile time of the step{suffix} (LoRA-One / LoRA) | {one:.1f} s / {plain:.1f} s = {one / plain:.2f} "
            "| not multiplied |"
        )
    print(f"| whole init / one training step (steady) | {init_steady / step:.2f} | <= 2 |")
    print(f"| whole init / one training step (first call, with compiles) | {init_first / step:.2f} | - |")
    if "official_grad_s" in res:
        official = res["official_grad_s"] + res["official_svd_s"]
        accurate = res["grad_s"] + res["svd_accurate_s"]
        print(
            f"| whole init / official recipe (steady; first call) | {init_steady / official:.3f}; "
            f"{init_first / official:.3f} | <= 0.1 |"
        )
        print(f"| whole init with tol=1e-4 / official recipe (steady) | {accurate / official:.3f} | <= 0.1 |")
        exact = res["grad_s"] + res["svd_exact_s"]
        print(
            f"| whole init with the exact SVD (the official's accuracy) / official recipe (steady) "
            f"| {exact / official:.3f} | <= 0.1 |"
        )
        print(f"| training step / PyTorch + PEFT | {step / res['step_peft-lora_s']:.2f} | <= 1 |")
    print(
        "\n| subspace accuracy: worst principal angle to the exact (float64) top-r subspaces | degrees |\n| --- | --- |"
    )
    print(f"| ours, randomized (default tol=1e-3) | {res['svd_randomized_angle']:.4f} |")
    print(f"| ours, randomized, tol=1e-4 | {res['svd_accurate_angle']:.4f} |")
    print(f"| ours, exact (float32) | {res['svd_exact_angle']:.4f} |")
    if "official_angle" in res:
        print(f"| official svd_lowrank(q={args.official_svd_q}, niter=16) | {res['official_angle']:.4f} |")
        print(
            f"\n(sanity: logits JAX vs PyTorch max |diff| {res['logits_max_abs_diff']:.1e}; "
            f"gradients max relative diff {res['grad_max_rel_diff']:.1e})"
        )
    print("\n| phase | time | RSS at start -> peak | compiles (time) |\n| --- | --- | --- | --- |")
    for name, r in meter.results.items():
        print(
            f"| {name} | {r['seconds']:.2f} s | {r['start_rss_mib']:.0f} -> {r['peak_rss_mib']:.0f} MiB "
            f"| {r['compiles']} ({r['compile_s']:.1f} s) |"
        )
    first = meter.results["gradient estimate (first call)"]
    print(
        f"\nGradient estimate (first call): RSS {first['start_rss_mib']:.0f} -> {first['peak_rss_mib']:.0f} MiB, i.e. "
        f"+{first['peak_rss_mib'] - first['start_rss_mib']:.0f} MiB over the loaded model, against params + "
        f"2 x float32 targeted gradients + one step's activations ({res['grad_activations_mib']:.0f} MiB) = "
        f"{res['expected_grad_mib']:.0f} MiB in all (the params were already resident)."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "phases": meter.results, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
