"""torch-gqn's scene files (`N.pt` / `N.pt.gz`, one pickled `Scene(frames, cameras)` each), read without trusting
them: the project's security boundary for data it did not write.

A pickle can run any code it names, so these files go through a restricted unpickler that knows only the few
globals a torch-gqn Scene pickle refers to (numpy's object array of JPEG bytes, a float32 array of 5-number
cameras, the Scene class), and refuses, before anything is allocated or called, any other global, a decompression
bomb, and a size a hostile file states but cannot back with its bytes.
"""
import io
import math
import pickle
import pickletools
import re
import zipfile
import zlib

import numpy as np

from cli import one_line
from gqn_format import DatasetError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER of the legacy (non-zip) format
LEGACY_NAME = re.compile(r"^(\d+)\.pt(\.gz)?$")


class _LegacyScene:
    """Stand-in for torch-gqn's `Scene(frames, cameras)` namedtuple: it only records what it is given."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state):
        self.state = state


class _LegacyArray(np.ndarray):
    """numpy.ndarray as a Scene pickle names it. numpy's pickles build an empty array (_legacy_reconstruct) and fill
    it with __setstate__; both are checked first, since a shape read from a hostile file would otherwise allocate
    (and for object arrays fill) gigabytes from a few bytes."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("calls numpy.ndarray, which numpy's own pickles never do")

    def __setstate__(self, state):
        shape, dtype, raw = state[-4], np.dtype(state[-3]), state[-1]
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise pickle.UnpicklingError(f"array of shape {shape!r}")
        n = math.prod(shape)
        held = (len(raw) if isinstance(raw, list) else
                len(raw) // dtype.itemsize if isinstance(raw, bytes) and dtype.itemsize else -1)
        if held != n or (isinstance(raw, bytes) and len(raw) != n * dtype.itemsize):
            raise pickle.UnpicklingError(f"array of shape {shape} holds data for {held} elements")
        super().__setstate__(state)


def _legacy_reconstruct(subtype, shape, dtype):
    # numpy's ndarray.__reduce__ always passes (ndarray, (0,), b'b'): anything else is not numpy's pickle
    if subtype is not _LegacyArray or math.prod(shape if isinstance(shape, tuple) else (shape,)) != 0:
        raise pickle.UnpicklingError(f"_reconstruct of a {getattr(subtype, '__name__', subtype)} of shape {shape!r}")
    return _multiarray.multiarray._reconstruct(_LegacyArray, shape, dtype)


def _empty_bytes(*args):
    # Protocol-2 pickles spell b"" as bytes(); bytes(n) from a hostile file would allocate n bytes.
    if args:
        raise pickle.UnpicklingError("bytes() with arguments")
    return b""


def _latin1_encode(text, encoding="utf-8"):
    # Protocol-2 pickles spell `bytes` as _codecs.encode(str, "latin1"); no other codec is ever needed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


_multiarray = getattr(np, "_core", None) or np.core
# Everything a torch-gqn Scene pickle refers to (numpy object array of bytes, float32 array, the Scene class).
_LEGACY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _legacy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _legacy_reconstruct,
    ("numpy", "ndarray"): _LegacyArray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__main__", "Scene"): _LegacyScene,
    ("__mp_main__", "Scene"): _LegacyScene,
    ("convert2torch", "Scene"): _LegacyScene,
}
# A scene file is JPEG bytes, which do not compress: contents beyond this many times the file are a decompression
# bomb, refused before they are inflated.
_LEGACY_EXPANSION = 64


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _LEGACY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("holds torch tensors/storages, which torch-gqn Scene files never do")


