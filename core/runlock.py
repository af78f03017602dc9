"""One writer per run directory: an flock on out_dir/.lock that names its holder (pid@host).

The kernel drops an flock when its holder dies, however it dies, so a SIGKILLed run never keeps
its directory locked. A second launch on a held directory fails at once, naming the holder.
"""
import fcntl
import os
import shutil
import socket
import time

from errors import UserError

LOCK = ".lock"


RUN_MARKS = (LOCK, "checkpoints", "metrics.jsonl", "FAILED")  # one is in every run directory: the lock comes first


def _refuse_foreign(out_dir: str) -> None:
    """A UserError if out_dir is a directory of other files (a project, a dataset): a run would write its
    config.yaml and metrics among them."""
    try:
        entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    except OSError:  # unreadable: taking the lock reports it
        return
    others = sorted(e for e in entries if not e.startswith("."))  # .gitkeep, .DS_Store: still an empty folder
    if others and not any(m in entries for m in RUN_MARKS):
        raise UserError(f"out_dir={out_dir} holds other files than a run's (e.g. {others[0]}); pass a new or empty "
                        f"directory, or a run's")


class RunLocked(UserError):
    """Another live process is writing this run directory."""


class RunLock:
    """Context manager: hold out_dir's lock for the whole run (process 0 of a multi-host run only)."""

    def __init__(self, out_dir: str, enabled: bool = True):
        self.out_dir, self.enabled = out_dir, enabled
        self.fd, self.created = None, False

    def __enter__(self):
        if not self.enabled:
            return self
        self.created = not os.path.exists(self.out_dir)
        _refuse_foreign(self.out_dir)
        path = os.path.join(self.out_dir, LOCK)
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to out_dir={self.out_dir} ({e.strerror}); choose a writable out_dir=") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise RunLocked(f"out_dir={self.out_dir} is in use by {holder}; wait for that run to finish (or stop "
                            f"it), or pass another out_dir=") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is None:
            return False
        # A new run that wrote nothing, or failed before logging a metric or saving a checkpoint (a bad
        # value, out of memory at the first step): leave nothing half-written behind. Cleared while the
        # lock is held, so a relaunch meanwhile cannot start writing into what is being removed.
        remove = self.created and (os.listdir(self.out_dir) == [LOCK] or (exc[0] is not None and not self._wrote()))
        if remove:
            for entry in os.listdir(self.out_dir):
                path = os.path.join(self.out_dir, entry)
                if entry != LOCK:
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            os.remove(os.path.join(self.out_dir, LOCK))
        else:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # releases the lock; the file stays, so no second inode can be locked meanwhile
        self.fd = None
        if remove:
            try:
                os.rmdir(self.out_dir)
            except OSError:  # another launch has just made its own lock here: the directory is its now
                pass
        return False

    def _wrote(self) -> bool:
        """Whether the run has anything to keep: a checkpoint, or a logged metric."""
        ckpts, metrics = os.path.join(self.out_dir, "checkpoints"), os.path.join(self.out_dir, "metrics.jsonl")
        return (os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))) or \
            (os.path.isfile(metrics) and os.path.getsize(metrics) > 0)
