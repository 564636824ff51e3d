"""Model loading: GGUF -> FlaxLlama (real SmolLM2 and a tiny hand-written GGUF), HF folders in every
weight layout, tokenizers, dtypes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from flax import traverse_util
from safetensors.numpy import save_file

from lora_one_jax.models import load_model, merge_safetensors_shards, toy_llama
from lora_one_jax.models.gguf import load_gguf, permute_qk
from lora_one_jax.models.tokenizer import toy_tokenizer
from tests.smollm import SENTENCE, smollm2

IDS = np.array([[1, 40, 41, 42, 120, 7, 200, 3], [1, 50, 60, 70, 80, 90, 100, 110]], np.int32)


def _nll(model, params, ids, *, jit=True) -> float:
    forward = lambda p, i: model(i, params=p).logits
    logits = (jax.jit(forward) if jit else forward)(params, ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return float(-jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean())


# ---------------------------------------------------------------- the real SmolLM2-135M (slow)


@pytest.mark.slow
def test_smollm2_scores_reference_sentence():
    model, params, tok = smollm2()
    assert type(model).__name__ == "FlaxLlamaForCausalLM" and model.config.rope_theta == 100000.0
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152 and len(tok) == 49152
    ids = jnp.asarray([tok(SENTENCE).input_ids])
    nll = _nll(model, params, ids)
    assert abs(nll - 1.317) < 0.02, nll
    random_ids = jnp.asarray(np.random.default_rng(0).integers(0, 49152, (1, 21)))
    assert _nll(model, params, random_ids) > 10.0


@pytest.mark.slow
def test_smollm2_wrong_without_rope_fix(monkeypatch):
    """transformers' own rotary setup (base 10000 hard-coded) gives a clearly different NLL; so does
    rope_theta=10000 with the fix; with the fix and the GGUF's 100000 it is right (test above)."""
    from transformers.models.llama import modeling_flax_llama as mfl

    model, params, tok = smollm2()
    ids = jnp.asarray([tok(SENTENCE).input_ids])

    def original_setup(self):  # verbatim transformers 4.57 FlaxLlamaRotaryEmbedding.setup
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        self.sincos = mfl.create_sinusoidal_positions(self.config.max_position_embeddings, head_dim)

    with monkeypatch.context() as m:
        m.setattr(mfl.FlaxLlamaRotaryEmbedding, "setup", original_setup)
        unfixed = _nll(model, params, ids)
    config = tf.LlamaConfig.from_dict({**model.config.to_dict(), "rope_theta": 10000.0})
    base_10k = _nll(tf.FlaxLlamaForCausalLM(config, _do_init=False), params, ids)
    assert abs(unfixed - base_10k) < 1e-4  # the unfixed model is the theta=10000 model
    assert abs(unfixed - 1.317) > 0.02, unfixed  # measured 1.283


@pytest.mark.slow
def test_smollm2_tokenizer_details():
    _, _, tok = smollm2()
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id, tok.pad_token_id) == (
        "<|im_start|>",
        1,
        "<|im_end|>",
        2,
        2,
    )
    # digits are split one by one, also after two spaces (where a ByteLevel-only pre-tokenizer merges them)
    assert tok.convert_ids_to_tokens(tok("x  12 apples").input_ids) == ["x", "ĠĠ", "1", "2", "Ġapples"]
    assert tok.convert_ids_to_tokens(tok("in 2024").input_ids) == ["in", "Ġ", "2", "0", "2", "4"]
    assert tok("hello").input_ids[0] != tok.bos_token_id  # bos is not added by default
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(chat).input_ids
    assert ids.count(1) == 3 and tok.decode(ids) == chat  # special tokens stay whole, decode round-trips
    assert tok.decode(ids, skip_special_tokens=True).startswith("system\n")


@pytest.mark.slow
def test_minilm_sentence_similarity():
    model, params, tok = load_model("minilm-l6")
    assert type(model).__name__ == "FlaxBertModel"
    batch = tok(
        ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."],
        padding=True,
        return_tensors="np",
    )
    hidden = model(**batch, params=params).last_hidden_state
    mask = batch["attention_mask"][..., None]
    emb = np.asarray((hidden * mask).sum(1) / mask.sum(1))
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > 0.6 > 0.2 > emb[0] @ emb[2]


# ---------------------------------------------------------------- a tiny GGUF written here (fast)