def _unpickle(f):
    """The next pickle in f, through _RestrictedUnpickler, after a walk over its opcodes (pickletools, which reads
    no more than the data holds). CPython's unpickler allocates first what a pickle states: a counted bytes or str
    (BINBYTES8: up to 2^64 - 1) before reading it, a memo table up to a PUT's index; both are refused here when the
    data cannot justify them (a pickler numbers its memo entries in order, so an index is below the opcodes seen)."""
    start = f.tell()
    for count, (op, arg, _) in enumerate(pickletools.genops(f)):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > count:
            raise pickle.UnpicklingError(f"memo index {arg} at opcode {count}")
    f.seek(start)
    return _RestrictedUnpickler(f).load()


def _scene_fields(obj):
    if isinstance(obj, _LegacyScene):
        args, kwargs, state = obj.args, obj.kwargs, obj.state
        if len(args) == 2:
            return args
        if isinstance(state, dict) and "frames" in state and "cameras" in state:
            return state["frames"], state["cameras"]
        if "frames" in kwargs and "cameras" in kwargs:
            return kwargs["frames"], kwargs["cameras"]
    if isinstance(obj, tuple) and len(obj) == 2:
        return obj
    raise pickle.UnpicklingError(f"payload is a {type(obj).__name__}, not a Scene(frames, cameras)")


def _gunzip(data, limit):
    """gzip bytes -> their contents, inflating no more than `limit` bytes."""
    z = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = z.decompress(data, limit + 1)
    if len(out) > limit:
        raise pickle.UnpicklingError(f"decompresses to more than {_LEGACY_EXPANSION}x its size, which JPEG bytes "
                                     f"never do")
    if not z.eof:
        raise pickle.UnpicklingError("gzip stream ends early (truncated)")
    return out


def load_legacy_scene(path):
    """Read one torch-gqn scene file (`N.pt` / `N.pt.gz`) -> (list of S >= 1 JPEG bytes, float32 cameras [S, 5]).

    Raises DatasetError naming the file if it is anything else; a pickle asking for any global outside
    _LEGACY_GLOBALS is refused before anything is called, and so is one that would inflate or allocate more than
    _LEGACY_EXPANSION times the file's size.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        limit = _LEGACY_EXPANSION * len(data) + (1 << 20)
        if data[:2] == b"\x1f\x8b":
            data = _gunzip(data, limit)
        if data[:4] == b"PK\x03\x04":  # written by torch >= 1.6: a zip holding <name>/data.pkl
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                pkl = [i for i in z.infolist() if i.filename.endswith("data.pkl")]
                if not pkl:
                    raise pickle.UnpicklingError("zip file without data.pkl")
                if pkl[0].file_size > limit:
                    raise pickle.UnpicklingError(f"data.pkl claims {pkl[0].file_size} bytes")
                obj = _unpickle(io.BytesIO(z.read(pkl[0])))
        else:  # legacy torch.save stream: magic, protocol, sys_info, payload, storage keys (each a pickle)
            f = io.BytesIO(data)
            if _unpickle(f) != _LEGACY_MAGIC:
                raise pickle.UnpicklingError("not a torch.save file (bad magic number)")
            _unpickle(f)
            _unpickle(f)
            obj = _unpickle(f)
        frames, cameras = _scene_fields(obj)
        frames = list(np.asarray(frames, dtype=object).reshape(-1))
        if not frames or not all(isinstance(x, bytes) for x in frames):
            raise pickle.UnpicklingError("frames are not a list of JPEG bytes")
        frames = [bytes(x) for x in frames]  # numpy.bytes_ -> bytes
        cameras = np.asarray(cameras, dtype=np.float32).reshape(-1, 5)
        if len(frames) != len(cameras):
            raise pickle.UnpicklingError(f"{len(frames)} frames but {len(cameras)} cameras")
        if not np.isfinite(cameras).all():
            raise pickle.UnpicklingError("a camera is not finite")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({one_line(e.strerror or e)})") from None
    except Exception as e:  # malformed input of any kind: one clear line, never a half-loaded object
        raise DatasetError(f"{path}: not a torch-gqn Scene file: {one_line(e)}") from None
    return frames, cameras
