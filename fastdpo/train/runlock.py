"""An exclusive lock on a run's ``output_dir``, held by rank 0 for the life of ``fastdpo train``.

Two runs writing checkpoints, ``latest`` and ``metrics.jsonl`` into one folder would corrupt each other's
resume point, so a second run on a held folder fails at once, naming the holder.

The lock is ``fcntl.flock`` on ``output_dir/.fastdpo.lock`` rather than an ``O_EXCL`` file: the kernel
drops a flock when its process dies, however it dies (kill -9, OOM killer), so a crashed run never leaves
a lock that blocks the next one, and there is no window between "is the holder alive?" and "take it
over" for two starters to race through. The file also holds the holder's host, PID and start time as
JSON, only to say who holds it; it is emptied on a clean release. Finding the JSON of another process
on taking the lock means that process died holding it: the lock is taken over with a warning.
Only rank 0 of a torchrun job takes it (every rank of the job shares the folder by design). Within one
process the lock nests: ``fastdpo train`` holds it around building the ``Trainer`` (reference pass,
resume) and ``Trainer.train()`` takes it again for the steps, which a flock on a second descriptor of the
same file would refuse.
flock is advisory and per host on some network filesystems (NFS without lock support): there it guards
runs started on the same host only.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from fastdpo.errors import UserError

__all__ = ["LOCK_FILE", "RunLock", "removed_if_left_empty"]

LOCK_FILE = ".fastdpo.lock"
logger = logging.getLogger("fastdpo")
_HELD: dict[Path, int] = {}  # lock files this process holds -> how many RunLocks hold each


class RunLock:
    """``with RunLock(output_dir, enabled=is_rank_0):`` holds the folder's lock inside the block.

    Raises:
        UserError: Another live process holds the lock; the message names the folder and the holder.
    """

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.enabled = enabled
        self._fd: int | None = None
        self._nested: Path | None = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key] += 1
            self._nested = key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _describe(self._holder())
            raise UserError(
                f"output_dir: {self.path.parent} is in use by another fastdpo run ({holder}); expected one "
                "run per folder: wait for it to end, stop it, or use another output_dir"
            ) from None
        self._fd = fd
        previous = self._holder()
        if previous:
            logger.warning(
                "output_dir: taking over the stale lock %s of a run that ended without releasing it (%s)",
                self.path,
                _describe(previous),
            )
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _HELD[key] = 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._nested is not None:
            _HELD[self._nested] -= 1
            self._nested = None
        elif self._fd is not None:
            _HELD.pop(self.path.resolve(), None)
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def _holder(self) -> dict | None:
        """The holder's JSON in the lock file, or None when it is empty or unreadable (being written)."""
        try:
            text = self.path.read_text(encoding="utf-8")
            holder = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder not recorded yet"
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {holder.get('started')}"


@contextmanager
def removed_if_left_empty(output_dir: str | os.PathLike, *, enabled: bool = True) -> Iterator[None]:
    """On an exception inside, removes ``output_dir`` if the block created it and left it empty.

    A run that fails before writing anything (bad data, a model that does not load) should not leave a
    folder behind that looks like a run; the released lock file does not count as content. Only rank 0
    (``enabled``) may remove it: another rank cannot tell whether rank 0 created it or still uses it.
    """
    path = Path(output_dir)
    existed = not enabled or os.path.lexists(path)
    try:
        yield
    except BaseException:
        if not existed and path.is_dir():
            lock = path / LOCK_FILE
            entries = list(path.iterdir())
            if entries in ([], [lock]) and (not entries or lock.stat().st_size == 0):
                lock.unlink(missing_ok=True)
                path.rmdir()
        raise
