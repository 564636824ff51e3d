"""Speed of LoRA-One here against plain LoRA and against the PyTorch path, measured in one run.

    python benchmarks/speed.py                       # SmolLM2-135M, 8 ASDiv examples (~6 min on 2 CPU cores)
    python benchmarks/speed.py --model toy-llama --official-svd-q 64   # a quick smoke run
    python benchmarks/speed.py --sections nnx        # the same model through tunix's NNX Llama3 against linen
    python benchmarks/speed.py --sections stage      # the trainer's gradient stage: before, one pass, streamed
    python benchmarks/speed.py --sections products   # the step with the adapter products flattened vs not

What it measures, on the same weights and the same 8 training examples:

* our gradient estimate (the official recipe's 8 one-example micro-batches of natural lengths) and SVD
  phase (randomized and exact), first call (with compiles) and steady state, against one training step
  on the same 8 examples; compile counts of each phase;
* a training step with plain AdamW (LoRA) and with ``lora_one_precond`` + AdamW (LoRA-One);
* PyTorch + PEFT: a LoRA step with AdamW, the same step with the preconditioner as a Python loop, and
  the official LoRA-One init recipe (per-parameter gradient accumulation over the 8 micro-batches,
  ``torch.svd_lowrank(-G, q=512, niter=16)`` per matrix, rank 8, gamma 128), with the subspace accuracy
  of both inits against an exact float64 SVD;
* the peak resident memory (RSS) of each phase;
* ``--sections products``: the training step (tweet batch, answer positions) with the adapters' products
  taken on flattened ``(tokens, features)`` inputs (``lora_delta`` today) against the same products with the
  batch dimensions kept (before), both compiled in this run, timed in turns, with their transposes;
* ``--sections nnx``: the LoRA-One step and the whole init (gradient estimate + randomized SVD; first call
  with compiles, and steady state) on the same weights through tunix's NNX ``Llama3`` against linen, their
  ratio, and the compiled steps' cost analysis and HLO op counts (needs the ``nnx`` extra).

Times are medians of ``--reps`` runs after a warm-up. It runs unchanged on a GPU/TPU (JAX's default
backend; PyTorch on CUDA when available) and prints the devices it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
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
from lora_one_jax.gradient import pad_micro_batches
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
    targets = lj.find_targets(params, config)
    compiled = lj.lower_gradient_step(loss_fn, params, padded[0], config, micro_batches_per_step=len(micro)).compile()
    analysis = compiled.memory_analysis()
    grad_bytes = sum(4 * t.d_in * t.d_out for t in targets.values())
    res["expected_grad_mib"] = (nbytes(params) + 2 * grad_bytes + analysis.temp_size_in_bytes) / MiB
    res["grad_activations_mib"] = analysis.temp_size_in_bytes / MiB

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


# ----------------------------------------------------------------------------- PyTorch


def torch_side(args, meter, model, params, config, micro, batch, spectral, grads_jax):
    import torch
    import transformers

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

    res.update(torch_official(args, meter, pt, params, config, micro, grads_jax, torch_batch))
    res.update(torch_peft_steps(args, meter, pt, spectral, tb, tensor))
    return res


def torch_official(args, meter, pt, params, config, micro, grads_jax, torch_batch) -> dict:
    """The official init recipe in PyTorch: per-parameter gradient accumulation, then svd_lowrank per matrix."""
    import torch

    res = {}
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

    return res


def torch_peft_steps(args, meter, pt, spectral, tb, tensor) -> dict:
    """PEFT LoRA training steps (AdamW, and with the preconditioner as a Python loop) from our spectral init."""
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    res, device = {}, next(pt.parameters()).device.type
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


# ----------------------------------------------------------------------------- the limit: FLOPs, peak, memory

#: Synthetic Llama layer stacks: the real widths and vocabularies of Llama-3.2-1B and Llama-2-7B, few layers.
SYNTHETIC = {
    "llama-1b-width": dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
    "llama-7b-width": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
    ),
}

#: Training-step variants: name -> (loss_positions in the batch, vocab_chunk).
STEP_PATHS = {
    "today: full logits": (False, None),
    "logits at the answer positions": (True, None),
    "answer positions + vocab chunks of 8192": (True, 8192),
}
TODAY, NEW = "today: full logits", "logits at the answer positions"


def synthetic_model(name: str, layers: int):
    """A Flax Llama of the named widths with ``layers`` layers, and its params as abstract shapes (none held)."""
    import transformers

    config = transformers.LlamaConfig(**SYNTHETIC[name], num_hidden_layers=layers, max_position_embeddings=4096)
    model = transformers.FlaxLlamaForCausalLM(config, _do_init=False)
    return model, jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def nbytes_abstract(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def peak_bytes(compiled) -> int:
    """A compiled program's peak: its arguments, its outputs not aliased to them, and its temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def flops_of(compiled) -> float:
    """The program's FLOPs from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """This machine's float32 matmul rate (FLOP/s): the median of ``reps`` (n x n) @ (n x n) products."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    return 2 * n**3 / median_time(lambda: jax.block_until_ready(mm(a, b)), reps)


