"""LoraConfig validation and target matching."""

import math

import numpy as np
import pytest

import lora_one_jax as lj

PARAMS = {
    "model": {
        "embed_tokens": {"embedding": np.zeros((50, 16))},
        "layers": {
            str(i): {
                "self_attn": {"q_proj": {"kernel": np.zeros((16, 16))}, "v_proj": {"kernel": np.zeros((16, 4))}},
                "mlp": {"up_proj": {"kernel": np.zeros((16, 32))}, "down_proj": {"kernel": np.zeros((32, 16))}},
                "norm": {"weight": np.zeros(16)},
            }
            for i in range(2)
        },
    },
    "lm_head": {"kernel": np.zeros((16, 50))},
}


def paths(config):
    return sorted(lj.find_targets(PARAMS, config))


def test_all_linear_skips_embeddings_norms_and_lm_head():
    got = paths(lj.LoraConfig(rank=2))
    assert len(got) == 8 and not any("lm_head" in p or "embed" in p or "norm" in p for p in got)


def test_names_regex_and_exclude():
    assert paths(lj.LoraConfig(rank=2, targets=["q_proj"])) == [f"model/layers/{i}/self_attn/q_proj" for i in range(2)]
    assert paths(lj.LoraConfig(rank=2, targets=["mlp/up_proj"])) == [f"model/layers/{i}/mlp/up_proj" for i in range(2)]
    assert paths(lj.LoraConfig(rank=2, targets=r".*layers/1/.*_proj")) == [
        "model/layers/1/mlp/down_proj",
        "model/layers/1/mlp/up_proj",
        "model/layers/1/self_attn/q_proj",
        "model/layers/1/self_attn/v_proj",
    ]
    assert paths(lj.LoraConfig(rank=2, targets=["q_proj", "v_proj"], exclude=r".*layers/0/.*")) == [
        "model/layers/1/self_attn/q_proj",
        "model/layers/1/self_attn/v_proj",
    ]


def test_rank_and_alpha_patterns_and_scales():
    cfg = lj.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=["q_proj", "up_proj"],
        rank_pattern={"up_proj": 8},
        alpha_pattern={r"layers/1/self_attn/q_proj": 2.0},
    )
    t = lj.find_targets(PARAMS, cfg)
    assert (t["model/layers/0/self_attn/q_proj"].rank, t["model/layers/0/self_attn/q_proj"].scale) == (4, 2.0)
    assert (t["model/layers/1/self_attn/q_proj"].rank, t["model/layers/1/self_attn/q_proj"].scale) == (4, 0.5)
    assert (t["model/layers/0/mlp/up_proj"].rank, t["model/layers/0/mlp/up_proj"].scale) == (8, 1.0)
    rs = lj.LoraConfig(rank=4, alpha=8.0, rslora=True, targets=["q_proj"])
    assert lj.find_targets(PARAMS, rs)["model/layers/0/self_attn/q_proj"].scale == pytest.approx(8.0 / math.sqrt(4))


def test_target_that_matches_nothing_lists_available_paths():
    with pytest.raises(ValueError, match=r"target pattern \['k_proj'\] matched no kernel; available: .*q_proj"):
        paths(lj.LoraConfig(rank=2, targets=["k_proj"]))
    with pytest.raises(ValueError, match="whole path.*list like"):
        paths(lj.LoraConfig(rank=2, targets="q_proj"))


def test_rank_larger_than_kernel_is_rejected_with_the_module_name():
    with pytest.raises(
        ValueError, match=r"rank 8 for 'model/layers/0/self_attn/v_proj' exceeds min\(d_in, d_out\) = 4"
    ):
        paths(lj.LoraConfig(rank=8, targets=["v_proj"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -3}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"alpha_pattern": {"q_proj": -2.0}}, r"alpha_pattern\[.q_proj.\] must be a finite number > 0"),
        ({"dtype": "float33"}, "not a dtype name"),
        ({"targets": "(unclosed"}, "not a valid regex"),
    ],
)
def test_bad_values_raise_with_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lj.LoraConfig(**kwargs)


def test_unknown_keys_are_rejected_and_listed():
    with pytest.raises(ValueError, match=r"unknown LoraConfig key\(s\) \['ranks'\]; valid keys: .*'rank'"):
        lj.LoraConfig.from_dict({"ranks": 4})
    cfg = lj.LoraConfig(rank=3, targets=["q_proj"], rank_pattern={"q_proj": 2})
    assert lj.LoraConfig.from_dict(cfg.to_dict()) == cfg


def test_patterns_that_match_nothing_are_rejected():
    with pytest.raises(ValueError, match="rank_pattern key 'k_proj' matched no targeted module"):
        paths(lj.LoraConfig(rank=2, targets=["q_proj"], rank_pattern={"k_proj": 4}))
    with pytest.raises(ValueError, match="exclude pattern .* removed every target"):
        paths(lj.LoraConfig(rank=2, targets=["q_proj"], exclude=["q_proj"]))
    with pytest.raises(ValueError, match="transposed_kernels .* matched no kernel"):
        paths(lj.LoraConfig(rank=2, transposed_kernels=["c_attn"]))


def test_config_is_hashable_for_static_args():
    assert hash(lj.LoraConfig(rank=2, targets=["q_proj"], rank_pattern={"q_proj": 2})) is not None


def test_pytorch_names_and_pattern_keys_have_one_helper_each():
    assert lj.config.pytorch_name("transformer/h/0/attn/c_attn/kernel") == "transformer.h.0.attn.c_attn.weight"
    assert lj.config.pytorch_name("model/embed_tokens/embedding") == "model.embed_tokens.weight"
    assert lj.config.pytorch_name("encoder/layer_norm/bias") == "encoder.layer_norm.bias"
    assert lj.config.key_matches("layers/0/.*", "model/layers/0/mlp/up_proj")
    assert not lj.config.key_matches("layers/0/.*", "model/layers/10/mlp/up_proj")
    assert not lj.config.key_matches("up", "model/layers/0/mlp/up_proj")  # a key matches whole names only
