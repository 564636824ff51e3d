"""LoRA-One on Flax NNX models: tunix Llama 3 / Qwen 3 / Gemma 3 (tiny random) and SmolLM2 through NNX."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_one_jax as lj
from tests.families import feature_token_copies

tunix = pytest.importorskip("lora_one_jax.models.tunix")
pytest.importorskip("tunix")

FAMILIES = ("llama3", "qwen3", "gemma3")
TORCH = {"llama3": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def _batch(seed=0, shape=(2, 8), vocab=64, pad=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    if pad:
        mask[0, -pad:] = 0
    loss = mask.astype(np.float32)
    loss[:, 0] = 0.0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss, "position_ids": positions}


def _random_adapters(adapters, seed=1, std=0.1):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, params = tunix.toy_tunix(request.param)
    return request.param, model, params


def test_import_stays_light():
    code = "import sys, lora_one_jax; print(json.dumps([m for m in ('tunix', 'transformers') if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_tunix_leaves_flax_flags_alone():
    code = (
        "import flax; before = flax.config.flax_always_shard_variable\n"
        "from lora_one_jax.models import tunix\n"
        "tunix.toy_tunix('llama3'); tunix.import_tunix('qwen3')\n"
        "import tunix.models.llama3.model\n"
        "print(before, flax.config.flax_always_shard_variable)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_einsum_kernels_are_matrices(family):
    name, model, params = family
    targets = lj.find_targets(params, lj.LoraConfig(rank=2))
    ks = lj.nnx.kernels(params)
    for path, t in targets.items():
        shape = ks[path].shape
        assert t.d_in * t.d_out == np.prod(shape)
        assert t.d_in == np.prod([shape[i] for i in ks[path].in_axes])
    q = "layers/0/attn/" + ("q_einsum" if name == "gemma3" else "q_proj")
    assert (targets[q].d_in, targets[q].d_out) == (32, 32)  # (D) x (N * H)


def test_with_lora_equals_merged_model(family):
    name, model, params = family
    cfg = lj.LoraConfig(rank=2, alpha=4.0, targets="all-linear")
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    adapters = _random_adapters(adapters)
    batch = _batch()
    inputs = lj.nnx.tunix_inputs(batch)
    before = jax.tree.map(np.asarray, nnx.split(model, nnx.Param)[1])
    out = lj.nnx.logits_of(jax.jit(lj.with_lora(model, cfg))(params, adapters, *inputs))
    merged = lj.merge(params, adapters, cfg)
    forward = jax.jit(lj.nnx.nnx_forward(model))
    reference, base = forward(merged, batch), forward(params, batch)
    assert _rel(out, reference) < 1e-5
    assert _rel(out, base) > 1e-3  # the adapters do change the output
    after = jax.tree.map(np.asarray, nnx.split(model, nnx.Param)[1])
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))  # not mutated
    restored = jax.tree.leaves(lj.unmerge(merged, adapters, cfg))
    assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(restored, jax.tree.leaves(params)))


def test_adapter_gradients_follow_the_chain_rule(family):
    name, model, params = family
    cfg = lj.LoraConfig(rank=2, alpha=4.0)
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    adapters = _random_adapters(adapters)
    batch = _batch(pad=3)
    grads = jax.jit(jax.grad(lj.lora_loss_fn(model, cfg), argnums=1))(params, adapters, batch)
    g_full = lj.estimate_gradient(lj.full_loss_fn(model), lj.merge(params, adapters, cfg), [batch], cfg, progress=False)
    targets = lj.find_targets(params, cfg)
    for path, ad in adapters.items():
        s, g = targets[path].scale, g_full[path]
        assert _rel(grads[path]["a"], s * g @ ad["b"].T) < 1e-4, path
        assert _rel(grads[path]["b"], s * ad["a"].T @ g) < 1e-4, path


def test_adapter_gradients_need_no_transposed_activations(family):
    """As for linen (tests/test_transform.py): the adapters' backward works on (tokens, features) views, so XLA
    makes no (features, tokens) copy of an adapted layer's input or output gradient beyond those the model's
    own forward makes (Gemma 3's fused kv einsum has two)."""
    name, model, params = family
    cfg = lj.LoraConfig(rank=2, alpha=4.0, targets="all-linear")
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    batch = _batch(shape=(2, 11))  # 22 tokens: no width or head size of the toy models
    tokens = int(np.prod(batch["input_ids"].shape))
    widths = {w for t in lj.find_targets(params, cfg).values() for w in (t.d_in, t.d_out)}

    loss = lj.lora_loss_fn(model, cfg)
    grads = feature_token_copies(
        jax.grad(loss, argnums=1), params, _random_adapters(adapters), batch, tokens=tokens, widths=widths
    )
    forward = feature_token_copies(lj.full_loss_fn(model), params, batch, tokens=tokens, widths=widths)
    assert widths and len(grads) <= len(forward), (grads, forward)


def test_every_method_initialises(family):
    name, model, params = family
    cfg = lj.LoraConfig(rank=2, targets="all-linear")
    loss_fn = lj.full_loss_fn(model)
    grads = lj.estimate_gradient(loss_fn, params, [_batch(0), _batch(1)], cfg, progress=False)
    batch = _batch(2)
    base_loss = jax.jit(loss_fn)(params, batch)
    lora_loss = jax.jit(lj.lora_loss_fn(model, cfg))
    for method in ("lora", "lora-one", "pissa", "lora-ga"):
        kwargs = {"grads": grads} if method in ("lora-one", "lora-ga") else {}
        base, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0), method=method, **kwargs)
        loss = lora_loss(base, adapters, batch)
        assert np.isfinite(float(loss)), method
        if method in ("pissa", "lora-ga"):  # residual base + adapters = the original model
            assert abs(float(loss) - float(base_loss)) < 1e-4, method
    adapters = lj.spectral_init(grads, cfg, gamma=1.0)
    path = sorted(grads)[0]
    product = adapters[path]["a"] @ adapters[path]["b"]
    best = lj.best_rank(-grads[path], 2)
    assert _rel(product, best / np.linalg.norm(np.asarray(grads[path]), 2)) < 1e-4