def fake_batch(rows: int, length: int, answer: int, vocab: int) -> dict:
    """A causal-LM batch whose last ``answer`` tokens are supervised (a classification label + eos)."""
    rng = np.random.default_rng(0)
    loss = np.zeros((rows, length), np.float32)
    loss[:, -answer:] = 1.0
    return {
        "input_ids": rng.integers(3, vocab, size=(rows, length)).astype(np.int32),
        "attention_mask": np.ones((rows, length), np.int32),
        "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        "loss_mask": loss,
    }


def adapter_state(params, config, optimizer):
    """``(make, layout)``: ``make()`` builds stacked adapters (PEFT init) and their optimizer state."""
    targets = lj.find_targets(params, config)

    layout = []

    def make():
        stacked, order = lj.stack_adapters(lj.lora_init(targets, jnp.float32, key=jax.random.key(0)))
        layout[:] = [order]
        return stacked, optimizer.init(stacked)

    jax.eval_shape(make)  # the layout, without computing anything
    return make, layout[0]


def train_step(model, config, layout, optimizer, *, vocab_chunk=None, remat="none"):
    """The LoRA training step (AdamW on stacked adapters), jitted with the state donated."""
    loss = lj.lora_loss_fn(model, config, vocab_chunk=vocab_chunk, remat=remat)

    def step(base, stacked, opt_state, batch):
        value, grads = jax.value_and_grad(lambda s: loss(base, lj.unstack_adapters(s, layout), batch))(stacked)
        updates, opt_state = optimizer.update(grads, opt_state, stacked)
        return optax.apply_updates(stacked, updates), opt_state, value

    return jax.jit(step, donate_argnums=(1, 2))


def logits_buffer(compiled, batch, vocab: int) -> bool:
    """Whether the compiled program holds a batch x length x vocab array (the full logits or their gradient)."""
    rows, length = batch["input_ids"].shape
    text = compiled.as_text()
    return any(f"[{rows},{n},{vocab}]" in text for n in (length, length - 1))


def compile_steps(model, params, config, batch, variants) -> dict:
    """{variant: compiled step} for ``variants`` = {name: (positions, vocab_chunk, remat)}; params may be abstract."""
    optimizer = optax.adamw(1e-4, weight_decay=0.0)
    make, layout = adapter_state(params, config, optimizer)
    state = jax.eval_shape(make)
    out = {}
    for name, (positions, chunk, remat) in variants.items():
        b = lj.with_loss_positions(batch) if positions else batch
        step = train_step(model, config, layout, optimizer, vocab_chunk=chunk, remat=remat)
        out[name] = (step.lower(abstract(params), *state, abstract(b)).compile(), b)
    return out, make


