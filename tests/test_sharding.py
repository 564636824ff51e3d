"""Scale-out on 8 simulated CPU devices (conftest sets them): meshes 8x1x1 and 2x2x2 give the 1-device results,
with the shardings asserted; checkpoints move between meshes; two local processes equal one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_one_jax as lj
from lora_one_jax.data import pad_batch
from lora_one_jax.export import load_adapters
from lora_one_jax.models import load_model
from lora_one_jax.sharding import (
    LLAMA_RULES,
    adapter_specs,
    make_mesh,
    param_specs,
    shard_params,
    stacked_adapter_specs,
)
from lora_one_train.checkpoint import Checkpointer
from lora_one_train.config import RunConfig
from lora_one_train.run import run

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

MESHES = {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2)}
CONFIG = lj.LoraConfig(rank=2, alpha=4.0, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
ROOT = Path(__file__).resolve().parents[1]


def micro_batches(n=8, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"input_ids": rng.integers(3, 250, size=k).tolist(), "prompt_len": k // 3} for k in rng.integers(6, 15, n)]
    return [pad_batch([r], pad_id=0) for r in rows]


@pytest.fixture(scope="module")
def toy():
    return load_model("toy-llama")


def test_rules_and_adapter_specs_follow_the_kernels(toy):
    model, params, _ = toy
    mesh = make_mesh(2, 2, 2)
    specs = param_specs(params, LLAMA_RULES, mesh)
    layer = specs["model"]["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert layer["self_attn"]["o_proj"]["kernel"] == P("tensor", "fsdp")
    assert layer["input_layernorm"]["weight"] == P()
    assert specs["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    ad = adapter_specs(params, CONFIG, LLAMA_RULES, mesh)
    assert ad["model/layers/0/self_attn/q_proj"] == {"a": P("fsdp"), "b": P(None, "tensor")}
    assert ad["model/layers/1/mlp/down_proj"] == {"a": P("tensor"), "b": P(None, "fsdp")}
    _, adapters = lj.init_adapters(params, CONFIG, key=jax.random.key(0))
    stacked, layout = lj.stack_adapters(adapters)
    st = stacked_adapter_specs(layout, ad)
    down = next(g for g, paths in layout if paths[0].endswith("down_proj"))
    assert st[down] == {"a": P(None, "tensor"), "b": P(None, None, "fsdp")}
    sharded = shard_params(params, mesh)
    kernel = sharded["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (32, 32)  # (64, 64) over fsdp=2 x tensor=2


def test_loaders_place_each_weight_into_its_sharding(tmp_path, toy):
    from lora_one_jax.models.export import save_pretrained

    model, params, tok = toy
    folder = save_pretrained(tmp_path / "m", model, params, tok)
    mesh = make_mesh(2, 2, 2)
    _, loaded, _ = load_model(str(folder), mesh=mesh)
    q = loaded["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(params["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"])
    )


@pytest.mark.parametrize("mesh_name", MESHES)
def test_gradient_estimate_and_spectral_init_equal_one_device(toy, mesh_name):
    model, params, _ = toy
    loss = lj.full_loss_fn(model)
    micro = micro_batches()
    single = lj.estimate_gradient(loss, params, micro, CONFIG, progress=False)
    mesh = make_mesh(*MESHES[mesh_name])
    sharded_params = shard_params(params, mesh)
    grads = lj.estimate_gradient(loss, sharded_params, micro, CONFIG, progress=False)
    for path, g in grads.items():
        kernel = sharded_params
        for part in (path + "/kernel").split("/"):
            kernel = kernel[part]
        assert g.sharding.is_equivalent_to(kernel.sharding, 2), f"{path}: the gradient is not sharded like its kernel"
        assert g.addressable_shards[0].data.shape == kernel.addressable_shards[0].data.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(single[path]), rtol=2e-4, atol=1e-6)
    ad_single = lj.spectral_init(single, CONFIG, svd="randomized")
    ad_mesh = lj.spectral_init(grads, CONFIG, svd="randomized")  # stacks of 2 over 8 devices: rows mode
    ad_stack = lj.spectral_init(
        grads, lj.LoraConfig(rank=2, alpha=4.0, targets="all-linear"), svd="randomized", mesh=mesh
    )
    for path in ad_single:
        want = np.asarray(ad_single[path]["a"] @ ad_single[path]["b"])
        for got in (ad_mesh[path], ad_stack[path]):
            np.testing.assert_allclose(np.asarray(got["a"] @ got["b"]), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
            assert lj.principal_angles(got["a"], ad_single[path]["a"]).max() < 0.5  # degrees


def test_sharded_svd_modes_equal_the_plain_one():
    from lora_one_jax import spectral

    mesh = make_mesh(8, 1, 1)
    rng = np.random.default_rng(0)
    mats = {
        f"m{i}": jnp.asarray(rng.normal(size=(64, 48)) @ np.diag(0.8 ** np.arange(48)), jnp.float32) for i in range(11)
    }  # 11 matrices: the stack is padded to 16 over 8 devices
    config = lj.LoraConfig(rank=3)
    plain = lj.spectral_init(mats, config, svd="randomized")
    for mode in ("stack", "rows"):
        spread = (
            spectral._run(
                mats, config, kind="lora-one", method="randomized", key=None, what="g", gamma=128.0, mesh=mesh
            )
            if mode == "stack"
            else lj.spectral_init(
                {"big": jax.device_put(mats["m0"], NamedSharding(mesh, P("data")))}, config, svd="randomized"
            )
        )
        for path in spread:
            np.testing.assert_allclose(
                np.asarray(spread[path]["a"] @ spread[path]["b"]),
                np.asarray(plain[path]["a"] @ plain[path]["b"])
                if path != "big"
                else np.asarray(plain["m0"]["a"] @ plain["m0"]["b"]),
                rtol=1e-3,
                atol=1e-7,
            )


def tiny_run(tmp_path, name, mesh, **extra):
    data = tmp_path / "parity.jsonl"
    if not data.exists():
        data.write_text(
            "".join(
                json.dumps({"q": f"Is {i} even?", "choices": ["no", "yes"], "label": int(i % 2 == 0)}) + "\n"
                for i in range(48)
            )
        )
    return {
        "name": name,
        "output_dir": str(tmp_path / "runs" / "{name}"),
        "methods": ["lora-one"],
        "model": {"spec": "toy-llama"},
        "task": {
            "spec": f"jsonl:{data}",
            "max_len": 32,
            "eval_size": 8,
            "options": {"fields": {"prompt": "q", "choices": "choices", "label": "label"}},
        },
        "lora": {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "init": {"grad_examples": 8},
        "optim": {"learning_rate": 5e-3, "warmup_steps": 1},
        "train": {"steps": 4, "batch_size": 8, "log_every": 2},
        "eval": {"every": 0, "limit": 8, "batch_size": 8},
        "checkpoint": {"every": 2},
        "export": {"adapters": True, "peft": False},
        "mesh": {"data": mesh[0], "fsdp": mesh[1], "tensor": mesh[2], **extra},
    }


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", MESHES)
def test_training_steps_equal_one_device_with_sharded_state(tmp_path, mesh_name):
    single = run(RunConfig.from_dict(tiny_run(tmp_path, "single", (1, 1, 1))), progress=False)["methods"]["lora-one"]
    sharded = run(RunConfig.from_dict(tiny_run(tmp_path, mesh_name, MESHES[mesh_name])), progress=False)
    sharded = sharded["methods"]["lora-one"]
    for a, b in zip(
        (r["loss"] for r in single["history"] if "loss" in r), (r["loss"] for r in sharded["history"] if "loss" in r)
    ):
        assert a == pytest.approx(b, rel=1e-4)
    trainable, opt_state = sharded["final_state"]
    mesh = make_mesh(*MESHES[mesh_name])
    for group, stack in trainable.items():
        assert stack["a"].sharding.mesh.shape == mesh.shape
        if group.startswith("64x2x128"):  # up_proj: A's d_in like the kernel's (fsdp), B's d_out (tensor)
            assert stack["a"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp")), 3)
            assert stack["b"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "tensor")), 3)
            assert stack["b"].addressable_shards[0].data.shape[-1] == 128 // mesh.shape["tensor"]
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    adam = next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x))  # AdamW's moments
    for group in trainable:
        assert adam.mu[group]["a"].sharding.is_equivalent_to(trainable[group]["a"].sharding, 3)
        assert adam.nu[group]["b"].sharding.is_equivalent_to(trainable[group]["b"].sharding, 3)
    single_ad, _ = load_adapters(tmp_path / "runs" / "single" / "lora-one" / "adapters")
    sharded_ad, _ = load_adapters(tmp_path / "runs" / mesh_name / "lora-one" / "adapters")
    for path in single_ad:  # singular vectors are defined up to sign: compare the products A @ B
        want = single_ad[path]["a"] @ single_ad[path]["b"]
        np.testing.assert_allclose(
            sharded_ad[path]["a"] @ sharded_ad[path]["b"], want, rtol=1e-3, atol=1e-3 * np.abs(want).max()
        )  # float32 reductions in another order


def test_a_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path):
    wide, cube = make_mesh(8, 1, 1), make_mesh(2, 2, 2)
    x = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    state = {"w": jax.device_put(x, NamedSharding(wide, P("data")))}
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(5, state, {"step": 5})
    like = {"w": jax.device_put(np.zeros_like(x), NamedSharding(cube, P("fsdp", "tensor")))}
    restored, record = Checkpointer(tmp_path / "ckpt").restore(like)
    assert record["step"] == 5 and restored["w"].sharding == NamedSharding(cube, P("fsdp", "tensor"))
    np.testing.assert_array_equal(np.asarray(restored["w"]), x)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_adapters_of_one(tmp_path):
    port = free_port()
    procs = []
    for pid in range(2):
        cfg = tiny_run(
            tmp_path,
            "two",
            (2, 1, 1),
            distributed=True,
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=2,
            process_id=pid,
        )
        path = tmp_path / f"two-{pid}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "LORA_ONE_PROGRESS": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "lora_one_train", str(path)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode()[-3000:]
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(tiny_run(tmp_path, "one", (2, 1, 1))))
    env = {**os.environ, "LORA_ONE_PROGRESS": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    subprocess.run(
        [sys.executable, "-m", "lora_one_train", str(one)], cwd=ROOT, env=env, check=True, capture_output=True
    )
    two, _ = load_adapters(tmp_path / "runs" / "two" / "lora-one" / "adapters")
    single, _ = load_adapters(tmp_path / "runs" / "one" / "lora-one" / "adapters")
    for path in single:
        np.testing.assert_allclose(two[path]["a"], single[path]["a"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(two[path]["b"], single[path]["b"], rtol=1e-5, atol=1e-7)
