"""The output protocol of every command that writes a directory (train, adapt, inject, compose, export, data).

`OutputTarget(target, overwrite=..., resume=..., inputs=[...])` is a context manager:

- before anything is written it refuses, with an `OutputError` (exit 2): a target that is an existing file, a
  target that is (or holds, or lies inside) one of the command's own inputs, and a non-empty target unless
  `overwrite` (or `resume`, for a run that continues its own checkpoints) is given;
- it holds a lock file beside the target (`.NAME.lock`, holding the writer's PID): a second writer stops with an
  `OutputError` naming the holder; a lock whose process is gone is taken over;
- the command writes its result into `staging`, a directory beside the target; on success the staging
  directory and the target are exchanged in one rename (`renameat2(RENAME_EXCHANGE)` where the system has it,
  else two renames), so a reader sees the old directory whole or the new one whole. On failure the staging
  directory is removed and the target is untouched;
- `carry` names entries of the old target (a run's `checkpoints/`) moved into the new one after the exchange.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .errors import VlkitError

LOCK_SUFFIX = ".lock"
STAGING_TAG = ".staging-"


class OutputError(VlkitError):
    """An output directory that must not be written: not empty, one of the inputs, a file, or locked."""

    kind = "output"


def _same_or_nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EINVAL)):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputTarget:
    """One command's output directory, written whole (see the module docstring)."""

    def __init__(
        self,
        target: str | os.PathLike,
        *,
        overwrite: bool = False,
        resume: bool = False,
        inputs: Iterable[str | os.PathLike | None] = (),
        carry: Iterable[str] = (),
        what: str = "output directory",
        hint: str = "pass --overwrite to replace it",
    ):
        self.target = Path(target).expanduser()
        self.overwrite = overwrite
        self.resume = resume
        self.inputs = [Path(p).expanduser() for p in inputs if p is not None and str(p)]
        self.carry = tuple(carry)
        self.what = what
        self.hint = hint
        self._staging: Path | None = None
        self._lock: Path | None = None

    # --- checks ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Every refusal that needs no writing (called again on entry)."""
        t = self.target
        if t.exists() and not t.is_dir():
            raise OutputError(f"{self.what} {t} is an existing file, not a directory")
        holder = self.holder()
        if holder is not None:
            raise OutputError(
                f"{self.what} {t} is being written by another vlkit process (PID {holder}; lock {self.lock_path})"
            )
        for p in self.inputs:
            if p.exists() and _same_or_nested(t, p):
                raise OutputError(
                    f"{self.what} {t} is one of this command's inputs ({p}); write the result to a new directory"
                )
        if t.is_dir() and any(t.iterdir()) and not (self.overwrite or self.resume):
            raise OutputError(f"{self.what} {t} is not empty", hint=self.hint or None)

    # --- lock ------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.target.parent / f".{self.target.name}{LOCK_SUFFIX}"

    def holder(self) -> int | None:
        """The PID of another live process holding the lock, else None."""
        try:
            pid = int(self.lock_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid != os.getpid() and _pid_alive(pid) else None

    def _acquire(self) -> None:
        lock = self.lock_path
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = int(lock.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    holder = -1
                if holder != os.getpid() and _pid_alive(holder):
                    raise OutputError(
                        f"{self.what} {self.target} is being written by another vlkit process "
                        f"(PID {holder}; lock {lock})"
                    ) from None
                lock.unlink(missing_ok=True)  # its writer is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self._lock = lock
            return
        raise OutputError(f"cannot take the lock {lock} for {self.target}")

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    # --- staging ---------------------------------------------------------------------------------
    def _clean_stale(self) -> None:
        """Staging directories of writers that are gone (a kill before the exchange) are removed."""
        prefix = f".{self.target.name}{STAGING_TAG}"
        for p in self.target.parent.glob(prefix + "*"):
            try:
                pid = int(p.name[len(prefix) :])
            except ValueError:
                continue
            if not _pid_alive(pid) or pid == os.getpid():
                shutil.rmtree(p, ignore_errors=True)

    @property
    def staging(self) -> Path:
        """The directory to write the result into (there once the `with` block is entered)."""
        if self._staging is None:
            raise RuntimeError(f"the output target {self.target} has no staging directory outside its with block")
        return self._staging

    def __enter__(self) -> OutputTarget:
        self.check()
        self._acquire()
        try:
            self.check()  # again under the lock (our own lock is not "another process")
            self._clean_stale()
            self._staging = self.target.parent / f".{self.target.name}{STAGING_TAG}{os.getpid()}"
            self._staging.mkdir(parents=True)
        except BaseException:
            self._release()
            raise
        return self

    def publish(self) -> None:
        """Put the staging directory in the target's place (old whole or new whole), carry entries over."""
        staging, target = self.staging, self.target
        if target.is_dir():
            if not _exchange(staging, target):
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
                os.replace(staging, target)
                os.replace(old, staging)
            for name in self.carry:  # staging now holds the old directory
                src = staging / name
                if src.exists() and not (target / name).exists():
                    os.replace(src, target / name)
        else:
            os.replace(staging, target)
            staging.mkdir()  # removed below, like the old directory
        _fsync_dir(target.parent)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.publish()
        finally:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
            self._release()