def step_rows(model, params, config, batch, variants, reps: int, *, timed: bool = True) -> dict:
    """Per variant: FLOPs, peak bytes, a logits buffer or not, and (``timed``) the median step time. The
    variants are timed in turns (one step of each per round), so a shared machine's load drifts evenly."""
    compiled, make = compile_steps(model, params, config, batch, variants)
    rows, runs = {}, {}
    for name, (step, b) in compiled.items():
        rows[name] = {
            "flops": flops_of(step),
            "peak": peak_bytes(step),
            "temp": step.memory_analysis().temp_size_in_bytes,
            "logits_buffer": logits_buffer(step, batch, model.config.vocab_size),
        }
        if timed:
            state = list(make())

            def run(step=step, state=state, b=b):
                *state[:], loss = step(params, *state, b)
                jax.block_until_ready(loss)

            run()  # warm-up
            runs[name] = run
    times = {name: [] for name in runs}
    for _ in range(reps if timed else 0):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        rows[name]["seconds"] = statistics.median(t)
    return rows


def svd_temp(shape: tuple[int, int], rank: int, count: int) -> int:
    """Temporaries of the SVD (``svd="auto"``) of a stack of ``count`` matrices of ``shape``."""
    fn = jax.jit(lambda x: lj.top_svd(x, rank, method="auto"))
    stack = jax.ShapeDtypeStruct((count, min(shape), max(shape)), jnp.float32)
    return fn.lower(stack).compile().memory_analysis().temp_size_in_bytes


def init_memory(model, params, config, batch, *, max_bytes: int) -> dict:
    """Peak bytes of the init (compiled memory analysis) in one pass and streamed (``max_bytes`` per pass):
    per pass, the larger of the gradient step's peak (params + gradient sums + one micro-batch's activations)
    and the SVD phase's (params + the pass's gradients + their stacked copy + the largest stack's SVD
    temporaries). The streamed figure is that of its largest pass."""
    loss = lj.full_loss_fn(model)
    param_bytes = nbytes_abstract(params)
    targets = lj.find_targets(params, config)
    size = {p: 4 * t.d_in * t.d_out for p, t in targets.items()}
    shape = {p: tuple(sorted((t.d_in, t.d_out))) for p, t in targets.items()}

    def pass_peak(modules):
        step = lj.lower_gradient_step(loss, params, batch, config, micro_batches_per_step=1, modules=modules)
        step = step.compile()
        grads = sum(size[p] for p in modules)
        stacks = {shape[p]: sum(shape[q] == shape[p] for q in modules) for p in modules}
        svd = max(svd_temp(s, config.rank, n) for s, n in stacks.items())
        return max(peak_bytes(step), param_bytes + 2 * grads + svd), grads, step.memory_analysis().temp_size_in_bytes

    one, all_grads, _ = pass_peak(sorted(targets))
    passes = lj.gradient_passes(params, config, max_bytes=max_bytes)
    streamed, group, activations = pass_peak(max(passes, key=lambda ps: sum(size[p] for p in ps)))
    return {
        "params": param_bytes,
        "all_grads": all_grads,
        "one_pass": one,
        "passes": len(passes),
        "group_grads": group,
        "activations": activations,
        "streamed": streamed,
        "bound": param_bytes + group + activations,
    }


def streamed_init_time(args, model, params, config, micro) -> dict:
    """Steady-state time of the init in one pass and streamed (``--kernels-per-pass``), and their adapters' gap."""
    loss = lj.full_loss_fn(model)

    def one_pass():
        grads = lj.estimate_gradient(loss, params, micro, config, progress=False)
        return jax.block_until_ready(lj.spectral_init(grads, config))

    def streamed():
        return jax.block_until_ready(
            lj.spectral_init_streamed(
                loss, params, micro, config, kernels_per_pass=args.kernels_per_pass, progress=False
            )
        )

    a, b = one_pass(), streamed()  # warm-up (compiles)
    gap = max(  # largest |A B difference| relative to the largest |A B| entry, over the modules
        float(jnp.abs(a[p]["a"] @ a[p]["b"] - b[p]["a"] @ b[p]["b"]).max() / jnp.abs(a[p]["a"] @ a[p]["b"]).max())
        for p in a
    )
    passes = len(lj.gradient_passes(params, config, kernels_per_pass=args.kernels_per_pass))
    times = {one_pass: [], streamed: []}
    for _ in range(args.reps):  # in turns, so a shared machine's load drifts evenly
        for fn, t in times.items():
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return {
        "one_pass_s": statistics.median(times[one_pass]),
        "streamed_s": statistics.median(times[streamed]),
        "passes": passes,
        "max_abs_gap": gap,
    }