def test_all_linear_selects_what_peft_selects(family):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers as tf

    name, model, params = family
    ours = set()
    for path in lj.find_targets(params, lj.LoraConfig(rank=2)):
        ours.update(tunix.hf_modules(path))
    c = model.config
    sizes = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
    )
    config_cls = {"llama3": tf.LlamaConfig, "qwen3": tf.Qwen3Config, "gemma3": tf.Gemma3TextConfig}[name]
    torch.manual_seed(0)
    torch_model = getattr(tf, TORCH[name])(config_cls(**sizes, tie_word_embeddings=False))
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {
        n.removeprefix("base_model.model.").replace(".", "/")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert c.num_layers == 2 and ours == theirs


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_peft_export_loads_in_pytorch_with_the_same_logits(name, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers as tf

    from lora_one_jax.export import save_peft

    model, params = tunix.toy_tunix(name)
    config_cls = {"llama3": tf.LlamaConfig, "qwen3": tf.Qwen3Config}[name]
    torch_model = getattr(tf, TORCH[name])(
        config_cls(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=64,
            rope_theta=10_000,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            attention_bias=False,
        )
    ).eval()
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in tunix.hf_state_dict(params).items()})
    cfg = lj.LoraConfig(rank=2, alpha=4.0, targets="all-linear")
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    adapters = _random_adapters(adapters)
    batch = _batch(shape=(1, 8))
    ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
    with torch.no_grad():
        base_torch = torch_model(ids).logits.numpy()
    assert _rel(base_torch, lj.nnx.nnx_forward(model)(params, batch)) < 1e-4  # same base model (rope fixed)
    folder = save_peft(tmp_path / "peft", tunix.to_hf_adapters(adapters), cfg)
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(folder)).eval()
    with torch.no_grad():
        lora_torch = peft_model(ids).logits.numpy()
    ours = lj.nnx.logits_of(lj.with_lora(model, cfg)(params, adapters, *lj.nnx.tunix_inputs(batch)))
    assert _rel(lora_torch, ours) < 1e-4
    assert _rel(lora_torch, base_torch) > 1e-3
    back, back_cfg = tunix.load_peft_nnx(folder)
    assert sorted(back) == sorted(adapters) and sorted(lj.find_targets(params, back_cfg)) == sorted(adapters)
    merged_folder = tunix.save_pretrained_nnx(tmp_path / "merged", model, lj.merge(params, adapters, cfg))
    with torch.no_grad():
        merged_torch = tf.AutoModelForCausalLM.from_pretrained(merged_folder).eval()(ids).logits.numpy()
    assert _rel(merged_torch, ours) < 1e-4
    assert all(
        np.allclose(back[p]["a"], adapters[p]["a"]) and np.allclose(back[p]["b"], adapters[p]["b"]) for p in back
    )


