"""Byte-level BPE tokenizers built from a vocabulary and merges (GGUF metadata, or a toy one).

Everything is wrapped as a ``transformers.PreTrainedTokenizerFast``, so the usual API works
(``tok("text").input_ids``, ``tok.decode``, ``tok.apply_chat_template``, ``tok.eos_token_id``).

The pre-tokenizer follows the GGUF ``tokenizer.ggml.pre`` name, as llama.cpp does:

* ``"smollm"`` (SmolLM / StarCoder): every digit is split off on its own, then the GPT-2 byte-level
  regex: ``Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False)])``.
* ``"gpt-2"`` / ``"default"``: the GPT-2 byte-level regex only.
* ``"llama-bpe"`` (Llama 3): the Llama 3 split regex (numbers in groups of up to 3), then byte-level.

Example:
    >>> tok = toy_tokenizer()
    >>> tok("x = 12", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(c) for c in "xĠ=Ġ12"]
    True
    >>> tok.decode(tok("Héllo 42").input_ids)
    'Héllo 42'
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(name: str):
    """The ``tokenizers`` pre-tokenizer for a GGUF ``tokenizer.ggml.pre`` name.

    Example:
        >>> [w for w, _ in pre_tokenizer("smollm").pre_tokenize_str("in 2024")]
        ['in', 'Ġ', '2', '0', '2', '4']
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in ("gpt-2", "gpt2", "default"):
        return byte_level
    if name == "llama-bpe":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(
        f"pre-tokenizer {name!r} is not supported (known: 'smollm', 'gpt-2', 'default', 'llama-bpe'); "
        "load the model's tokenizer yourself and pass it as load_model(..., tokenizer=...)"
    )


def bpe_tokenizer(
    tokens: Sequence[str],
    merges: Sequence[str] | Sequence[tuple[str, str]],
    *,
    pre: str = "smollm",
    special: Sequence[int] = (),
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    unk_id: int | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) with the given vocabulary, merges and special ids.

    ``tokens[i]`` is the string of token id ``i`` (byte-level alphabet, ``'Ġ'`` for a space);
    ``merges`` are ``"a b"`` strings (split on the first space) or pairs. ``special`` ids are never
    split and are dropped by ``decode(..., skip_special_tokens=True)``. ``add_bos`` prepends
    ``bos_id`` when ``add_special_tokens=True``.

    Example:
        >>> from tokenizers.pre_tokenizers import ByteLevel
        >>> alphabet = sorted(ByteLevel.alphabet())
        >>> tok = bpe_tokenizer(["<eos>"] + alphabet + ["ab"], ["a b"], special=[0], eos_id=0)
        >>> tok.convert_ids_to_tokens(tok("abc<eos>").input_ids)
        ['ab', 'c', '<eos>']
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the token list has duplicate entries; each token string must appear once")
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    model = models.BPE(
        vocab=vocab,
        merges=pairs,
        fuse_unk=False,
        byte_fallback=False,
        unk_token=tokens[unk_id] if unk_id is not None else None,
    )
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    if add_bos:
        if bos_id is None:
            raise ValueError("add_bos=True needs bos_id")
        bos = tokens[bos_id]
        post.append(
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        )
    tok.post_processor = processors.Sequence(post)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    name = lambda i: tokens[i] if i is not None else None
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name(bos_id),
        eos_token=name(eos_id),
        pad_token=name(pad_id),
        unk_token=name(unk_id),
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    return wrapped


_TOY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TOY_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer (256 bytes, one merge ``"Ġ Ġ"``) laid out like SmolLM2's specials:
    ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1 (bos), ``<|im_end|>`` = 2 (eos and pad).

    For tests and examples: tiny, instant, digits split like SmolLM2.

    Example:
        >>> tok = toy_tokenizer()
        >>> len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        (260, 1, 2, 2)
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return bpe_tokenizer(
        _TOY_SPECIAL + alphabet + ["ĠĠ"],
        ["Ġ Ġ"],
        pre="smollm",
        special=[0, 1, 2],
        bos_id=1,
        eos_id=2,
        pad_id=2,
        chat_template=_TOY_TEMPLATE,
    )