def _write_gguf(path, model, params, tok, *, tied: bool, rope_theta: float):
    import gguf

    cfg = model.config
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3 if i < 3 else 1 for i in range(len(vocab))])
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template("{{ messages[0]['content'] }}")
    w.add_tensor("token_embd.weight", np.asarray(flat["model/embed_tokens/embedding"]))
    w.add_tensor("output_norm.weight", np.asarray(flat["model/norm/weight"]))
    if not tied:
        w.add_tensor("output.weight", np.asarray(flat["lm_head/kernel"]).T.copy())
    names = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        layer = f"model/layers/{i}"
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.asarray(flat[f"{layer}/input_layernorm/weight"]))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.asarray(flat[f"{layer}/post_attention_layernorm/weight"]))
        for hf_name, gguf_name in names.items():
            module = "self_attn" if "proj" in hf_name and hf_name[0] in "qkvo" else "mlp"
            weight = np.asarray(flat[f"{layer}/{module}/{hf_name}/kernel"]).T  # (out, in) like PyTorch
            if hf_name == "q_proj":
                weight = permute_qk(weight, cfg.num_attention_heads)
            elif hf_name == "k_proj":
                weight = permute_qk(weight, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_flax_model(tmp_path, tied):
    model, params, tok = toy_llama(rope_theta=50000.0)
    if tied:
        params = {**params, "lm_head": {"kernel": params["model"]["embed_tokens"]["embedding"].T}}
    _write_gguf(tmp_path / "tiny.gguf", model, params, tok, tied=tied, rope_theta=50000.0)
    g_model, g_params, g_tok = load_model(tmp_path / "tiny.gguf")
    assert g_model.config.rope_theta == 50000.0 and g_model.config.tie_word_embeddings == tied
    np.testing.assert_allclose(g_model(IDS, params=g_params).logits, model(IDS, params=params).logits, atol=1e-5)
    text = "a  12 <|im_end|>"
    assert g_tok.convert_ids_to_tokens(g_tok(text).input_ids) == ["a", "ĠĠ", "1", "2", "Ġ", "<|im_end|>"]
    assert g_tok(text).input_ids == tok(text).input_ids
    assert (g_tok.bos_token_id, g_tok.eos_token_id, g_tok.pad_token_id) == (1, 2, 2)


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor"):
        load_model(str(tmp_path / "missing.gguf"))


# ---------------------------------------------------------------- HF folders (fast)


def _pt_state_dict(params):
    """Flax Llama params -> PyTorch names and layouts (what a PyTorch save_pretrained writes)."""
    out = {}
    for key, value in traverse_util.flatten_dict(jax.device_get(params), sep=".").items():
        value = np.asarray(value)
        if key.endswith(".kernel"):
            key, value = key[: -len("kernel")] + "weight", value.T
        elif key.endswith(".embedding"):
            key = key[: -len("embedding")] + "weight"
        out[key] = np.ascontiguousarray(value)
    return out


@pytest.fixture(scope="module")
def tiny():
    return toy_llama(rope_theta=20000.0)


def _logits(loaded):
    model, params, _ = loaded
    return np.asarray(model(IDS, params=params).logits)


def test_hf_folder_flax_msgpack_and_safetensors(tmp_path, tiny):
    model, params, tok = tiny
    model.save_pretrained(tmp_path / "msgpack", params=params)
    tok.save_pretrained(tmp_path / "msgpack")
    loaded = load_model(tmp_path / "msgpack")
    assert loaded.model.config.rope_theta == 20000.0
    np.testing.assert_array_equal(_logits(loaded), _logits(tiny))
    assert loaded.tokenizer("a 12").input_ids == tok("a 12").input_ids
    model.save_pretrained(tmp_path / "safe", params=params, safe_serialization=True)
    np.testing.assert_array_equal(_logits(load_model(tmp_path / "safe")), _logits(tiny))


def test_hf_folder_pytorch_safetensors_single_sharded_and_tied(tmp_path, tiny):
    model, params, _ = tiny
    state = _pt_state_dict(params)
    single = tmp_path / "pt"
    model.config.save_pretrained(single)
    save_file(state, str(single / "model.safetensors"), metadata={"format": "pt"})
    np.testing.assert_array_equal(_logits(load_model(single)), _logits(tiny))

    sharded = tmp_path / "pt-sharded"
    model.config.save_pretrained(sharded)
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(_logits(load_model(sharded)), _logits(tiny))
    merged = merge_safetensors_shards(sharded)  # cached: the same folder, not merged again
    assert merged == merge_safetensors_shards(sharded) and (merged / "config.json").is_file()

    tied = tmp_path / "pt-tied"  # a tied checkpoint has no lm_head: it is the embedding
    tf.LlamaConfig.from_dict({**model.config.to_dict(), "tie_word_embeddings": True}).save_pretrained(tied)
    save_file(
        {k: v for k, v in state.items() if k != "lm_head.weight"},
        str(tied / "model.safetensors"),
        metadata={"format": "pt"},
    )
    t_model, t_params, _ = load_model(tied)
    np.testing.assert_array_equal(t_params["lm_head"]["kernel"], params["model"]["embed_tokens"]["embedding"].T)


def test_bfloat16_params(tmp_path, tiny):
    model, params, _ = tiny
    model.save_pretrained(tmp_path / "m", params=params)
    b_model, b_params, _ = load_model(tmp_path / "m", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(b_params)} == {jnp.dtype(jnp.bfloat16)}
    logits = b_model(IDS, params=b_params).logits
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits, np.float32), _logits(tiny), atol=0.1)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    tf.LlamaConfig().save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="need torch"):
        load_model(tmp_path / "noweights")


def test_unreachable_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="huggingface-cli download someone/no-such-model"):
        load_model("someone/no-such-model")


def test_toy_tokenizer_digits_and_specials():
    tok = toy_tokenizer()
    assert tok.convert_ids_to_tokens(tok("9  10").input_ids) == ["9", "ĠĠ", "1", "0"]
    assert tok("<|im_end|>").input_ids == [2]
