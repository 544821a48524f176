"""One training run per output directory: a lock file held from start to exit.

``<out_dir>/.layerfreeze.lock`` is created with ``O_CREAT | O_EXCL`` (one creator wins) and holds
the holder's host, PID, start time and command line as JSON; the holder also keeps an exclusive
``fcntl.flock`` on it for its lifetime. A second run into the same directory is refused with one
line naming the holder. A lock left by a run that died (same host, PID no longer alive) is taken
over with a warning naming it; a lock from another host cannot be checked from here, so the run
is refused and told how to remove it. Released (file removed) at exit.

Known limit: a PID reused by an unrelated process makes a stale lock look alive (remove the
file by hand, as the message says).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from layerfreeze.errors import ConfigError
from layerfreeze.utils.io import RUN_LOCK_FILE
from layerfreeze.utils.logging import get_logger

__all__ = ["RunLock", "RUN_LOCK_FILE"]

logger = get_logger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
        if isinstance(started, (int, float)) else "?"
    )
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}, "
        f"command: {holder.get('command', '?')}"
    )


class RunLock:
    """The lock of one run directory. Use :meth:`acquire` at start and :meth:`release` at exit.

    Args:
        directory: the run's output directory (created if missing).
        key: the config key named in messages (``logging.out_dir``).
    """

    def __init__(self, directory: str | os.PathLike, key: str = "logging.out_dir") -> None:
        self.directory = Path(directory)
        self.path = self.directory / RUN_LOCK_FILE
        self.key = key
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "command": " ".join(sys.argv),
        }
        self._fd: int | None = None

    def _write(self, fd: int) -> None:
        data = (json.dumps(self.holder) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock, or take over a stale one (with a warning).

        Raises:
            ConfigError: another live run holds the directory, or a run on another host does
                (one line naming it, and how to remove a lock left behind).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self._take_over()
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._write(fd)
        self._fd = fd

    def _refuse(self, holder: dict[str, Any] | None, why: str) -> ConfigError:
        who = _describe(holder) if holder else "unreadable lock file"
        return ConfigError(
            f"{self.key}: {self.directory} is in use by another training run ({who}){why}. "
            "Wait for it to finish or choose another logging.out_dir."
        )

    def _take_over(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:  # released between our two calls: try again from the start
            self.acquire()
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live holder keeps the flock
            os.close(fd)
            raise self._refuse(self._read(), "") from None
        holder = self._read()
        here = socket.gethostname()
        if holder is None or holder.get("host") != here:
            os.close(fd)
            if holder is None:
                raise self._refuse(None, f"; if no run uses it, delete {self.path}")
            raise self._refuse(
                holder,
                f"; it runs on another host, which cannot be checked from {here}: if that run "
                f"is gone, delete {self.path} and start again",
            )
        pid = holder.get("pid")
        if isinstance(pid, int) and _pid_alive(pid) and pid != os.getpid():
            os.close(fd)
            raise self._refuse(
                holder, f"; if that process is not a training run, delete {self.path}"
            )
        logger.warning(
            "%s: taking over the lock %s of a run that is no longer alive (%s)",
            self.key, self.path, _describe(holder),
        )
        self._write(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent)."""
        if self._fd is None:
            return
        current = self._read()
        if current is not None and all(current.get(k) == self.holder[k] for k in ("host", "pid")):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