def test_rope_theta_is_honoured():
    from lora_one_jax.models import toy_llama

    linen, linen_params, _ = toy_llama(rope_theta=100_000.0, hidden_size=64, num_attention_heads=4)
    model, params = tunix.tunix_from_linen(linen.config, linen_params)
    assert model.config.rope_theta == 100_000.0
    batch = _batch(vocab=200, shape=(2, 12), pad=2)
    reference = linen(
        jnp.asarray(batch["input_ids"]),
        attention_mask=jnp.asarray(batch["attention_mask"]),
        position_ids=jnp.asarray(batch["position_ids"]),
        params=linen_params,
    ).logits
    ours = lj.nnx.nnx_forward(model)(params, batch)
    keep = np.asarray(batch["attention_mask"], bool)
    assert _rel(np.asarray(ours)[keep], np.asarray(reference)[keep]) < 1e-5


def test_what_cannot_be_adapted_says_why():
    with pytest.raises(ValueError, match="batch axis"):
        lj.nnx.einsum_in_axes("BNT,NTD->BND", 3)

    class Two(nnx.Module):
        def __init__(self):
            self.proj = nnx.Einsum("btd,dnh->btnh", (4, 2, 3), rngs=nnx.Rngs(0))

    model = Two()
    _, plain, _ = nnx.split(model, nnx.Param, ...)
    with pytest.raises(ValueError, match="nnx_split"):
        lj.find_targets(plain, lj.LoraConfig(rank=1, targets=["proj"]))
    _, params, _ = lj.nnx_split(model)
    assert lj.find_targets(params, lj.LoraConfig(rank=1, targets=["proj"]))["proj"][:2] == (4, 6)
    with pytest.raises(TypeError, match="nnx.Param state"):
        lj.with_lora(model, lj.LoraConfig(rank=1, targets=["proj"]))({"params": {}}, {}, jnp.ones((1, 2, 4)))


@pytest.mark.slow
def test_smollm2_through_nnx_equals_linen():
    from lora_one_jax.models import load_model

    linen, linen_params, tok = load_model("smollm2-135m")
    model, params = tunix.tunix_from_linen(linen.config, linen_params)
    texts = ["The capital of France is Paris.", "2 + 2 = 4, and 3 + 3 = 6.", "Hello there!", "LoRA-One in JAX."]
    batches = []
    for text in texts:
        ids = np.asarray([tok(text).input_ids], np.int32)
        mask = np.ones_like(ids)
        loss = np.ones(ids.shape, np.float32)
        loss[:, 0] = 0
        positions = np.cumsum(mask, -1) - 1
        batches.append({"input_ids": ids, "attention_mask": mask, "loss_mask": loss, "position_ids": positions})
    cfg = lj.LoraConfig(rank=8, targets=["q_proj", "o_proj", "down_proj"], exclude=r".*layers/([3-9]|\d\d)/.*")
    linen_loss, nnx_loss = lj.full_loss_fn(linen), lj.full_loss_fn(model)
    a, b = float(linen_loss(linen_params, batches[0])), float(nnx_loss(params, batches[0]))
    assert abs(a - b) / a < 1e-4
    g_linen = lj.estimate_gradient(linen_loss, linen_params, batches, cfg, progress=False)
    g_nnx = lj.estimate_gradient(nnx_loss, params, batches, cfg, progress=False)
    ad_linen = lj.spectral_init(g_linen, cfg, svd="exact")
    ad_nnx = lj.spectral_init(g_nnx, cfg, svd="exact")
    for path, ad in ad_nnx.items():
        linen_path = tunix.hf_name(path)
        assert _rel(ad["a"] @ ad["b"], ad_linen[linen_path]["a"] @ ad_linen[linen_path]["b"]) < 1e-3, path


