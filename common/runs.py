"""Run folders: a run never overwrites another run (mmseg's habit).

    work_dirs/<config>/                    the work dir (--work_dir)
        latest                             names <run>/checkpoint-*.pth: the newest checkpoint of any run
        20261201_103300/                   one training run: config.json, log.txt, metrics.jsonl, checkpoints, pred/
            latest                         names its own newest checkpoint
            .lock                          {"pid", "host", "start", "since"} while a process writes the folder

A new run gets a new timestamped folder (mkdir is atomic, so two runs started in the same second get two folders).
`--resume auto` follows the work dir's latest and continues in that run's own folder; `--resume PATH` continues in
PATH's folder when it is a run folder of this work dir and PATH is that run's newest checkpoint, else starts a new
one (open_run). The work dir's `latest` only moves when a checkpoint has been written, so a failed or short run
never hides the last good one. The lock stops a second process (a second --resume auto) from writing a folder
another one is writing; a lock whose process is gone (same host, pid dead or reused) is stale and taken over.
--eval / --predict / --summary create no run folder.
"""
import fcntl
import json
import os
import socket
import time

from . import checkpoint
from .errors import UserError, make_folder

LOCK = ".lock"


class RunLockedError(UserError):
    pass


def new_run_dir(root):
    """Create and return root/<YYYYmmdd_HHMMSS>[_N], a folder no other run has."""
    make_folder(root, "--work_dir")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for n in range(1, 1000):
        path = os.path.join(root, stamp if n == 1 else f"{stamp}_{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:  # no permission, a read-only disk
            raise UserError(f"--work_dir {root}: cannot create a run folder in it ({e.strerror or e}): pass a "
                            "writable folder") from None
    raise UserError(f"--work_dir {root}: cannot create a run folder for {stamp} (999 exist)")


def run_of(ckpt_path, root):
    """The run folder of root that holds ckpt_path, else None (a checkpoint from elsewhere starts a new run)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return folder if os.path.dirname(folder) == os.path.abspath(root) else None


def runs(root):
    """root's run folders, oldest first (by name: the timestamps sort)."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if os.path.isdir(os.path.join(root, d)) and d[:8].isdigit() and len(d) >= 15)


def _start_time(pid):
    """The process's start time in clock ticks since boot (Linux), to tell a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, start):
    """Whether pid runs and is the process that started at `start` (None: cannot tell, so assume it is)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _start_time(pid)
    return start is None or now is None or now == start


class RunLock:
    """An exclusive lock on one run folder: a file holding its holder's pid, host and start time, which appears whole
    (_create) and is taken over only from a dead holder (_remove_if_stale)."""

    def __init__(self, folder):
        self.path, self.held = os.path.join(folder, LOCK), False

    def acquire(self, log=print):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                self._create(me)
            except FileExistsError:
                self._remove_if_stale(log)
                continue
            except OSError as e:  # the run's first write: a full disk or quota shows here
                raise UserError(f"--work_dir: could not write the lock {self.path} ({e.strerror or e}): is the disk "
                                "full?") from None
            self.held = True
            return self
        raise RunLockedError(f"cannot take the lock {self.path}: another process keeps taking it")

    def _create(self, me):
        """The lock file holding `me`, or FileExistsError. Written whole into a temp file, then hard-linked into
        place (link fails if the lock exists): a process that finds the lock always reads a whole one, so an
        unreadable lock can only be a dead process's. Where hard links fail, O_EXCL then write."""
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(me, f)
            try:
                os.link(tmp, self.path)
                return
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                pass
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError:
            os.remove(self.path)
            raise

    def _remove_if_stale(self, log):
        """Remove the lock if its process is gone (or it is unreadable), else RunLockedError naming the holder. Read
        and removed under an flock of the folder, so the file removed is the one read: two processes that both found
        one stale lock would otherwise both remove it, the second one removing the first one's new lock."""
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # a file system without flock (some NFS set-ups): the take-over is then unguarded
            try:
                with open(self.path) as f:
                    holder = json.load(f)
            except FileNotFoundError:
                return  # removed while we waited for the flock: try again
            except (OSError, ValueError):  # empty or half-written: a process killed between create and write
                holder = None
            if not isinstance(holder, dict):
                holder = None  # JSON, but not a lock a run wrote
            if holder is not None and not self._stale(holder):
                raise RunLockedError(
                    f"run folder {os.path.dirname(self.path)} is in use by pid {holder.get('pid')} on "
                    f"{holder.get('host')} (since {holder.get('since')}; lock {self.path}); wait for it to end, "
                    f"or delete the lock file if that process is gone")
            log(f"run: removing the stale lock {self.path} ({holder or 'unreadable'}: that process is gone)")
            try:
                os.remove(self.path)
            except FileNotFoundError:  # only without the flock: another process took it over first
                pass
        finally:
            os.close(fd)  # releases the flock

    @staticmethod
    def _stale(holder):
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: we cannot tell, so it holds
        pid = holder.get("pid")
        if type(pid) is not int or pid <= 0:  # not a pid (kill(-1 or 0) would signal a whole group): not ours
            return True
        return not _alive(pid, holder.get("start"))

    def release(self):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def open_run(root, resume_path, log=print):
    """(run folder, lock) for a training run: resume_path's run folder when it is that run's newest checkpoint, else a
    new one (resuming an earlier checkpoint in place would overwrite and prune the run's later ones). Rank 0 only."""
    folder = run_of(resume_path, root) if resume_path else None
    if folder is not None:
        newest = checkpoint.latest(folder)
        if newest is None or not os.path.samefile(newest, resume_path):
            log(f"run: {os.path.basename(resume_path)} is not the newest checkpoint of {folder} "
                f"({os.path.basename(newest) if newest else 'none recorded'}): this continues in a new run folder, "
                "and that run keeps its later checkpoints")
            folder = None
    if folder is None:
        folder = new_run_dir(root)
        lock = RunLock(folder).acquire(log)
        log(f"run: {folder} (new)")
        return folder, lock
    lock = RunLock(folder).acquire(log)
    left = checkpoint.temp_files(folder)
    if left:  # a save that a kill interrupted: its temp files are ours now that we hold the lock
        size = sum(os.path.getsize(p) for p in left)
        for p in left:
            os.remove(p)
        log(f"run: removed {len(left)} temp file(s) a killed run left ({size / 2**20:.1f} MB): "
            f"{', '.join(os.path.basename(p) for p in left)}")
    log(f"run: {folder} (resumed)")
    return folder, lock
