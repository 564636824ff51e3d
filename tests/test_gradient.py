"""estimate_gradient against jax.grad of the mean loss over the concatenated batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_one_jax as lj

VOCAB, D, H = 11, 8, 12


def make_params(seed=0, dtype=jnp.float32):
    k = iter(jax.random.split(jax.random.key(seed), 8))
    return {
        "embed": {"embedding": jax.random.normal(next(k), (VOCAB, D))},
        "mlp": {
            "up": {"kernel": jax.random.normal(next(k), (D, H), dtype) / 3, "bias": jax.random.normal(next(k), (H,))},
            # stored (d_out, d_in), like GPT-2's Conv1D
            "down": {"kernel": jax.random.normal(next(k), (D, H), dtype) / 3},
        },
        "norm": {"scale": jnp.ones((D,))},
        "lm_head": {"kernel": jax.random.normal(next(k), (D, VOCAB))},
        "step": jnp.zeros((), jnp.int32),  # an integer leaf: differentiating it would raise
    }


CFG = lj.LoraConfig(rank=2, targets=["up", "down"], transposed_kernels=["down"])


def loss_fn(params, batch):
    """Per-token mean cross-entropy of a tiny residual MLP language model."""
    x = params["embed"]["embedding"][batch["ids"]]
    h = jax.nn.gelu(x @ params["mlp"]["up"]["kernel"].astype(jnp.float32) + params["mlp"]["up"]["bias"])
    x = x + h @ params["mlp"]["down"]["kernel"].astype(jnp.float32).T
    x = x * params["norm"]["scale"]
    logp = jax.nn.log_softmax(x @ params["lm_head"]["kernel"])
    return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][..., None], -1))


def make_batches(n, bsz=3, seq=5, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "ids": jnp.asarray(rng.integers(0, VOCAB, (bsz, seq))),
            "labels": jnp.asarray(rng.integers(0, VOCAB, (bsz, seq))),
        }
        for _ in range(n)
    ]


def test_equals_grad_of_concatenated_batch():
    params, batches = make_params(), make_batches(4)
    g = lj.estimate_gradient(loss_fn, params, batches, CFG, progress=False)
    assert sorted(g) == ["mlp/down", "mlp/up"]
    big = jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches)
    ref = jax.jit(jax.grad(lambda k: loss_fn({**params, "mlp": k}, big)))(
        {name: dict(m) for name, m in params["mlp"].items()}
    )
    np.testing.assert_allclose(g["mlp/up"], ref["up"]["kernel"], rtol=1e-5, atol=1e-7)
    # transposed kernel: stored (d_out, d_in) = (8, 12), gradient returned as (d_in, d_out) = (12, 8)
    assert g["mlp/down"].shape == (H, D)
    np.testing.assert_allclose(g["mlp/down"], ref["down"]["kernel"].T, rtol=1e-5, atol=1e-7)
    assert all(v.dtype == jnp.float32 for v in g.values())


def test_unequal_batches_average_per_batch_means():
    params = make_params()
    batches = make_batches(1, bsz=2) + make_batches(1, bsz=4, seed=1)
    g = lj.estimate_gradient(loss_fn, params, iter(batches), CFG, progress=False)  # a plain iterator works
    grad_up = jax.jit(
        jax.grad(
            lambda k, b: loss_fn({**params, "mlp": {**params["mlp"], "up": {**params["mlp"]["up"], "kernel": k}}}, b)
        )
    )
    per = [grad_up(params["mlp"]["up"]["kernel"], b) for b in batches]
    np.testing.assert_allclose(g["mlp/up"], (per[0] + per[1]) / 2, rtol=1e-5, atol=1e-7)


def test_bfloat16_kernels_accumulate_in_float32():
    params = make_params(dtype=jnp.bfloat16)
    g = lj.estimate_gradient(loss_fn, params, make_batches(2), CFG, progress=False)
    assert g["mlp/up"].dtype == jnp.float32 and bool(jnp.isfinite(g["mlp/up"]).all())


def test_one_trace_for_all_batches():
    traces = []

    def counting_loss(params, batch):
        traces.append(1)  # runs only while tracing
        return loss_fn(params, batch)

    lj.estimate_gradient(counting_loss, make_params(), make_batches(5), CFG, progress=False)
    assert len(traces) == 1


def poisoned_loss(params, batch):
    """NaN/Inf in batch["poison"] reaches the gradient of 'mlp/up' only (the sum of grads of a sum)."""
    return loss_fn(params, batch) + 1e-3 * jnp.sum(params["mlp"]["up"]["kernel"].astype(jnp.float32) * batch["poison"])


def with_poison(batches, bad: dict):
    return [{**b, "poison": jnp.float32(bad.get(i, 1.0))} for i, b in enumerate(batches)]


def test_nan_names_module_and_batch():
    batches = with_poison(make_batches(4), {2: jnp.nan})
    with pytest.raises(FloatingPointError, match=r"module 'mlp/up' in micro-batch 2") as err:
        lj.estimate_gradient(poisoned_loss, make_params(), batches, CFG, progress=False)
    assert "mlp/down" not in str(err.value)  # its gradient stayed finite


def test_last_batch_inf_and_empty():
    with pytest.raises(FloatingPointError, match="micro-batch 1"):
        lj.estimate_gradient(
            poisoned_loss, make_params(), with_poison(make_batches(2), {1: jnp.inf}), CFG, progress=False
        )
    with pytest.raises(ValueError, match="empty"):
        lj.estimate_gradient(loss_fn, make_params(), [], CFG, progress=False)


def test_progress_bar(capsys):
    lj.estimate_gradient(loss_fn, make_params(), make_batches(2), CFG)
    assert "gradient estimate" in capsys.readouterr().err


def test_micro_batches_of_several_lengths_compile_once_and_padding_is_exact(compiles):
    from lora_one_jax.data import pad_batch
    from lora_one_jax.models import toy_llama

    model, params, _ = toy_llama(num_hidden_layers=1, seed=4)
    config = lj.LoraConfig(rank=2, targets=["q_proj", "down_proj"])
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(3, 250, size=n).tolist(), "prompt_len": n // 2} for n in (5, 9, 7, 12, 6)]
    micro = [pad_batch([r], pad_id=0) for r in rows]  # one example each, natural lengths 5..12
    assert len({m["input_ids"].shape for m in micro}) == 5
    loss = lj.full_loss_fn(model)
    with compiles as c:
        g = lj.estimate_gradient(loss, params, micro, config, micro_batches_per_step=2, progress=False)
    assert c.count == 1, "5 lengths, chunks of 2 (the last one filled): one compiled step"
    with compiles as c:
        lj.estimate_gradient(loss, params, micro, config, micro_batches_per_step=2, progress=False)
    assert c.count == 0, "the same loss function again: nothing new to compile"
    # reference: each micro-batch unpadded, on its own (jitted per length: eager dispatch took 30 s), plain mean
    layer = params["model"]["layers"]["0"]

    def q_grad(kernel, batch):
        attn = {**layer["self_attn"], "q_proj": {"kernel": kernel}}
        model_params = {**params["model"], "layers": {"0": {**layer, "self_attn": attn}}}
        return loss({**params, "model": model_params}, batch)

    grad_q = jax.jit(jax.grad(q_grad))
    per = [grad_q(layer["self_attn"]["q_proj"]["kernel"], m) for m in micro]
    np.testing.assert_allclose(g["model/layers/0/self_attn/q_proj"], np.mean(per, axis=0), rtol=2e-4, atol=1e-7)


def test_micro_batch_padding_rules():
    from lora_one_jax.gradient import pad_micro_batches

    a = {"ids": np.ones((1, 3)), "labels": np.ones((1, 3))}
    b = {"ids": np.ones((1, 5)), "labels": np.ones((1, 5))}
    assert pad_micro_batches([a, b]) == [a, b]  # no mask: nothing makes padding exact, left alone
    with pytest.raises(ValueError, match="differ in structure"):
        pad_micro_batches([a, {"ids": np.ones((1, 3))}])
