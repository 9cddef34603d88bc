"""Writing what users keep: every file a command writes goes through a temp file in the same folder and os.replace,
so that a reader, or a run killed mid-write, never sees half a file, and the old one stays until the new one is
whole. Checkpoints, shards, config.json, pictures, plots and JSON reports all come through here.
"""
import os
import tempfile

from cli import UserError


def current_umask():
    """The process umask (os.umask can only read it by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, data):
    """Write bytes to path through a temp file in the same folder and os.replace: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name does (a crash keeps the old file)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_out(flag, path, data):
    """atomic_write for a file a flag named: a failure is one line naming the flag and the file."""
    try:
        atomic_write(path, data)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write ({err.strerror or err})") from None
