"""One run per output folder: ``with RunLock(folder): ...`` holds ``folder/.lock`` for the life of a run.

The lock file is created atomically (a hard link of a finished file, or ``O_EXCL``) and holds the holder's
pid, host, boot id, process start time and wall-clock start. A second run into the folder is refused with a
``LockError`` naming the holder; a lock whose process is gone (same host: the pid is dead, or was reused by
another process, or the machine rebooted) is taken over with a message on stderr. The lock is released on
exit, also on exceptions; a SIGKILLed run leaves a stale lock that the next run takes over.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with RunLock(folder) as lock:
    ...     (folder / ".lock").exists(), lock.info.pid == os.getpid()
    (True, True)
    >>> (folder / ".lock").exists()
    False
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from lora_one_train.errors import LockError

LOCK_NAME = ".lock"
#: an unreadable lock file younger than this may be one being written: wait, then read again
_FRESH_SECONDS = 5.0
_ATTEMPTS = 50


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces and ')'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder.

    Example:
        >>> info = LockInfo.mine()
        >>> LockInfo.from_json(info.to_json()) == info, info.alive()
        (True, True)
    """

    pid: int
    hostname: str
    started: float
    token: str
    boot_id: str | None = None
    process_start: int | None = None

    @classmethod
    def mine(cls) -> LockInfo:
        pid = os.getpid()
        return cls(pid, socket.gethostname(), time.time(), uuid.uuid4().hex, _boot_id(), _process_start(pid))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"started_at": self.started_at})

    @classmethod
    def from_json(cls, text: str) -> LockInfo:
        data = json.loads(text)
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})

    @property
    def started_at(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))

    def on_this_host(self) -> bool:
        return self.hostname == socket.gethostname()

    def alive(self) -> bool:
        """Whether the holder still runs; a holder on another host counts as alive (it cannot be checked)."""
        if not self.on_this_host():
            return True
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False
        if not _pid_alive(self.pid):
            return False
        now = _process_start(self.pid)
        return self.process_start is None or now is None or now == self.process_start

    def describe(self) -> str:
        return f"pid {self.pid} on {self.hostname}, started {self.started_at}"


def read_lock(path: Path) -> LockInfo | None:
    """The holder written in the lock file ``path``, or None when it is missing or unreadable.

    Example:
        >>> read_lock(Path("/nonexistent/.lock")) is None
        True
    """
    try:
        return LockInfo.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None


def _create(path: Path, info: LockInfo) -> bool:
    """Atomically create ``path`` holding ``info``; False when it already exists."""
    tmp = path.with_name(f"{path.name}.{info.token}.tmp")
    tmp.write_text(info.to_json())
    try:
        os.link(tmp, path)  # the lock appears with its content, never empty
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: O_EXCL, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(info.to_json())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, stale: LockInfo, stderr) -> None:
    """Delete the stale lock, under a takeover mutex so that of several runs that found it stale only one
    deletes it (each then races to ``_create`` its own: one wins, the others read a live holder)."""
    mutex = path.with_name(f"{path.name}.takeover")
    try:
        os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - mutex.stat().st_mtime > _FRESH_SECONDS:  # a takeover that died midway
                mutex.unlink()
        time.sleep(0.05)
        return
    try:
        if read_lock(path) == stale:
            print(
                f"lora-one-train: taking over the stale lock of {path.parent} ({stale.describe()}, no longer running)",
                file=stderr or sys.stderr,
            )
            path.unlink(missing_ok=True)
    finally:
        mutex.unlink(missing_ok=True)


class RunLock:
    """Context manager holding ``folder/.lock`` (the folder is created); see the module doc.

    ``enabled=False`` holds nothing: in a multi-process run only the process that writes (process 0) locks.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with RunLock(folder):
        ...     RunLock(folder).acquire()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        lora_one_train.errors.LockError: ... is in use by another run (pid ...); wait for it to end or use ...
    """

    def __init__(self, folder, *, enabled: bool = True, stderr=None):
        self.enabled = enabled
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.info: LockInfo | None = None
        self._stderr = stderr

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``LockError`` naming the live holder."""
        if not self.enabled:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = LockInfo.mine()
        for _ in range(_ATTEMPTS):
            if _create(self.path, mine):
                self.info = mine
                return self
            holder = read_lock(self.path)
            if holder is None:
                self._unreadable()
            elif holder.alive():
                raise LockError(
                    f"{self.folder} is in use by another run ({holder.describe()}); wait for it to end or use "
                    f"another output_dir" + ("" if holder.on_this_host() else f" (if it has ended, delete {self.path})")
                )
            else:
                _take_over(self.path, holder, self._stderr)
        raise LockError(f"could not lock {self.folder} after {_ATTEMPTS} attempts (other runs keep taking it)")

    def _unreadable(self) -> None:
        """Wait for a lock file that is being written; refuse one that stays unreadable."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if age > _FRESH_SECONDS:
            raise LockError(f"{self.path} is unreadable; if no run uses {self.folder}, delete it and rerun")
        time.sleep(0.1)

    def release(self) -> None:
        """Remove the lock if it is still ours (a stale-lock takeover may have replaced it)."""
        if self.info is not None and read_lock(self.path) == self.info:
            self.path.unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
