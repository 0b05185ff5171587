"""Write-then-rename: a reader (sft-jobs, a restarted job, another rank) never sees half a file or directory."""

import fcntl
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

MARKER = "COMPLETE"  # written last inside a built directory: present means complete
FAILED = ".failed"  # suffix of the file that tells waiters that the builder failed


def write_text_atomic(path: Path, text: str, durable: bool = False) -> Path:
    """durable: the bytes are on disk before the name appears (a marker that vouches for other files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # unique per writer
    with os.fdopen(fd, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; run files are for the whole team to read
    os.replace(tmp, path)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def build_once(final: Path, build: Callable[[Path], None]) -> bool:
    """Make directory `final` with build(tmp_dir) unless it is complete; True when it was already there.

    One builder at a time across processes (flock). The directory is built in a temporary sibling,
    gets its marker last and is renamed into place, so it only ever appears complete. A builder
    that was killed leaves a temporary directory; the next builder, holding the lock, removes it.
    """
    final = Path(final)
    if is_complete(final):
        return True
    final.parent.mkdir(parents=True, exist_ok=True)
    failed = final.with_name(final.name + FAILED)
    with _lock(final.with_name(f".{final.name}.lock")) as lock:
        if is_complete(final):  # another builder sharing this file system finished while we waited
            return True
        failed.unlink(missing_ok=True)
        if lock.held:  # without the lock, these may be another builder's work in progress
            for stale in glob.glob(glob.escape(str(final.parent / f".{final.name}.tmp-")) + "*"):
                shutil.rmtree(stale, ignore_errors=True)  # a killed builder's leftovers
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover (the marker was removed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            build(tmp)
            write_text_atomic(tmp / MARKER, json.dumps({"built": time.time()}))
            os.rename(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_complete(final):  # lost a race with a builder whose lock we could not see
                return True
            write_text_atomic(failed, f"{type(e).__name__}: {e}")
            raise
    return False


def replace_dir_atomic(final: Path, build: Callable[[Path], None]) -> Path:
    """Build directory `final` in a temporary sibling and rename it into place (replacing an earlier
    one): readers see the old directory, or the new one complete, never half of one. A builder that
    was killed leaves only a temporary directory, removed by the next build."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(glob.escape(str(final.parent / f".{final.name}.tmp-")) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)
        build(tmp)
        rename_over(tmp, final, final.with_name(f".{final.name}.tmp-old"))  # an earlier one: the new one wins
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def rename_over(src: Path, final: Path, aside: Path) -> None:
    """Rename directory `src` to `final`, replacing one there (moved to `aside`, then removed):
    two renames, so `final` is never a merge of the two."""
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(src, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(src, final)


class _lock:
    """An exclusive flock, best effort: file systems without flock fall back to the atomic rename."""

    def __init__(self, path: Path):
        self.path, self.file, self.held = path, None, False

    def __enter__(self):
        try:
            self.file = open(self.path, "w")
            fcntl.flock(self.file, fcntl.LOCK_EX)
            self.held = True
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()  # closing releases the lock
