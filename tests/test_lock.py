"""The output folder's lock, with real processes: one holder, refusals naming it, stale locks taken over."""

import dataclasses
import io
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from lora_one_train.errors import LockError
from lora_one_train.lock import LockInfo, RunLock, read_lock

HOLD = """
import sys
from lora_one_train.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""

CONTEND = """
import pathlib, sys, time
from lora_one_train.errors import LockError
from lora_one_train.lock import RunLock
folder = pathlib.Path(sys.argv[1])
go = folder.parent / "go"
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    lock = RunLock(folder).acquire()
except LockError as e:
    print("refused", e, flush=True)
    sys.exit(3)
print("won", flush=True)
sys.stdin.read()
lock.release()
"""


def start(script, folder):
    return subprocess.Popen(
        [sys.executable, "-c", script, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def holder(folder):
    proc = start(HOLD, folder)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_with_the_holders_pid_and_start_time(tmp_path):
    proc = holder(tmp_path / "run")
    try:
        info = read_lock(tmp_path / "run" / ".lock")
        assert info.pid == proc.pid and info.hostname == socket.gethostname()
        with pytest.raises(LockError, match=f"in use by another run \\(pid {proc.pid} on .*, started ") as e:
            RunLock(tmp_path / "run").acquire()
        assert info.started_at in str(e.value)
        contender = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from lora_one_train.lock import RunLock; RunLock(sys.argv[1]).acquire()",
            ]
            + [str(tmp_path / "run")],
            capture_output=True,
            text=True,
        )
        assert contender.returncode == 1 and f"LockError: {tmp_path / 'run'} is in use" in contender.stderr
        assert read_lock(tmp_path / "run" / ".lock") == info  # the refused runs left the lock alone
    finally:
        proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert not (tmp_path / "run" / ".lock").exists()
    with RunLock(tmp_path / "run") as lock:  # free again
        assert read_lock(lock.path).pid == os.getpid()


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    script = "import sys\nfrom lora_one_train.lock import RunLock\nwith RunLock(sys.argv[1]):\n    1 / 0\n"
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr
    assert not (tmp_path / ".lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary files left either


def test_the_stale_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path):
    proc = holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert read_lock(tmp_path / ".lock").pid == proc.pid  # SIGKILL leaves the lock behind
    err = io.StringIO()
    with RunLock(tmp_path, stderr=err):
        assert read_lock(tmp_path / ".lock").pid == os.getpid()
    assert f"taking over the stale lock of {tmp_path} (pid {proc.pid} on " in err.getvalue()
    assert "no longer running" in err.getvalue()
    assert not (tmp_path / ".lock").exists()


def write_lock(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    info = dataclasses.replace(LockInfo.mine(), **changes)
    (folder / ".lock").write_text(info.to_json())
    return info


@pytest.mark.parametrize(
    "changes",
    [
        {"pid": "dead"},
        {"process_start": -1},  # the pid is alive but is another process (reused pid)
        {"boot_id": "another-boot"},  # written before a reboot
    ],
    ids=["dead-pid", "reused-pid", "rebooted"],
)
def test_locks_of_processes_that_are_gone_are_stale(tmp_path, changes):
    changes = {k: dead_pid() if v == "dead" else v for k, v in changes.items()}
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as live:
        stale = write_lock(tmp_path, **{"pid": live.pid, **changes})
        assert not stale.alive()
        err = io.StringIO()
        with RunLock(tmp_path, stderr=err):
            pass
        assert f"pid {stale.pid}" in err.getvalue()
        live.stdin.close()


@pytest.mark.parametrize("known_start", [True, False], ids=["same-start", "unknown-start"])
def test_a_live_holder_is_not_stale(tmp_path, known_start):
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as live:
        start_ticks = (
            int(pathlib.Path(f"/proc/{live.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
            if known_start
            else None
        )
        info = write_lock(tmp_path, pid=live.pid, process_start=start_ticks)  # unknown start: trust the pid
        assert info.alive()
        with pytest.raises(LockError, match=f"pid {live.pid} on "):
            RunLock(tmp_path).acquire()
        live.stdin.close()


def test_a_lock_from_another_host_is_refused_and_says_how_to_clear_it(tmp_path):
    write_lock(tmp_path, hostname="elsewhere", pid=dead_pid())
    with pytest.raises(LockError, match=f"pid \\d+ on elsewhere, .*if it has ended, delete {tmp_path / '.lock'}"):
        RunLock(tmp_path).acquire()


def test_an_unreadable_old_lock_is_refused(tmp_path):
    (tmp_path / ".lock").write_text("{not json")
    os.utime(tmp_path / ".lock", (time.time() - 60, time.time() - 60))
    with pytest.raises(LockError, match="is unreadable; if no run uses .* delete it"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_runs_started_together_exactly_one_gets_the_lock(tmp_path, stale):
    folder = tmp_path / "run"
    if stale:
        write_lock(folder, pid=dead_pid())
    procs = [start(CONTEND, folder) for _ in range(5)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 5
        (tmp_path / "go").touch()
        outcomes = [p.stdout.readline().split(" ", 1) for p in procs]
        assert sorted(o[0].strip() for o in outcomes) == ["refused"] * 4 + ["won"], [p.stderr.read() for p in procs]
        winner = next(p for p, o in zip(procs, outcomes) if o[0].strip() == "won")
        assert read_lock(folder / ".lock").pid == winner.pid
        assert all(f"pid {winner.pid} on " in o[1] for o in outcomes if o[0] == "refused")
    finally:
        for p in procs:
            p.stdin.close()
    assert sorted(p.wait(timeout=30) for p in procs) == [0] + [3] * 4
    assert sorted(p.name for p in folder.iterdir()) == []


def test_a_disabled_lock_holds_nothing(tmp_path):
    with RunLock(tmp_path), RunLock(tmp_path, enabled=False) as other:  # e.g. process 1 of a multi-process run
        assert other.info is None and read_lock(tmp_path / ".lock").pid == os.getpid()
    assert not (tmp_path / ".lock").exists()
