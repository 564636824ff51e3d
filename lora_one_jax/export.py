"""Saving and exporting adapters: our own files, PEFT adapter folders, PyTorch-named weights.

* ``save_adapters`` / ``load_adapters``: a folder with ``adapters.safetensors`` (keys ``<module path>/a``
  and ``<module path>/b``) and ``lora_config.json`` (the ``LoraConfig``), so adapters never travel
  without the scale and targets that give them meaning.
* ``save_peft`` / ``load_peft``: a Hugging Face PEFT adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(torch_model, folder)`` loads onto
  the PyTorch base model, and back. PEFT stores ``lora_A.weight = A^T`` (r, d_in) and
  ``lora_B.weight = B^T`` (d_out, r) under ``base_model.model.<module path with dots>``.
* ``pytorch_state_dict``: Flax params renamed and laid out as PyTorch / transformers expect
  (``kernel`` -> ``weight`` transposed, ``embedding`` / ``scale`` -> ``weight``, ``/`` -> ``.``).

``safetensors`` is imported only when a file is read or written (the core stays light).

Example:
    >>> import tempfile
    >>> cfg = lj.LoraConfig(rank=1, targets=["fc"])
    >>> adapters = {"fc": {"a": np.ones((3, 1), np.float32), "b": np.zeros((1, 2), np.float32)}}
    >>> folder = save_adapters(tempfile.mkdtemp(), adapters, cfg)
    >>> loaded, config = load_adapters(folder)
    >>> config == cfg, loaded["fc"]["a"].shape
    (True, (3, 1))
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lora_one_jax.config import Adapters, LoraConfig, Pattern, key_matches, pytorch_name

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "lora_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
#: ``peft.LoraConfig``'s defaults, used for keys an ``adapter_config.json`` leaves out (as PEFT does).
PEFT_DEFAULT_RANK = 8
PEFT_DEFAULT_ALPHA = 8.0


def _host(x) -> np.ndarray:
    """A contiguous host copy (numpy has no bfloat16 file format trouble: safetensors writes ml_dtypes)."""
    return np.ascontiguousarray(np.asarray(x))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class AdapterFileError(ValueError):
    """An adapter file or its config is truncated, corrupt or not what its name says; the message names it."""


def check_adapter_values(adapters: Adapters, action: str = "use") -> Adapters:
    """``adapters`` itself if every A and B is a floating-point array of finite values; else a ``ValueError``.

    The message names the module and says what is wrong (integer or bool dtype; how many NaN / Inf values).
    ``save_adapters``, ``save_peft`` and ``merge`` call it (``action`` says which, in the message), so a
    diverged run is never written or merged silently. Traced values (inside ``jax.jit``) are only checked
    for their dtype.

    Example:
        >>> bad = {"fc": {"a": np.ones((2, 1)), "b": np.full((1, 2), np.nan)}}
        >>> check_adapter_values(bad, "save")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: cannot save adapters: 'fc' B holds 2 NaN/Inf of its 2 values (a diverged run?); ...
    """
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a dict {{module_path: {{'a': A, 'b': B}}}}, got {type(adapters).__name__}")
    for path, adapter in adapters.items():
        for name in ("a", "b"):
            if not isinstance(adapter, Mapping) or name not in adapter:
                raise ValueError(
                    f"cannot {action} adapters: {path!r} has no {name!r} (each adapter is {{'a': A, 'b': B}})"
                )
            _check_array(adapter[name], f"{path!r} {name.upper()}", action)
    return adapters


def _check_array(x, where: str, action: str) -> None:
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if not np.issubdtype(dtype, np.floating) and dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        raise ValueError(
            f"cannot {action} adapters: {where} has dtype {dtype.name}, not floating point; adapters are float "
            "(cast them with x.astype(np.float32) if these values are really meant)"
        )
    if _is_tracer(x):
        return
    values = np.asarray(x, np.float32)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(
            f"cannot {action} adapters: {where} holds {bad} NaN/Inf of its {values.size} values (a diverged run?); "
            "lower the learning rate and retrain, or save an earlier checkpoint"
        )


def _is_tracer(x) -> bool:
    import jax

    return isinstance(x, jax.core.Tracer)


def save_adapters(
    folder: str | os.PathLike, adapters: Adapters, config: LoraConfig, *, metadata: dict | None = None
) -> Path:
    """Write ``adapters`` and their ``config`` to ``folder`` (created); returns the folder.

    Files are written to temporary names and renamed, so a crash never leaves a half-written file.
    Non-finite or integer adapters raise ``ValueError`` naming the module (``check_adapter_values``).
    ``metadata`` (strings) is stored in the safetensors header, e.g. the base model's spec.

    Example:
        >>> import tempfile
        >>> ad = {"fc": {"a": np.ones((2, 1), np.float32), "b": np.ones((1, 2), np.float32)}}
        >>> sorted(p.name for p in save_adapters(tempfile.mkdtemp(), ad, lj.LoraConfig(rank=1)).iterdir())
        ['adapters.safetensors', 'lora_config.json']
    """
    from safetensors.numpy import save_file

    if not isinstance(config, LoraConfig):
        raise TypeError(f"save_adapters needs the adapters' LoraConfig, got {type(config).__name__}")
    check_adapter_values(adapters, "save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{path}/{name}": _host(adapter[name]) for path, adapter in adapters.items() for name in ("a", "b")}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    _write_atomic(folder / ADAPTERS_FILE, lambda p: save_file(tensors, str(p), metadata=meta or None))
    _write_atomic(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config.to_dict(), indent=2) + "\n"))
    return folder


def load_adapters(folder: str | os.PathLike) -> tuple[Adapters, LoraConfig]:
    """``(adapters, config)`` from a folder written by ``save_adapters`` (numpy arrays).

    A truncated or corrupt file raises ``AdapterFileError`` (a ``ValueError``) naming it.

    Example:
        >>> adapters, config = load_adapters("runs/asdiv/adapters")  # doctest: +SKIP
    """
    folder = Path(folder)
    for name in (ADAPTERS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            hint = " (a PEFT folder? use load_peft)" if (folder / PEFT_CONFIG).is_file() else ""
            raise FileNotFoundError(f"{folder} has no {name}; it was not written by save_adapters{hint}")
    config = _read_config(folder / CONFIG_FILE, LoraConfig.from_dict)
    adapters: Adapters = {}
    for key, value in _read_tensors(folder / ADAPTERS_FILE).items():
        path, _, name = key.rpartition("/")
        if name not in ("a", "b"):
            raise AdapterFileError(f"{folder / ADAPTERS_FILE} holds {key!r}, which is not '<module path>/a' or '/b'")
        adapters.setdefault(path, {})[name] = value
    _check_pairs(adapters, folder / ADAPTERS_FILE)
    return adapters, config


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; one ``AdapterFileError`` naming the file if it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(
            f"{file} is truncated or corrupt ({e}); it cannot be read as safetensors: export the adapters again "
            "(or restore the file from a copy)"
        ) from None


def _read_config(file: Path, build):
    """``build(the JSON object in file)``; one ``AdapterFileError`` naming the file if it cannot be read."""
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(
            f"{file} is truncated or corrupt: not valid JSON ({e}); export the adapters again"
        ) from None
    if not isinstance(values, dict):
        raise AdapterFileError(f"{file} holds a JSON {type(values).__name__}, not an object; export the adapters again")
    try:
        return build(values)
    except (TypeError, ValueError, KeyError) as e:
        raise AdapterFileError(f"{file} does not describe a LoRA adapter: {e}") from None


def _check_pairs(adapters: Adapters, file: Path) -> None:
    for path, adapter in adapters.items():
        if set(adapter) != {"a", "b"}:
            missing = "a" if "a" not in adapter else "b"
            raise AdapterFileError(
                f"{file} holds {path!r} without its {missing.upper()} factor; export the adapters again"
            )
        a, b = adapter["a"], adapter["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterFileError(
                f"{file}: {path!r} has A {a.shape} and B {b.shape}, which are not (d_in, r) and (r, d_out)"
            )


# ----------------------------------------------------------------------------- PEFT


def _peft_module(path: str) -> str:
    return path.replace("/", ".")


def _peft_targets(config: LoraConfig, adapters: Adapters) -> list[str] | str:
    if config.targets == "all-linear":
        return "all-linear"
    if isinstance(config.targets, tuple):
        return sorted({_peft_module(t) for t in config.targets})
    return sorted(_peft_module(p) for p in adapters)  # a regex: name the adapted modules themselves


def _pattern_dict(table) -> dict:
    return {_peft_module(k): v for k, v in table}


def save_peft(
    folder: str | os.PathLike,
    adapters: Adapters,
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write a PEFT LoRA adapter folder that PyTorch PEFT loads onto the PyTorch base model.

    ``adapter_config.json`` carries ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``,
    ``target_modules`` (module names, or every adapted path for a regex), ``rank_pattern`` /
    ``alpha_pattern`` and ``fan_in_fan_out`` (True for GPT-2-style transposed kernels);
    ``adapter_model.safetensors`` holds ``lora_A.weight`` (r, d_in) and ``lora_B.weight`` (d_out, r) in
    float32. Our module paths are the Hugging Face module names with ``/`` for ``.``.
    ``base_model_name_or_path`` should be what PyTorch can load the base from: a hub id or a local folder
    (``lora_one_jax.models.hub_id(spec)`` maps our model specs, e.g. ``"smollm2-135m"``, to their hub ids).
    Non-finite or integer adapters raise ``ValueError`` naming the module (``check_adapter_values``).

    Example:
        >>> import tempfile, json
        >>> ad = {"model/layers/0/q_proj": {"a": np.ones((4, 2), np.float32), "b": np.ones((2, 3), np.float32)}}
        >>> folder = save_peft(tempfile.mkdtemp(), ad, lj.LoraConfig(rank=2, alpha=4.0, targets=["q_proj"]))
        >>> json.loads((folder / "adapter_config.json").read_text())["target_modules"]
        ['q_proj']
    """
    from safetensors.numpy import save_file

    check_adapter_values(adapters, "save")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a hub id or a path string, got {base_model_name_or_path!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, adapter in adapters.items():
        key = PEFT_PREFIX + _peft_module(path)
        tensors[f"{key}.lora_A.weight"] = _host(np.asarray(adapter["a"], np.float32).T)
        tensors[f"{key}.lora_B.weight"] = _host(np.asarray(adapter["b"], np.float32).T)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "use_rslora": config.rslora,
        "lora_dropout": config.dropout,
        "target_modules": _peft_targets(config, adapters),
        "exclude_modules": None,
        "rank_pattern": _pattern_dict(config.rank_pattern),
        "alpha_pattern": _pattern_dict(config.alpha_pattern),
        "fan_in_fan_out": bool(config.transposed_kernels),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    _write_atomic(folder / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _write_atomic(folder / PEFT_CONFIG, lambda p: p.write_text(json.dumps(peft_config, indent=2) + "\n"))
    return folder


def load_peft(folder: str | os.PathLike, *, transposed_kernels: Pattern = ()) -> tuple[Adapters, LoraConfig]:
    """``(adapters, config)`` from a PEFT LoRA adapter folder (e.g. one PyTorch PEFT saved).

    The ``LoraConfig`` targets exactly the modules the file holds (their paths as a regex), with PEFT's
    ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``, ``rank_pattern`` and ``alpha_pattern``.
    Keys the file leaves out take PEFT's defaults (``r`` 8, ``lora_alpha`` 8, as ``peft.LoraConfig``).
    PEFT features we do not have (DoRA, biases, modules_to_save, layer replication) raise. For GPT-2-style
    models pass ``transposed_kernels`` as for ``LoraConfig``. A truncated or corrupt file raises
    ``AdapterFileError`` (a ``ValueError``) naming it.

    Example:
        >>> adapters, config = load_peft("path/to/peft-adapter")  # doctest: +SKIP
    """
    folder = Path(folder)
    if not (folder / PEFT_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} has no {PEFT_CONFIG}; it is not a PEFT adapter folder")
    peft = _read_config(folder / PEFT_CONFIG, dict)
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {peft.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("bias", "none"), ("modules_to_save", None), ("layer_replication", None)):
        if peft.get(key, ok) not in (ok, [], {}):
            raise ValueError(f"{folder}: {key}={peft[key]!r} is not supported (only plain LoRA adapters)")
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has no {PEFT_WEIGHTS} (PyTorch .bin adapters: re-save them with safetensors)"
        )
    adapters: Adapters = {}
    pattern = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
    for key, value in _read_tensors(weights).items():
        m = pattern.fullmatch(key)
        if m is None:
            raise AdapterFileError(f"{weights} holds {key!r}, which is not a LoRA A/B weight")
        path = m.group(1).replace(".", "/")
        adapters.setdefault(path, {})["a" if m.group(2) == "A" else "b"] = np.ascontiguousarray(value.T)
    _check_pairs(adapters, weights)
    ranks = {p: int(ad["a"].shape[1]) for p, ad in adapters.items()}
    rank = int(peft.get("r", PEFT_DEFAULT_RANK))
    rank_pattern = {re.escape(k.replace(".", "/")): int(v) for k, v in (peft.get("rank_pattern") or {}).items()}
    for path, r in ranks.items():  # ranks the file holds but the config does not say (PEFT infers nothing)
        if r != rank and not any(key_matches(k, path) for k in rank_pattern):
            rank_pattern[re.escape(path)] = r
    alpha_pattern = {re.escape(k.replace(".", "/")): float(v) for k, v in (peft.get("alpha_pattern") or {}).items()}
    config = LoraConfig(
        rank=rank,
        alpha=float(peft.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        rslora=bool(peft.get("use_rslora", False)),
        dropout=float(peft.get("lora_dropout", 0.0) or 0.0),
        targets="|".join(re.escape(p) for p in sorted(adapters)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        transposed_kernels=transposed_kernels,
    )
    return adapters, config


def fold_residual(adapters: Adapters, initial: Adapters, config: LoraConfig) -> tuple[Adapters, LoraConfig]:
    """Adapters for the *original* base from adapters trained on a residual base (PiSSA, LoRA-GA).

    Those inits freeze ``W - scale * A0 @ B0``; PEFT (like every LoRA loader) adds adapters to the original
    ``W``. ``[A | A0]`` and ``[B; -B0]`` of rank 2r with the same scale give exactly
    ``W - scale A0 B0 + scale A B`` (what PEFT's PiSSA conversion does); alpha is adjusted so that the
    scale stays the same at rank 2r.

    Example:
        >>> ad = {"fc": {"a": np.ones((3, 1)), "b": np.ones((1, 2))}}
        >>> init = {"fc": {"a": np.ones((3, 1)), "b": 2 * np.ones((1, 2))}}
        >>> folded, cfg = fold_residual(ad, init, lj.LoraConfig(rank=1, alpha=2.0))
        >>> (cfg.scale_for("fc") * folded["fc"]["a"] @ folded["fc"]["b"])[0].tolist()  # 2 * (1 - 2)
        [-2.0, -2.0]
    """
    missing = sorted(set(adapters) - set(initial))
    if missing:
        raise ValueError(f"the initial adapters lack {missing[:5]}; pass the adapters the residual base was made with")
    folded = {
        p: {
            "a": np.concatenate([np.asarray(ad["a"], np.float32), np.asarray(initial[p]["a"], np.float32)], axis=1),
            "b": np.concatenate([np.asarray(ad["b"], np.float32), -np.asarray(initial[p]["b"], np.float32)], axis=0),
        }
        for p, ad in adapters.items()
    }
    factor = 2**0.5 if config.rslora else 2.0  # alpha' / f(2r) == alpha / f(r)
    new = LoraConfig.from_dict(
        {
            **config.to_dict(),
            "rank": 2 * config.rank,
            "alpha": factor * config.alpha,
            "rank_pattern": {k: 2 * v for k, v in config.rank_pattern},
            "alpha_pattern": {k: factor * v for k, v in config.alpha_pattern},
        }
    )
    return folded, new


# ----------------------------------------------------------------------------- PyTorch names


def pytorch_state_dict(params) -> dict[str, np.ndarray]:
    """Flax params as a PyTorch ``state_dict`` of numpy arrays, named and laid out as transformers expects.

    ``a/b/kernel`` (2-D, (d_in, d_out)) -> ``a.b.weight`` transposed to (d_out, d_in) (GPT-2's
    ``FlaxConv1D`` kernels are stored (d_out, d_in) and become PyTorch ``Conv1D``'s (d_in, d_out), the same
    transpose); ``embedding`` and ``scale`` -> ``weight``; every other leaf keeps its name.

    Example:
        >>> sd = pytorch_state_dict({"model": {"embed_tokens": {"embedding": np.zeros((5, 2))},
        ...                                    "q_proj": {"kernel": np.zeros((2, 3))}}})
        >>> {k: v.shape for k, v in sd.items()}
        {'model.embed_tokens.weight': (5, 2), 'model.q_proj.weight': (3, 2)}
    """
    from flax import traverse_util

    out = {}
    for keys, value in traverse_util.flatten_dict(params).items():
        value, path = np.asarray(value), "/".join(str(k) for k in keys)
        if keys[-1] == "kernel" and value.ndim == 2:
            value = value.T
        elif keys[-1] == "kernel" and value.ndim == 4:  # convolutions: (h, w, in, out) -> (out, in, h, w)
            value = value.transpose(3, 2, 0, 1)
        out[pytorch_name(path)] = np.ascontiguousarray(value)
    return out