def test_sharded_over_a_tunix_mesh_and_inside_set_mesh():
    from jax.sharding import Mesh

    from lora_one_jax.sharding import adapter_specs, make_mesh, shard_params

    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated devices conftest.py sets up")
    mesh = Mesh(
        np.asarray(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    model, params = tunix.toy_tunix("llama3", num_layers=4)
    sharded = shard_params(params, mesh)
    q = sharded["layers"][0]["attn"]["q_proj"]["w"].get_value()
    assert tuple(q.sharding.spec) == ("fsdp", "tp") and not q.sharding.is_fully_replicated
    cfg = lj.LoraConfig(rank=2)
    specs = adapter_specs(sharded, cfg, (), mesh)
    assert specs["layers/0/attn/q_proj"] == {"a": jax.P("fsdp"), "b": jax.P(None, "tp")}
    assert specs["layers/0/attn/o_proj"] == {"a": jax.P("tp"), "b": jax.P(None, "fsdp")}
    batches = [_batch(seed) for seed in range(4)]
    loss_fn = lj.full_loss_fn(model)
    g_one = lj.estimate_gradient(loss_fn, params, batches, cfg, progress=False)
    g_mesh = lj.estimate_gradient(loss_fn, sharded, batches, cfg, progress=False)
    assert not g_mesh["layers/0/mlp/up_proj"].sharding.is_fully_replicated
    for path in g_one:
        assert _rel(g_mesh[path], g_one[path]) < 1e-4, path
    one = lj.spectral_init(g_one, cfg, svd="exact")
    runs = {"tunix mesh": lj.spectral_init(g_mesh, cfg, svd="exact")}
    ours = make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        runs["tunix mesh, set_mesh"] = lj.spectral_init(g_mesh, cfg, svd="exact")
    g_ours = {p: jax.device_put(g, jax.NamedSharding(ours, jax.P("fsdp", "tensor"))) for p, g in g_one.items()}
    with jax.set_mesh(ours):
        runs["make_mesh(2, 2, 2), set_mesh"] = lj.spectral_init(g_ours, cfg, svd="exact")
    for name, adapters in runs.items():
        for path, ad in adapters.items():
            assert _rel(ad["a"] @ ad["b"], one[path]["a"] @ one[path]["b"]) < 1e-3, (name, path)


def test_with_lora_under_remat_and_dropout():
    lm = tunix.import_tunix("llama3")
    model, params = tunix.toy_tunix("llama3", num_layers=1, remat_config=lm.RematConfig.BLOCK)
    cfg = lj.LoraConfig(rank=2, alpha=4.0, dropout=0.5, targets=["q_proj", "down_proj"])
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    adapters = _random_adapters(adapters)
    batch = _batch()
    loss = jax.jit(lj.lora_loss_fn(model, cfg))
    merged = jax.jit(lj.full_loss_fn(model))(lj.merge(params, adapters, cfg), batch)
    assert abs(float(loss(params, adapters, batch)) - float(merged)) < 1e-5  # no lora_rng: no dropout
    dropped = [float(loss(params, adapters, batch, jax.random.key(k))) for k in (0, 1)]
    assert dropped[0] != dropped[1] and all(abs(d - float(merged)) > 1e-6 for d in dropped)
    grads = jax.jit(jax.grad(lj.lora_loss_fn(model, cfg), argnums=1))(params, adapters, batch)
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


def test_an_adapter_whose_layer_does_not_run_is_an_error():
    class Skip(nnx.Module):
        def __init__(self):
            self.used = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.unused = nnx.Linear(4, 4, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.used(x)

    model = Skip()
    _, params, _ = lj.nnx_split(model)
    cfg = lj.LoraConfig(rank=1, targets=".*")
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unused.*never applied"):
        lj.with_lora(model, cfg)(params, adapters, jnp.ones((1, 4)))


def test_qwen3_folder_loads_into_tunix(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers as tf

    from lora_one_jax.models import load_model

    torch.manual_seed(0)
    config = tf.Qwen3Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        rope_theta=100_000.0,
        tie_word_embeddings=False,
    )
    torch_model = tf.Qwen3ForCausalLM(config).eval()
    torch_model.save_pretrained(tmp_path / "qwen3")
    model, params, _ = load_model(tmp_path / "qwen3", backend="nnx")
    assert type(model).__name__ == "Qwen3" and model.config.rope_theta == 100_000.0
    batch = _batch(shape=(1, 8))
    with torch.no_grad():
        reference = torch_model(torch.tensor(np.asarray(batch["input_ids"], np.int64))).logits.numpy()
    assert _rel(lj.nnx.nnx_forward(model)(params, batch), reference) < 1e-4
    roundtrip = tunix.hf_state_dict(params)
    assert all(np.allclose(roundtrip[k], v.numpy(), atol=1e-6) for k, v in torch_model.state_dict().items())


# ----------------------------------------------------------------------------- greedy generation through NNX


def _nnx_greedy_reference(model, params, prompt_ids, n):
    """Greedy tokens recomputing the whole prefix each step (no cache, no padding): an independent reference."""
    forward = jax.jit(lj.nnx.nnx_forward(model))
    ids = list(prompt_ids)
    for _ in range(n):
        logits = forward(params, {"input_ids": np.asarray([ids], np.int32)})
        ids.append(int(np.asarray(logits)[0, -1].argmax()))
    return ids[len(prompt_ids) :]


PROMPTS = ["Hi", "2+2=", "The capital of France is", "Once upon a time there was a"]


def test_nnx_greedy_generation_equals_linen_with_and_without_adapters():
    from lora_one_jax.eval import Evaluator
    from lora_one_jax.models import toy_llama

    linen, linen_params, tok = toy_llama()
    model, params = tunix.tunix_from_linen(linen.config, linen_params)
    cfg = lj.LoraConfig(rank=2, alpha=4.0, targets="all-linear")
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    adapters = _random_adapters(adapters, std=0.3)
    ours, theirs = Evaluator(model, tok, cfg, batch_size=3), Evaluator(linen, tok, cfg, batch_size=3)  # a filler row
    out = {}
    for name, nnx_ad, linen_ad in (("base", None, None), ("lora", adapters, tunix.to_hf_adapters(adapters))):
        out[name] = ours.generate_ids(params, nnx_ad, PROMPTS, max_new_tokens=6, progress=False)
        np.testing.assert_array_equal(
            out[name], theirs.generate_ids(linen_params, linen_ad, PROMPTS, max_new_tokens=6, progress=False)
        )
        assert ours.generate(params, nnx_ad, PROMPTS, max_new_tokens=6, progress=False) == theirs.generate(
            linen_params, linen_ad, PROMPTS, max_new_tokens=6, progress=False
        )
    assert (out["base"] != out["lora"]).any()  # the adapters change what is generated
    merged = lj.merge(params, adapters, cfg)
    prompt = tok(PROMPTS[2], add_special_tokens=False)["input_ids"]
    assert out["lora"][2].tolist() == _nnx_greedy_reference(model, merged, prompt, 6)


@pytest.mark.parametrize("name", [*FAMILIES, "qwen2"])
def test_nnx_greedy_generation_with_tunix_cache_equals_recomputation(name):
    from lora_one_jax.eval import Evaluator
    from lora_one_jax.models import toy_tokenizer

    tok = toy_tokenizer()
    vocab = {"num_embed": len(tok)} if name == "gemma3" else {"vocab_size": len(tok)}
    model, params = tunix.toy_tunix(name, std=0.3, **vocab)  # gemma3: sliding window 4, shorter than the prompts
    new = Evaluator(model, tok, batch_size=2).generate_ids(params, None, PROMPTS, max_new_tokens=5, progress=False)
    for row, text in zip(new, PROMPTS):
        assert row.tolist() == _nnx_greedy_reference(model, params, tok(text, add_special_tokens=False)["input_ids"], 5)


# ----------------------------------------------------------------------------- Qwen 2.5 and Gemma 3 folders


def _torch_folder(tmp_path, name, config):
    torch = pytest.importorskip("torch")
    import transformers as tf

    torch.manual_seed(0)
    torch_model = getattr(tf, name)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases (transformers initialises them to 0 / 1)
        for key, value in torch_model.state_dict().items():
            if value.ndim == 1:
                value.copy_(
                    0.3 * torch.randn_like(value) + (1.0 if "norm" in key and "gemma" not in name.lower() else 0)
                )
    torch_model.save_pretrained(tmp_path / name)
    return torch_model, tmp_path / name


def _torch_logits(torch_model, ids):
    import torch

    with torch.no_grad():
        return torch_model(torch.tensor(np.asarray(ids, np.int64))).logits.numpy()


def test_qwen2_folder_loads_into_tunix(tmp_path):
    import transformers as tf

    from lora_one_jax.models import load_model

    config = tf.Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        rope_theta=100_000.0,
        tie_word_embeddings=True,
    )
    torch_model, folder = _torch_folder(tmp_path, "Qwen2ForCausalLM", config)
    model, params, _ = load_model(folder, backend="nnx")
    assert type(model).__name__ == "Qwen2"
    assert np.abs(np.asarray(params["layers"][0]["attn"]["q_bias"].get_value())).max() > 0.1  # the biases are read
    batch = _batch(shape=(1, 8))
    assert _rel(lj.nnx.nnx_forward(model)(params, batch), _torch_logits(torch_model, batch["input_ids"])) < 1e-4
    roundtrip = tunix.hf_state_dict(params)
    expected = {k: v for k, v in torch_model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(roundtrip) == set(expected)
    assert all(np.allclose(roundtrip[k], v.numpy(), atol=1e-6) for k, v in expected.items())
    merged = tunix.save_pretrained_nnx(tmp_path / "merged", model, params)  # a merged export loads in PyTorch
    again = tf.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert _rel(_torch_logits(again, batch["input_ids"]), _torch_logits(torch_model, batch["input_ids"])) < 1e-6


@pytest.mark.parametrize("kv_heads", [2, 4, 1])  # 2: q_einsum + kv_einsum; 4: the fused qkv_einsum; 1: MQA (1B / 270M)
def test_gemma3_folder_loads_into_tunix(tmp_path, kv_heads):
    import transformers as tf

    from lora_one_jax.models import load_model

    config = tf.Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=7,  # layer 5 is global, the others slide
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        vocab_size=64,
        rope_theta=100_000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    torch_model, folder = _torch_folder(tmp_path, "Gemma3ForCausalLM", config)
    model, params, _ = load_model(folder, backend="nnx")
    assert type(model).__name__ == "Gemma3" and model.config.global_scale_factor == 2.0
    batch = _batch(shape=(1, 12))  # longer than the sliding window
    assert _rel(lj.nnx.nnx_forward(model)(params, batch), _torch_logits(torch_model, batch["input_ids"])) < 1e-4
    roundtrip = tunix.hf_state_dict(params)
    expected = {k: v for k, v in torch_model.state_dict().items() if k != "lm_head.weight"}
    assert set(roundtrip) == set(expected)
    assert all(np.allclose(roundtrip[k], v.numpy(), atol=1e-6) for k, v in expected.items())


def test_gemma3_configs_tunix_cannot_express_are_refused():
    import transformers as tf

    base = dict(num_hidden_layers=6, head_dim=8, query_pre_attn_scalar=8)
    for bad in ({"final_logit_softcapping": 30.0}, {"query_pre_attn_scalar": 5}, {"rms_norm_eps": 1e-5}):
        with pytest.raises(NotImplementedError, match=next(iter(bad))):
            tunix.gemma3_config_from_hf(tf.Gemma3TextConfig(**{**base, **bad}))
    with pytest.raises(NotImplementedError, match="layer_types"):
        tunix.gemma3_config_from_hf(tf.Gemma3TextConfig(**base, layer_types=["full_attention"] * 6))


# ----------------------------------------------------------------------------- qwix hand-off


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma3"])
def test_to_qwix_carries_the_adapters_into_qwix_lora_params(name):
    pytest.importorskip("qwix")
    model, params = tunix.toy_tunix(name)
    cfg = lj.LoraConfig(rank=2, alpha=4.0, rslora=True, targets="all-linear", rank_pattern=((r".*mlp.*", 3),))
    _, adapters = lj.init_adapters(params, cfg, key=jax.random.key(0))
    adapters = _random_adapters(adapters)
    q = tunix.to_qwix(model, params, adapters, cfg)
    batch = _batch()
    inputs = lj.nnx.tunix_inputs(batch)
    ours = lj.nnx.logits_of(lj.with_lora(model, cfg)(params, adapters, *inputs))
    theirs = lj.nnx.logits_of(q(*inputs))
    assert _rel(theirs, ours) < 1e-5
    assert _rel(ours, lj.nnx.nnx_forward(model)(params, batch)) > 1e-3  # the adapters matter
    lora = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.state(q, nnx.LoRAParam).flat_state()}
    assert len(lora) == 2 * len(adapters)
    for path, ad in adapters.items():
        w = "kernel" if "mlp" in path else "w"
        np.testing.assert_array_equal(lora[f"{path}/{w}_lora_a"].reshape(ad["a"].shape), ad["a"])
        np.testing.assert_array_equal(lora[f"{path}/{w}_lora_b"].reshape(ad["b"].shape), ad["b"])
    assert not nnx.state(model, nnx.LoRAParam).flat_state()  # the model passed in is not changed
