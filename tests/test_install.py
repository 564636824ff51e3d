"""It ships: the wheel, installed (not editable) in a fresh venv, runs the CLI with every shipped config."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what a wheel is built from (a copy, so that the build leaves nothing in the checkout)
SOURCES = ["pyproject.toml", "README.md", "lora_one_jax", "train", "configs"]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))

RESOLVE = """
import sys
from pathlib import Path
import lora_one_jax, lora_one_train
from lora_one_train.config import CONFIG_DIR, load_config
for module in (lora_one_jax, lora_one_train):
    assert Path(module.__file__).is_relative_to(sys.prefix), (module.__file__, sys.prefix)
names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
for name in names:
    cfg = load_config(name)
    print(name, cfg.name, ",".join(cfg.methods))
"""


def run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def build_wheel(tmp_path) -> Path:
    setuptools = importlib.metadata.version("setuptools")
    assert int(setuptools.split(".")[0]) >= 77, f"setuptools {setuptools}: `pip install -e '.[test]'` brings >= 77"
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("lora_one_jax-*.whl")
    return wheel


def fresh_venv(tmp_path, wheel) -> Path:
    """A venv holding only the wheel, plus this environment's site-packages (the dependencies) as a plain path:
    a path line in a ``.pth`` file adds the folder but runs none of the ``.pth`` files in it, so the editable
    install of the checkout stays invisible."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    run([*pip, "install", "--no-deps", "--no-index", "-q", wheel])
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (purelib / "zz_dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return venv


@pytest.mark.slow
def test_the_wheel_installs_and_the_cli_resolves_every_shipped_config(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"lora_one_train/configs/{c}.yaml" for c in CONFIGS} <= set(names)
    assert "lora_one_train/cli.py" in names and "lora_one_jax/__init__.py" in names
    assert not [n for n in names if n.startswith(("train/", "configs/", "tests/"))]  # no top-level `train`

    venv = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    help_text = run(["lora-one-train", "--help"], cwd=elsewhere, env=env)
    assert help_text.startswith("usage: lora-one-train") and "--print-config" in help_text
    resolved = run([venv / "bin" / "python", "-c", RESOLVE], cwd=elsewhere, env=env).splitlines()
    assert [line.split()[0] for line in resolved] == CONFIGS
    assert "default default lora,lora-one" in resolved
    printed = run(["lora-one-train", "--print-config", "--set", "optim.learning_rate=1e-4"], cwd=elsewhere, env=env)
    assert "name: default\n" in printed and "learning_rate: 0.0001\n" in printed
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # --print-config writes nothing
