"""What the fuzz tests (tests/test_fuzz_*.py) share: byte mutations of valid inputs, scratch folders, and the
contract every reader of outside bytes keeps, checked on each input.

The contract: a reader returns a result, or raises a UserError (cli.py) whose one-line message names the file at
fault; never another exception, never a hang, and never an allocation the file's real size does not justify (a
length field claiming gigabytes is refused before anything is allocated). Profiles (how many inputs) are in
conftest.py: `python -m pytest tests/test_fuzz_*.py --hypothesis-profile long` for the long run.
"""
import contextlib
import io
import os
import shutil
import signal
import struct
import tempfile
import tracemalloc
import zipfile

from hypothesis import settings, strategies as st

from cli import UserError

SECONDS = 60          # one input's time limit: far above any honest input, so only a hang reaches it
RSS_GROWTH = 256 << 20  # resident memory one input may add beyond what Python and numpy account for
# Values that length and count fields meet in hostile files: 0, the edges of signed and unsigned integers, 2^64 - 1.
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**62, 2**63 - 1, 2**63,
               2**64 - 1]


class Hang(BaseException):
    """An input ran past SECONDS. A BaseException, so that no reader's `except Exception` turns it into a result."""


# ------------------------------------------------------------------------------------------------ mutations

@st.composite
def mutated(draw, data, region=None, max_edits=4):
    """`data` with 1..max_edits edits: a bit flipped, truncation, bytes inserted, deleted or overwritten, a block
    moved, or an interesting integer written (as a length field would hold it). With region (start, end), the
    edits keep the length and fall inside it (a zip member's bytes, edited in place)."""
    out = bytearray(data)
    lo, hi = region or (0, len(data))
    kinds = ["flip", "overwrite", "integer"] + ([] if region else ["truncate", "insert", "delete", "move"])
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(kinds))
        i = draw(st.integers(lo, max(lo, (hi if region else len(out)) - 1)))
        if kind == "flip" and i < len(out):
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif kind in ("overwrite", "integer"):
            if kind == "overwrite":
                new = draw(st.binary(min_size=1, max_size=16))
            else:
                width = draw(st.sampled_from([1, 2, 4, 8]))
                value = draw(st.sampled_from(INTERESTING)) % (1 << 8 * width)
                new = value.to_bytes(width, draw(st.sampled_from(["little", "big"])))
            n = min(len(new), hi - i) if region else len(new)  # in a region: cut at its end, keep the length
            out[i:i + n] = new[:n]
        elif kind == "truncate":
            del out[i:]
        elif kind == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del out[i:i + draw(st.integers(1, 64))]
        elif kind == "move":
            n = draw(st.integers(1, 256))
            block = out[i:i + n]
            del out[i:i + n]
            j = draw(st.integers(0, len(out)))
            out[j:j] = block
    return bytes(out)


def written(name, write):
    """A valid file to mutate: `write(path)` makes it in a scratch folder -> (its bytes, what torch.load reads)."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, name)
        write(path)
        with open(path, "rb") as f:
            return f.read(), torch.load(path, weights_only=True)


def saved(obj):
    """torch.save's bytes of obj: a hostile file made of a generated object."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def member_span(data, suffix):
    """(start, end) of the stored bytes of the zip member whose name ends with `suffix` (torch.save's data.pkl)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


# ------------------------------------------------------------------------------------------------ files

@contextlib.contextmanager
def scratch():
    """A fresh folder for one input, removed after it (readers may still hold mmaps of its files: unlinking is safe)."""
    folder = tempfile.mkdtemp(prefix="gqn-fuzz-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def put(folder, name, data):
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ------------------------------------------------------------------------------------------------ the contract

def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM, so each input's own peak can be read (False where refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _on_alarm(signum, frame):
    raise Hang(f"an input ran longer than {SECONDS} s")


def _allocation_failures(e):
    """The MemoryErrors (or torch's failed allocations) behind an exception, which a broad `except` may have
    turned into a UserError: an allocation was tried that the input did not justify."""
    seen = []
    while e is not None and len(seen) < 20:
        if isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "Unable to allocate" in str(e):
            return repr(e)
        seen.append(e)
        e = e.__cause__ or e.__context__
    return None


def run_reader(read, names, size):
    """read() under the contract -> (result, None) or (None, the UserError it raised).

    names: the path (or paths) one of which the message must hold; size: the input's bytes, which bound the
    memory it may take (64x, plus 32 MiB for the reader's own tables). Python's and numpy's allocations are
    traced (tracemalloc); resident memory catches what torch or C libraries allocate and touch.
    """
    names = [names] if isinstance(names, str) else list(names)
    limit = 64 * size + (32 << 20)
    rss_ok = _reset_peak_rss()
    rss_before = _status_kb("VmRSS")
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    tracemalloc.start()
    result = caught = None
    try:
        result = read()
    except UserError as e:
        caught = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert peak <= limit, f"allocated {peak} bytes (traced) for an input of {size} bytes"
    if rss_ok:
        grew = (_status_kb("VmHWM") - rss_before) << 10
        assert grew <= RSS_GROWTH, f"resident memory grew by {grew} bytes for an input of {size} bytes"
    if caught is not None:
        message = str(caught)
        assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
        assert any(n in message for n in names), f"names none of {names}: {message}"
        failed = _allocation_failures(caught)
        assert failed is None, f"a huge allocation was tried and failed behind {message!r}: {failed}"
    return result, caught


def share(fraction):
    """Settings for a property that takes `fraction` of its reader's inputs: each reader's properties together try
    the loaded profile's max_examples (conftest.py: quick, or long's 10,000 a reader)."""
    return settings(max_examples=max(1, round(settings().max_examples * fraction)))