def limit_section(args, model, params, tok, config) -> None:
    """The step against the machine's own matmul peak, the new loss paths against today's, remat, streaming."""
    peak = matmul_peak()
    rows = tokenize(load_task(args.limit_task).train.select(range(args.batch)), tok, max_len=args.limit_max_len)
    rows = [{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows]
    batch = pad_batch(rows, pad_id=pad_id_of(tok))
    variants = {name: (pos, chunk, "none") for name, (pos, chunk) in STEP_PATHS.items()}
    steps = step_rows(model, params, config, batch, variants, args.steps)
    shape = "x".join(map(str, batch["input_ids"].shape))
    print(
        f"\n## The step against this machine's limit: {args.model}, {args.limit_task} batch {shape}, rank {args.rank}"
    )
    print(
        f"JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); float32 matmul peak "
        f"measured here (2048^3, median): {peak / 1e9:.0f} GFLOP/s\n"
    )
    print("| step | time | GFLOP (XLA) | achieved GFLOP/s | fraction of peak | peak memory | logits buffer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in steps.items():
        rate = r["flops"] / r["seconds"]
        print(
            f"| {name} | {r['seconds']:.3f} s | {r['flops'] / 1e9:.1f} | {rate / 1e9:.0f} | {rate / peak:.2f} "
            f"| {r['peak'] / MiB:.0f} MiB | {'yes' if r['logits_buffer'] else 'no'} |"
        )
    today = steps[TODAY]["seconds"]
    for name in list(STEP_PATHS)[1:]:
        print(
            f"\n{name} / today: time {steps[name]['seconds'] / today:.3f} (target <= 0.85), "
            f"FLOPs {steps[name]['flops'] / steps[TODAY]['flops']:.3f}, "
            f"step temporaries {steps[name]['temp'] / MiB:.0f} vs {steps[TODAY]['temp'] / MiB:.0f} MiB"
        )
    best = max(r["flops"] / r["seconds"] for r in steps.values()) / peak
    print(f"best step at {best:.2f} of the measured matmul peak (target >= 0.80)")

    long = fake_batch(args.remat_rows, args.remat_len, 2, model.config.vocab_size)
    remats = {remat: (True, None, remat) for remat in ("none", "layers", "dots")}
    rr = step_rows(model, params, config, long, remats, max(1, args.steps // 2))
    print(f"\n### Rematerialisation ({args.model}, batch {args.remat_rows}x{args.remat_len}, answer positions)\n")
    print("| remat | step time | peak memory (compiled) | temporaries |\n| --- | --- | --- | --- |")
    for name, r in rr.items():
        print(f"| {name} | {r['seconds']:.2f} s | {r['peak'] / MiB:.0f} MiB | {r['temp'] / MiB:.0f} MiB |")

    micro = [pad_batch([r], pad_id=pad_id_of(tok)) for r in rows]
    st = streamed_init_time(args, model, params, config, micro)
    print(f"\n### Streamed init ({args.model}, {len(micro)} one-example micro-batches, steady state)\n")
    print(
        f"one pass {st['one_pass_s']:.2f} s; streamed in {st['passes']} passes {st['streamed_s']:.2f} s "
        f"({st['streamed_s'] / st['one_pass_s']:.2f}x); adapters' largest relative |A B| difference "
        f"{st['max_abs_gap']:.1e}"
    )


def previous_stage(loss, params, micro, config):
    """The trainer's gradient stage before ``gradient_factors``: the whole gradient, then both halves' (three
    passes over the data), LoRA-One's factors at gamma 1, G's subspaces and the halves' stability."""
    grads = lj.estimate_gradient(loss, params, micro, config, progress=False)
    unit = lj.unit_spectral_init(grads, config)
    subspaces = lj.gradient_subspaces(grads, config)
    half = len(micro) // 2
    halves = [lj.estimate_gradient(loss, params, part, config, progress=False) for part in (micro[:half], micro[half:])]
    return jax.block_until_ready(unit), subspaces, lj.gradient_stability(*halves, config)


def stage_section(args, model, params, tok, config) -> None:
    """The trainer's gradient stage (LoRA-One's factors + the diagnostics' subspaces and stability) as it was
    (three gradient passes), with ``gradient_factors`` in one pass (G from the two halves) and streamed."""
    rows = tokenize(load_task(args.limit_task).train.select(range(args.examples)), tok, max_len=args.limit_max_len)
    micro = [
        pad_batch([{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]}], pad_id=pad_id_of(tok)) for r in rows
    ]
    micro = pad_micro_batches(micro)  # one shape, as the trainer's gradient examples
    loss = lj.full_loss_fn(model)
    n = len(lj.find_targets(params, config))
    stage = lambda per_pass: lj.gradient_factors(
        loss, params, micro, config, subspaces=True, stability=True, kernels_per_pass=per_pass, progress=False
    )
    variants = {
        "previous: whole gradient + both halves (3 passes over the data)": lambda: previous_stage(
            loss, params, micro, config
        ),
        "gradient_factors, one pass (G from the halves)": lambda: stage(n),
        f"gradient_factors, kernels_per_pass={args.kernels_per_pass}": lambda: stage(args.kernels_per_pass),
    }
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up (compiles)
    times = {name: [] for name in variants}
    for _ in range(args.reps):  # in turns
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    (before, _, stability), *_ = outputs.values()
    print(
        f"\n### The trainer's gradient stage ({args.model}, {len(micro)} one-example {args.limit_task} micro-batches, "
        f"{n} modules, LoRA-One + diagnostics, steady state)\n"
    )
    print(
        "| stage | time (median) | vs previous | forward/backward passes over the data | largest relative A B "
        "difference to previous |"
    )
    print("| --- | --- | --- | --- | --- |")
    base = statistics.median(times[next(iter(times))])
    for name, out in outputs.items():
        factors = isinstance(out, lj.GradientFactors)
        unit = out.unit["lora-one"] if factors else out[0]
        gap = max(
            float(jnp.abs(unit[p]["a"] @ unit[p]["b"] - before[p]["a"] @ before[p]["b"]).max())
            / float(jnp.abs(before[p]["a"] @ before[p]["b"]).max())
            for p in before
        )
        passes = len(out.passes) if factors else 2  # the whole gradient, then the two halves: twice the data
        t = statistics.median(times[name])
        print(f"| {name} | {t:.2f} s | {t / base:.2f}x | {passes} | {gap:.1e} |")
    new = outputs[list(outputs)[1]].stability
    print(
        "stability, previous vs one pass: " + ", ".join(f"{k} {stability[k]:.3f} / {new[k]:.3f}" for k in sorted(new))
    )


def memory_section(args, model, params, config) -> None:
    """Peak memory of the step and of the init (compiled memory analysis) as the model grows."""
    models = [(args.model, model, abstract(params))]
    models += [(f"{n}, {args.layers} layers", *synthetic_model(n, args.layers)) for n in SYNTHETIC]
    print(
        f"\n## Memory as the model grows (compiled memory analysis; float32; batch {args.batch}x{args.mem_len} "
        f"with a 2-token answer; init: one-example micro-batches of {args.mem_len} tokens)\n"
    )
    print(
        "| model | params | step today | step, answer positions (+ chunks) | logits buffer today / new "
        "| init one pass | init streamed (passes) | bound: params + group + activations | streamed / bound |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    variants = {name: (pos, chunk, "none") for name, (pos, chunk) in STEP_PATHS.items()}
    for name, m, p in models:
        vocab = m.config.vocab_size
        batch = fake_batch(args.batch, args.mem_len, 2, vocab)
        steps = step_rows(m, p, config, batch, variants, 0, timed=False)
        init = init_memory(m, p, config, fake_batch(1, args.mem_len, 2, vocab), max_bytes=args.max_bytes)
        new, chunked = steps[NEW], steps["answer positions + vocab chunks of 8192"]
        print(
            f"| {name} | {init['params'] / MiB:.0f} MiB | {steps[TODAY]['peak'] / MiB:.0f} MiB "
            f"| {new['peak'] / MiB:.0f} ({chunked['peak'] / MiB:.0f}) MiB "
            f"| {'yes' if steps[TODAY]['logits_buffer'] else 'no'} / {'yes' if new['logits_buffer'] else 'no'} "
            f"| {init['one_pass'] / MiB:.0f} MiB | {init['streamed'] / MiB:.0f} MiB ({init['passes']}) "
            f"| {init['bound'] / MiB:.0f} MiB | {init['streamed'] / init['bound']:.2f} |"
        )


# ----------------------------------------------------------------------------- NNX against linen


@contextlib.contextmanager
def batched_adapter_products():
    """Within the block, steps traced by ``with_lora`` take the adapter products with the batch dimensions
    kept, ``(x @ a) @ b`` on ``(rows, length, d_in)`` (the library before it flattened them). Benchmark only."""
    from lora_one_jax import transform

    def batched(x, adapter, scale, *, dropout=0.0, rng=None):
        return scale * ((x.astype(adapter["a"].dtype) @ adapter["a"]) @ adapter["b"])

    flattened, transform.lora_delta = transform.lora_delta, batched
    try:
        yield
    finally:
        transform.lora_delta = flattened


def big_transposes(compiled, tokens: int) -> int:
    """Copies / transposes (fused or not) in the optimized HLO whose output is a (features, tokens) array."""
    return len(re.findall(rf"%\w*(?:copy|transpose)\w*(?:\.\d+)? = f32\[\d+,{tokens}\]", compiled.as_text()))


def products_section(args, model, params, tok, config) -> None:
    """The step with the adapters' products on flattened inputs (today) against batched ones (before)."""
    peak = matmul_peak()
    rows = tokenize(load_task(args.limit_task).train.select(range(args.batch)), tok, max_len=args.limit_max_len)
    rows = [{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows]
    batch = lj.with_loss_positions(pad_batch(rows, pad_id=pad_id_of(tok)))
    optimizer = optax.adamw(1e-4, weight_decay=0.0)
    make, layout = adapter_state(params, config, optimizer)
    full = {k: v for k, v in batch.items() if k != "loss_positions"}
    variants = {  # name: (batched products, batch)
        "before issue 18: batch dims kept, full logits": (True, full),
        "before: batch dims kept": (True, batch),
        "today: flattened (tokens, features)": (False, batch),
    }
    compiled, runs = {}, {}
    for name, (batched, b) in variants.items():
        with batched_adapter_products() if batched else contextlib.nullcontext():
            lowered = train_step(model, config, layout, optimizer).lower(params, *make(), b)
        compiled[name] = step = lowered.compile()
        state = list(make())

        def run(step=step, state=state, b=b):
            *state[:], loss = step(params, *state, b)
            jax.block_until_ready(loss)

        run()  # warm-up
        runs[name] = run
    tokens = int(np.prod(batch["input_ids"].shape))
    times = in_turns(runs, args.steps)
    shape = "x".join(map(str, batch["input_ids"].shape))
    print(f"\n## Adapter products: {args.model}, {args.limit_task} batch {shape} (answer positions), rank {args.rank}")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; float32 matmul peak here: {peak / 1e9:.0f} GFLOP/s\n")
    print("| adapter products | step time | GFLOP (XLA) | fraction of peak | (features, tokens) transposes |")
    print("| --- | --- | --- | --- | --- |")
    for name, step in compiled.items():
        flops = flops_of(step)
        rate = flops / times[name]
        print(
            f"| {name} | {times[name]:.3f} s | {flops / 1e9:.1f} | {rate / peak:.2f} | {big_transposes(step, tokens)} |"
        )
    before, today = times["before: batch dims kept"], times["today: flattened (tokens, features)"]
    first = times["before issue 18: batch dims kept, full logits"]
    print(f"\ntoday / before: {today / before:.3f}; today / before issue 18: {today / first:.3f} (target <= 0.85)")


def hlo_ops(compiled, names=("dot", "transpose", "copy", "fusion", "reduce", "broadcast")) -> dict[str, int]:
    """How often each op kind occurs in a compiled program's HLO text (a rough profile of what it runs)."""
    counts = dict.fromkeys(names, 0)
    for line in compiled.as_text().splitlines():
        m = re.search(r"=\s.*?\s([a-z][a-z0-9-]*)\(", line)
        if m and m.group(1) in counts:
            counts[m.group(1)] += 1
    return counts


def bytes_accessed(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("bytes accessed", float("nan")))


def lora_one_step(model, params, config, adapters, batch):
    """A compiled LoRA-One step (preconditioner + AdamW on stacked adapters, state donated) and its start state."""
    loss = lj.lora_loss_fn(model, config)
    stacked, layout = lj.stack_adapters(adapters)
    optimizer = lj.lora_one(1e-4)

    def step(base, stacked, opt_state, batch):
        value, grads = jax.value_and_grad(lambda s: loss(base, lj.unstack_adapters(s, layout), batch))(stacked)
        updates, opt_state = optimizer.update(grads, opt_state, stacked)
        return optax.apply_updates(stacked, updates), opt_state, value

    state = [jax.tree.map(jnp.copy, stacked), optimizer.init(stacked)]
    return jax.jit(step, donate_argnums=(1, 2)).lower(params, *state, batch).compile(), state


def in_turns(fns: dict, reps: int) -> dict[str, float]:
    """Median time of each function, run in turns (one call of each per round: a shared machine's load drifts
    evenly over them)."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def nnx_section(args, model, params, tok, config) -> None:
    """The LoRA-One step and the whole init on the same model through tunix's NNX Llama3 against linen."""
    nnx_model, nnx_params, _ = load_model(args.model, backend="nnx")
    rows = tokenize(load_task(args.task).train.select(range(args.examples)), tok, max_len=args.max_len)
    rows = [{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in rows]
    micro = [pad_batch([r], pad_id=pad_id_of(tok)) for r in rows]
    batch = pad_batch(rows, pad_id=pad_id_of(tok))
    sides = {"linen": (model, params), "nnx": (nnx_model, nnx_params)}
    losses = {name: lj.full_loss_fn(m) for name, (m, _) in sides.items()}  # one each: the compiled steps are reused

    def init(name):
        grads = lj.estimate_gradient(losses[name], sides[name][1], micro, config, progress=False)
        return jax.block_until_ready(lj.spectral_init(grads, config))

    first, adapters = {}, {}
    for name in sides:  # first calls, compiles included: each from an empty compilation cache
        jax.clear_caches()
        start = time.perf_counter()
        adapters[name] = init(name)
        first[name] = time.perf_counter() - start
    for name in sides:  # warm-up: the caches were cleared after the first side's first call
        init(name)
    steady = in_turns({name: lambda n=name: init(n) for name in sides}, args.reps)

    steps, compiled = {}, {}
    for name, (m, p) in sides.items():
        step, state = lora_one_step(m, p, config, adapters[name], batch)
        compiled[name] = step

        def run(step=step, state=state, p=p):
            *state[:], loss = step(p, *state, batch)
            jax.block_until_ready(loss)

        run()  # warm-up
        steps[name] = run
    step_s = in_turns(steps, args.steps)

    shape = "x".join(map(str, batch["input_ids"].shape))
    print(
        f"\n## NNX (tunix Llama3) against linen (HF FlaxLlama): {args.model}, {args.task} batch {shape}, "
        f"{len(micro)} one-example micro-batches for the init, rank {args.rank}, "
        f"{len(lj.find_targets(params, config))} adapted matrices"
    )
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); medians, run in turns\n")
    print("| what | linen | nnx | nnx / linen | target <= 1.1 |\n| --- | --- | --- | --- | --- |")
    for what, row in (
        ("training step, LoRA-One (steady)", step_s),
        ("whole init: gradient + randomized SVD (steady)", steady),
        ("whole init, first call (with compiles)", first),
    ):
        ratio = row["nnx"] / row["linen"]
        verdict = "met" if ratio <= 1.1 else "missed"
        print(f"| {what} | {row['linen']:.3f} s | {row['nnx']:.3f} s | {ratio:.3f} | {verdict} |")
    gap = max(
        float(jnp.abs(a["a"] @ a["b"] - b["a"] @ b["b"]).max() / jnp.abs(b["a"] @ b["b"]).max())
        for a, b in ((adapters["nnx"][p], adapters["linen"][tunix_name(p)]) for p in adapters["nnx"])
    )
    print(f"\n(the two inits' adapters: largest relative |A B| difference {gap:.1e})")
    print("\n### The compiled step (XLA cost analysis, HLO op counts)\n")
    ops = {name: hlo_ops(c) for name, c in compiled.items()}
    print("| | GFLOP | GB accessed | " + " | ".join(ops["linen"]) + " |")
    print("| --- " * (3 + len(ops["linen"])) + "|")
    for name, c in compiled.items():
        counts = " | ".join(str(v) for v in ops[name].values())
        print(f"| {name} | {flops_of(c) / 1e9:.2f} | {bytes_accessed(c) / 1e9:.2f} | {counts} |")


def tunix_name(path: str) -> str:
    from lora_one_jax.models.tunix import hf_name

    return hf_name(path)


# ----------------------------------------------------------------------------- report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections",
        default="limit,memory,compare",
        help="comma-separated: limit, memory, compare, nnx, stage, products",
    )
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
    parser.add_argument("--json", help="also write the compare section's numbers to this file")
    limit = parser.add_argument_group("limit and memory sections")
    limit.add_argument("--limit-task", default="tweet-sentiment", help="the step's batch (the default run's task)")
    limit.add_argument("--limit-max-len", type=int, default=64)
    limit.add_argument("--batch", type=int, default=8, help="rows of the training step's batch")
    limit.add_argument("--remat-rows", type=int, default=4)
    limit.add_argument("--remat-len", type=int, default=512, help="sequence length of the remat comparison")
    limit.add_argument("--kernels-per-pass", type=int, default=90, help="streamed init timing: kernels per pass")
    limit.add_argument("--layers", type=int, default=2, help="layers of the synthetic 1B/7B-width stacks")
    limit.add_argument("--mem-len", type=int, default=512, help="sequence length of the memory table")
    limit.add_argument("--max-bytes", type=int, default=256 * MiB, help="streamed init: gradient bytes per pass")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    unknown = sections - {"limit", "memory", "compare", "nnx", "stage", "products"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from limit, memory, compare, nnx, stage, products")

    meter = Meter()
    with meter.phase("load model"):
        model, params, tok = load_model(args.model)
    config = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    if "limit" in sections:
        limit_section(args, model, params, tok, config)
    if "memory" in sections:
        memory_section(args, model, params, config)
    if "compare" in sections:
        compare_section(args, meter, model, params, tok, config)
    if "nnx" in sections:
        nnx_section(args, model, params, tok, config)
    if "stage" in sections:
        stage_section(args, model, params, tok, config)
    if "products" in sections:
        products_section(args, model, params, tok, config)


def compare_section(args, meter, model, params, tok, config) -> None:
    """Our init and step against plain LoRA, PyTorch + PEFT and the official recipe (the first speed study)."""
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
