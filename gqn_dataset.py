"""GQN scenes as tensors: the converted format, its reader (also for torch-gqn folders), and training batches.

Follows the data of Eslami et al. 2018 (supplementary section "Datasets" and the training procedure of
section "Training"): a scene is S views, each an image x^k and a viewpoint v^k; a training example is M context
views (x, v), M drawn uniformly in 1..K per scene (K = MAX_CONTEXT: rooms 5, jaco 7, mazes 20, Shepard-Metzler
15), and one other view of the same scene as the query (x_q, v_q). Viewpoints are 7-d, in the order of
DeepMind's gqn-datasets data_reader.py: (x, y, z, sin yaw, cos yaw, sin pitch, cos pitch) (cameras.py).

Converted split folder: one `torch.save` file per source shard (`001-of-900.pt`), loadable with
`torch.load(p, weights_only=True, mmap=True)`: {"format": "gqn-jpeg-v1", "dataset", "image_size", "views",
"jpeg": uint8 [all JPEG bytes], "offsets": int64 [N*S+1], "cameras": float32 [N, S, 7]}, and, when the camera
model is known, the optional float keys "fov" (field of view in degrees, horizontal = vertical: images are
square), "near" and "far" (the depth range the scenes occupy, along the camera's axis, in scene units). Shards
written before these keys existed, DeepMind's and torch-gqn's data have none (GQNDataset gives None). The optional
key "source" says which tool wrote the shard (SOURCES), so that a folder holding two data sets that share a name
(DeepMind's Shepard-Metzler scenes and the built-in renderer's) is refused instead of read as one. The JPEGs are
DeepMind's own bytes (lossless, about the TFRecords' size); with mmap only the views asked for are read.
"""
import bisect
import functools
import io
import math
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
import zlib
from collections import namedtuple

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

from cameras import pose7
from cli import UserError, one_line

FORMAT = "gqn-jpeg-v1"
CAMERA_KEYS = ("fov", "near", "far")  # optional shard keys: the camera model, when known
# The optional shard key "source": which tool wrote it, and how an error names that.
SOURCES = {"gqn-datasets": "DeepMind's gqn-datasets (dataset/convert2torch.py)",
           "renderer": "the built-in renderer (dataset/shepard_metzler.py)",
           "import": "own scenes (dataset/import_scenes.py)"}
JPEG_QUALITY = 95  # frames this project encodes: quality and 4:2:0 chroma subsampling as in DeepMind's frames
# Pixels a side of the largest image a shard may hold: GQN's data are 64-128; an image_size read from a damaged
# file sizes every decoded batch, so a larger one is refused rather than allocated.
MAX_IMAGE_SIZE = 4096

# Maximum number of context views per data set (K of the paper's training procedure).
MAX_CONTEXT = {"shepard_metzler_5_parts": 15, "shepard_metzler_7_parts": 15, "rooms_ring_camera": 5,
               "rooms_free_camera_no_object_rotations": 5, "rooms_free_camera_with_object_rotations": 5,
               "jaco": 7, "mazes": 20}


def _info(image_size, views, train_files, test_files):
    return dict(image_size=image_size, views=views, train_files=train_files, test_files=test_files)


# DeepMind's gqn-datasets data_reader.py _DATASETS: frame_size, sequence_size, train_size/test_size (file counts).
DATASETS = {
    "jaco": _info(64, 11, 3600, 400),
    "mazes": _info(84, 300, 1080, 120),
    "rooms_free_camera_with_object_rotations": _info(128, 10, 2034, 226),
    "rooms_ring_camera": _info(64, 10, 2160, 240),
    "rooms_free_camera_no_object_rotations": _info(64, 10, 2160, 240),
    "shepard_metzler_5_parts": _info(64, 15, 900, 100),
    "shepard_metzler_7_parts": _info(64, 15, 900, 100),
}


class DatasetError(UserError, ValueError):
    """A folder or file that is not GQN data this module can read; the message names it."""


# ----------------------------------------------------------------------------------------------------------------
# Writing the converted format

def current_umask():
    """The process umask (os.umask can only read it by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def camera_model(fov=None, near=None, far=None):
    """The optional camera keys of a shard -> {"fov", "near", "far"}: those given, as floats, checked.

    fov: degrees in (0, 180), of square images; near, far: depths along the camera's axis, 0 < near < far.
    """
    out = {k: float(v) for k, v in (("fov", fov), ("near", near), ("far", far)) if v is not None}
    for k, v in out.items():
        if not (math.isfinite(v) and v > 0):
            raise DatasetError(f"{k} {v}: must be a positive number")
    if out.get("fov", 1) >= 180:
        raise DatasetError(f"fov {out['fov']}: must be below 180 degrees")
    if out.get("near", 0) >= out.get("far", math.inf):
        raise DatasetError(f"near {out['near']}, far {out['far']}: need near < far")
    return out


def write_shard(path, frames, cameras, dataset, image_size, camera=None, source=None):
    """Write one converted shard atomically (temp file in the same folder, then os.replace).

    frames: N lists of S JPEG `bytes` (stored as they are, never re-encoded); cameras: float32 [N, S, 7];
    camera: None or a dict with any of "fov", "near", "far" (camera_model), stored as top-level floats; source: a key
    of SOURCES, the tool that wrote it (None: not recorded).
    """
    n = len(frames)
    cameras = np.ascontiguousarray(cameras, dtype=np.float32)
    s = len(frames[0]) if n else (cameras.shape[1] if cameras.ndim == 3 else 0)
    if cameras.shape != (n, s, 7):
        raise ValueError(f"{path}: cameras shape {cameras.shape} does not match {n} scenes x {s} views x 7")
    if not 1 <= int(image_size) <= MAX_IMAGE_SIZE:  # what GQNDataset would refuse to read
        raise DatasetError(f"{path}: image_size {image_size}: the format holds 1 to {MAX_IMAGE_SIZE} pixels a side")
    views = [bytes(f) for scene in frames for f in scene]
    if len(views) != n * s or any(len(scene) != s for scene in frames):
        raise ValueError(f"{path}: every scene must have {s} views")
    lengths = np.fromiter((len(f) for f in views), dtype=np.int64, count=len(views))
    offsets = np.zeros(n * s + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = bytearray(b"".join(views))
    jpeg = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    obj = {"format": FORMAT, "dataset": str(dataset), "image_size": int(image_size), "views": int(s),
           "jpeg": jpeg, "offsets": torch.from_numpy(offsets), "cameras": torch.from_numpy(cameras)}
    unknown = set(camera or {}) - set(CAMERA_KEYS)
    if unknown:
        raise ValueError(f"{path}: camera keys {sorted(unknown)}: only {', '.join(CAMERA_KEYS)}")
    obj.update(camera_model(**(camera or {})))
    if source is not None:
        if source not in SOURCES:
            raise ValueError(f"{path}: source {source!r}: one of {', '.join(SOURCES)}")
        obj["source"] = source
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Same folder, so os.replace is an atomic rename: a killed run leaves no half-written shard under the real name.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the shard the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def encode_jpeg(image):
    """uint8 [H, W, 3] -> JPEG bytes at JPEG_QUALITY with 4:2:0 chroma subsampling, as in DeepMind's frames."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# torch-gqn legacy scene files, through a restricted unpickler

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER of the legacy (non-zip) format
_LEGACY_NAME = re.compile(r"^(\d+)\.pt(\.gz)?$")


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


# ----------------------------------------------------------------------------------------------------------------
# The reader

def _decode_into(jpeg, out, where):
    """Decode one JPEG into out ([H, W, 3] uint8, contiguous) with libjpeg's accurate IDCT, as Pillow does."""
    try:
        img = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=out)
    except ValueError as e:
        raise DatasetError(f"{where}: bad JPEG ({one_line(e)})") from None
    if img.shape != out.shape:
        raise DatasetError(f"{where}: JPEG is {img.shape[1]}x{img.shape[0]}, expected {out.shape[1]}x{out.shape[0]}")


def foreign_shards(folder, source):
    """A shard in `folder` that another tool than `source` wrote (SOURCES), as "PATH (from ...)", or None: a tool
    about to write its shards there must not mix two data sets (the names 001-of-NNN.pt are everyone's)."""
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".pt") and not name.startswith("."):
            path = os.path.join(folder, name)
            try:
                other = torch.load(path, weights_only=True, mmap=True).get("source")
            except Exception:
                other = None  # not a shard this tool can read: left to the reader to name
            if isinstance(other, str) and other and other != source:
                return f"{path} (from {SOURCES.get(other, one_line(other))})"
    return None


def _is_converted(path):
    try:
        obj = torch.load(path, weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


# The shard's arrays as write_shard stores them: key, dtype, rank.
_SHARD_TENSORS = (("jpeg", torch.uint8, 1), ("offsets", torch.int64, 1), ("cameras", torch.float32, 3))


def _identity(path):
    """What tells a file changed on disk: (inode, size, mtime in ns); DatasetError naming it if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({one_line(e.strerror or e)})") from None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _known(layout):
    """GQNDataset.layout -> {file name: its scenes}; {} for None. DatasetError if it is not one."""
    if not layout:
        return {}
    try:
        names = layout["names"].split("\n")
        scenes = layout["scenes"] if layout["format"] == "converted" else [1] * len(names)
        if layout["format"] not in ("converted", "legacy") or len(scenes) != len(names) or \
                not all(type(n) is int and n >= 0 for n in scenes):
            raise ValueError(layout["format"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"the checkpoint's record of the data folder is damaged ({one_line(e)})") from None
    return dict(zip(names, scenes))


def _plain(t, name, dtype, dim):
    """A shard's tensor -> its numpy array, if it is what write_shard stores: dense, contiguous, on the CPU, of that
    dtype and rank. Its size is then its bytes in the file (a stride-0 or sparse tensor could claim any size)."""
    if (type(t) is not torch.Tensor or t.dtype != dtype or t.dim() != dim or t.layout != torch.strided
            or t.device.type != "cpu" or not t.is_contiguous()):
        raise ValueError(f"{name} is not a contiguous {dim}-d {dtype} tensor")
    return t.numpy()


def _read_shard(path):
    """Load and check one converted shard -> ((dataset, image_size, views), (fov, near, far), source, (jpeg,
    offsets, cameras) as mmap'd numpy arrays). The fields are checked against each other and their ends (the
    offsets' first and last, the cameras' shape), so that nothing is sized from a damaged or hostile value; each
    scene's own offsets and cameras are checked when it is read (GQNDataset._scene). DatasetError names the file."""
    try:
        obj = torch.load(path, weights_only=True, mmap=True)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"no format {FORMAT!r}")
        dataset, size, views, source = (obj.get(k) for k in ("dataset", "image_size", "views", "source"))
        if not isinstance(dataset, str) or not (source is None or isinstance(source, str)):
            raise ValueError("dataset or source is not a string")
        if type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE or type(views) is not int or views < 0:
            raise ValueError(f"image_size {size!r} or views {views!r} out of range")
        jpeg, offsets, cameras = (_plain(obj.get(k), k, dtype, dim) for k, dtype, dim in _SHARD_TENSORS)
        if (cameras.shape[1:] != (views, 7) or len(offsets) != len(cameras) * views + 1 or offsets[0] != 0
                or offsets[-1] != len(jpeg)):
            raise ValueError("inconsistent header")
        if len(offsets) > 1:  # the first frame's size, so that a damaged image_size allocates nothing to decode
            h, w, _, _ = simplejpeg.decode_jpeg_header(jpeg[offsets[0]:offsets[1]])
            if (h, w) != (size, size):
                raise ValueError(f"its first frame is {w}x{h}, its image_size {size}")
        camera = camera_model(**{k: obj[k] for k in CAMERA_KEYS if obj.get(k) is not None})
    except Exception as e:  # torch's zip reader adds paragraphs of advice after its first sentence
        raise DatasetError(f"{path}: not a converted GQN shard ({one_line(e).split('. ')[0]})") from None
    return (dataset, size, views), tuple(camera.get(k) for k in CAMERA_KEYS), source, (jpeg, offsets, cameras)


class GQNDataset(torch.utils.data.Dataset):
    """One split folder of scenes: converted shards (`*.pt`) or a torch-gqn folder (`N.pt` / `N.pt.gz`).

    ds[i] -> (frames uint8 [S, 3, H, W], cameras float32 [S, 7]); ds.load(i, views) decodes only those views.
    ds.fov, ds.near, ds.far: the camera model the data records (float, or None when not recorded).

    A file that cannot be read when the folder is opened is refused (DatasetError), unless
      - `layout` (ds.layout of the folder when a run began, as its checkpoints keep it) lists it: the folder is then
        read as it was, those files in that order, and one that cannot be read now serves the number of scenes it
        had, each raising DatasetError when read (training skips them), so a resumed run indexes its scenes as the
        run it continues did;
      - or `skip_unreadable`: it is left out (evaluation).
    ds.unreadable lists such files as (path, why).
    """

    def __init__(self, root, layout=None, skip_unreadable=False):
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise DatasetError(f"data folder {self.root} does not exist" if not os.path.exists(self.root)
                               else f"{self.root} is not a folder")
        self._known = _known(layout)
        self._skip, self.unreadable = skip_unreadable, []
        names = sorted(n for n in os.listdir(self.root) if not n.startswith("."))
        legacy = sorted((int(m.group(1)), n) for n in names if (m := _LEGACY_NAME.match(n)))
        shards = [n for n in names if n.endswith(".pt") and not _LEGACY_NAME.match(n)]
        # A digits-only name such as `0.pt` may still be a converted shard: look inside before calling it legacy.
        if legacy and not shards and _is_converted(os.path.join(self.root, legacy[0][1])):
            shards, legacy = [n for _, n in legacy], []
        if layout:  # the files the run began with, in its order, present or not
            names = layout["names"].split("\n")
            shards, legacy = (names, []) if layout["format"] == "converted" else ([], list(enumerate(names)))
        if shards and legacy:
            raise DatasetError(f"{self.root} mixes converted shards and torch-gqn scene files; keep one kind")
        if shards:
            self._init_converted(shards)
        elif legacy:
            self._init_legacy([n for _, n in legacy])
        else:
            raise DatasetError(f"{self.root} holds no GQN data (converted *.pt shards or torch-gqn N.pt[.gz] "
                               f"files){self._hint(names)}")

    def _hint(self, names):
        if any(n.endswith(".tfrecord") for n in names):
            return "; it holds TFRecords: convert them first with dataset/convert2torch.py"
        splits = [n for n in ("train", "test") if os.path.isdir(os.path.join(self.root, n))]
        if splits:
            return f"; pass a split folder, e.g. {os.path.join(self.root, splits[0])}"
        return ""

    def _init_converted(self, shards):
        self.format = "converted"
        self._paths = [os.path.join(self.root, n) for n in shards]
        self._shards, self._mapped = {}, {}
        counts = []
        for i, path in enumerate(self._paths):
            try:
                identity = _identity(path)
                head, camera, source, arrays = _read_shard(path)
            except DatasetError as e:
                counts.append(self._unreadable(path, e))
                continue
            if len(self._shards) == 0:
                self.dataset, self.image_size, self.views = head
                self.fov, self.near, self.far = camera
                self.source, source_path = source, path
            elif source and self.source and source != self.source:
                raise DatasetError(f"{self.root} holds two data sets: {source_path} is from "
                                   f"{SOURCES.get(self.source, one_line(self.source))} and {path} from "
                                   f"{SOURCES.get(source, one_line(source))}; keep one data set a folder")
            elif head != (self.dataset, self.image_size, self.views):
                raise DatasetError(f"{path}: holds {one_line(head[0])} {head[1]}px x {head[2]} views, unlike "
                                   f"{source_path} ({one_line(self.dataset)} {self.image_size}px x {self.views} "
                                   f"views)")
            elif camera != (self.fov, self.near, self.far):
                raise DatasetError(f"{path}: records fov, near, far {camera}, unlike {source_path} "
                                   f"{(self.fov, self.near, self.far)}: two data sets in one folder?")
            self.source = self.source or source
            self._shards[i] = arrays  # mmap'd, so this holds no file handle and reads no JPEG bytes
            self._mapped[i] = identity
            counts.append(len(arrays[2]))
        if not self._shards:
            raise DatasetError(self.unreadable[0][1])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()

    def _unreadable(self, path, e):
        """A file that cannot be read when the folder is opened -> the scenes it serves (as unreadable ones), or
        DatasetError (see the class docstring)."""
        name = os.path.basename(path)
        if name not in self._known and not self._skip:
            raise e
        self.unreadable.append((path, str(e)))
        return self._known.get(name, 0)

    @property
    def layout(self):
        """The files this folder is read from, for GQNDataset(root, layout) to read it as now: {"format", "names" (one
        string, a line each: a torch-gqn folder may hold a million files), "scenes" (each shard's; converted only)}."""
        out = {"format": self.format, "names": "\n".join(os.path.basename(p) for p in self._paths)}
        if self.format == "converted":
            out["scenes"] = np.diff(self._starts).tolist()
        return out

    def _init_legacy(self, files):
        self.format = "legacy"
        self.fov = self.near = self.far = None  # torch-gqn's files record no camera model
        self.source = None
        self._paths = [os.path.join(self.root, n) for n in files]
        self._starts = list(range(len(files) + 1))
        for first in self._paths:  # the first that reads says what the scenes are; with `layout`, others may not
            try:
                frames, _ = load_legacy_scene(first)
                h, w, _, _ = simplejpeg.decode_jpeg_header(frames[0])
                break
            except DatasetError as e:
                self._unreadable(first, e)
            except ValueError as e:
                self._unreadable(first, DatasetError(f"{first}: bad JPEG ({one_line(e)})"))
        else:
            raise DatasetError(self.unreadable[0][1])
        self.views = len(frames)
        if h != w or not 1 <= h <= MAX_IMAGE_SIZE:
            raise DatasetError(f"{first}: frames are {w}x{h}; GQN reads square images of at most "
                               f"{MAX_IMAGE_SIZE} pixels a side")
        self.image_size = h
        # torch-gqn folders are named like `shepard_metzler_5_parts-torch/train`: take a known name if one leads.
        parent = os.path.basename(os.path.dirname(os.path.abspath(self.root)))
        known = [n for n in DATASETS if parent.startswith(n)]
        self.dataset = max(known, key=len) if known else None

    def __getstate__(self):
        # DataLoader workers started with spawn re-open (mmap) shards themselves instead of receiving the bytes.
        state = dict(self.__dict__)
        if "_shards" in state:
            state["_shards"] = {}
        return state

    def __len__(self):
        return self._starts[-1]

    def __getitem__(self, i):
        return self.load(i, range(self.views))

    def __repr__(self):
        return (f"GQNDataset({self.root!r}: {len(self)} scenes, {self.views} views, {self.image_size}px, "
                f"{self.dataset}, {self.format})")

    def load(self, i, views):
        """Scene i, only the given views -> (frames uint8 [V, 3, H, W], cameras float32 [V, 7])."""
        views = [int(j) for j in views]
        out = np.empty((len(views), self.image_size, self.image_size, 3), dtype=np.uint8)
        cameras = self._load_into(i, views, list(out))
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(cameras)

    def encoded(self, i):
        """Scene i as stored -> (list of S JPEG bytes, cameras float32 [S, 7]), nothing decoded."""
        k, local = self._locate(i)
        if self.format == "legacy":
            frames, cameras5 = self._legacy(k)
            return frames, pose7(cameras5)
        jpeg, o, cameras = self._scene(k, local)
        return [bytes(jpeg[o[j]:o[j + 1]]) for j in range(self.views)], cameras

    def _locate(self, i):
        """Scene i -> (shard or file index, scene index within it)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"scene {i} out of range for {n} scenes in {self.root}")
        i = int(i) % n
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def _shard(self, k):
        """Shard k's mmap'd arrays, mapped again when the file has changed on disk since they were mapped: a file
        truncated under a mapping raises SIGBUS where the mapping reaches past its new end, which no handler can turn
        into an error, so each read first compares the file's identity (a stat, about a microsecond)."""
        path = self._paths[k]
        identity = _identity(path)
        shard = self._shards.get(k)
        if shard is None or self._mapped.get(k) != identity:
            self._shards.pop(k, None)
            shard = _read_shard(path)[3]
            if len(shard[2]) != self._starts[k + 1] - self._starts[k]:
                raise DatasetError(f"{path}: changed since {self.root} was opened; open it again")
            self._shards[k], self._mapped[k] = shard, identity
        return shard

    def _scene(self, k, local):
        """Scene `local` of shard k -> (the shard's JPEG bytes, the scene's S+1 offsets into them, cameras [S, 7]).

        Checked per scene, which costs microseconds, rather than all offsets and cameras when a folder is opened."""
        jpeg, offsets, cameras = self._shard(k)
        o = offsets[local * self.views:(local + 1) * self.views + 1]
        if o[0] < 0 or o[-1] > len(jpeg) or (o[1:] < o[:-1]).any() or not np.isfinite(cameras[local]).all():
            raise DatasetError(f"{self._paths[k]}: scene {local} is damaged (JPEG offsets out of order or out of "
                               f"range, or a camera not finite)")
        return jpeg, o, cameras[local]

    def _legacy(self, k):
        frames, cameras5 = load_legacy_scene(self._paths[k])
        if len(frames) != self.views:
            raise DatasetError(f"{self._paths[k]}: {len(frames)} views, unlike {self._paths[0]} ({self.views})")
        return frames, cameras5

    def _load_into(self, i, views, outs):
        """Decode views of scene i into outs (list of [H, W, 3] uint8 arrays) -> cameras float32 [V, 7]."""
        k, local = self._locate(i)
        for j in views:
            if not 0 <= j < self.views:
                raise IndexError(f"view {j} out of range for {self.views} views")
        if self.format == "legacy":
            frames, cameras5 = self._legacy(k)
            for j, out in zip(views, outs):
                _decode_into(frames[j], out, self._paths[k])
            return pose7(cameras5[views])
        jpeg, o, cameras = self._scene(k, local)
        for j, out in zip(views, outs):
            _decode_into(jpeg[o[j]:o[j + 1]], out, self._paths[k])
        return cameras[views]


def open_split(folder, flag, layout=None, skip_unreadable=False):
    """GQNDataset(folder, layout, skip_unreadable) for training or evaluation; a folder that cannot serve raises
    DatasetError naming `flag`."""
    try:
        ds = GQNDataset(folder, layout, skip_unreadable)
    except DatasetError as e:
        raise DatasetError(f"{flag} {e}") from None
    if len(ds) == 0:
        raise DatasetError(f"{flag} {folder}: holds no scenes")
    if ds.views < 2:
        raise DatasetError(f"{flag} {folder}: scenes have {ds.views} view(s); GQN needs context and a query")
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Sampling: pure functions of (seed, step, scene), so resumed runs and DDP ranks draw what one process draws

_BATCH, _VIEWS, _EPS, _FIXED, _DEPTHS, _REFILL = 0, 1, 2, 3, 4, 5  # separate random streams, one per purpose
UNREADABLE = (DatasetError, OSError)  # what reading a scene raises when its bytes are damaged or gone
REFILLS = 16  # other scenes a batch tries in the place of one it cannot read, before the step cannot be served
# The random inputs of a training forward pass that the data draws (model.GQN.training_noise names them): stream.
NOISE_STREAMS = {"eps": _EPS, "depth_noise": _DEPTHS}


def _rng(seed, *key):
    key = tuple(int(k) for k in key)  # numpy/tensor ints from callers; the stream depends only on the values
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed) % 2**64, spawn_key=key)))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed, epoch, num_scenes):
    return _rng(seed, _BATCH, epoch).permutation(num_scenes)


def batch_scenes(seed, step, num_scenes, batch_size):
    """Scene ids of the global batch at `step` -> LongTensor [batch_size].

    Global slot g = step * batch_size + b walks through a fresh permutation of all scenes each epoch
    (epoch = g // num_scenes), so every scene is seen once per epoch whatever the batch size or world size.
    """
    g = int(step) * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, pos = np.divmod(g, num_scenes)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = _epoch_permutation(seed, int(e), num_scenes)[pos[sel]]
    return torch.from_numpy(out)


def draw_views(seed, step, scene, num_views, max_context, min_context=1):
    """Context and query views of one scene at one step -> (context LongTensor [M], query int).

    M is uniform in min_context..max_context (both capped at num_views - 1) and the query is never a context view.
    """
    k = min(max_context, num_views - 1)
    if k < 1:
        raise ValueError(f"need at least 2 views per scene, got {num_views}")
    rng = _rng(seed, _VIEWS, step, scene)
    m = int(rng.integers(min(max(min_context, 1), k), k + 1))
    perm = rng.permutation(num_views)[:m + 1]
    return torch.from_numpy(perm[:m]), int(perm[m])


def fixed_views(seed, scene, num_views, context):
    """Deterministic evaluation views of a scene -> (context LongTensor [K], query int), K = min(context, S-1)."""
    k = min(context, num_views - 1)
    perm = _rng(seed, _FIXED, scene).permutation(num_views)[:k + 1]
    return torch.from_numpy(perm[:k]), int(perm[k])


class Unreadable(namedtuple("Unreadable", ["scene", "why"])):
    """What FixedViews and WholeScenes give for a scene that cannot be read (collate_readable leaves it out)."""


def read_or_skip(load, scene):
    """load() -> what it returns, or Unreadable(scene, why) when the scene cannot be read (UNREADABLE)."""
    try:
        return load()
    except UNREADABLE as e:
        return Unreadable(int(scene), one_line(e))


def collate_readable(items):
    """DataLoader collate_fn for FixedViews: -> (the readable items collated, or None; [Unreadable])."""
    good = [t for t in items if not isinstance(t, Unreadable)]
    return (torch.utils.data.default_collate(good) if good else None), [t for t in items if isinstance(t, Unreadable)]


class WholeScenes(torch.utils.data.Dataset):
    """Item k -> scene ids[k], every view: (frames uint8 [S, 3, H, W], cameras [S, 7]), or Unreadable."""

    def __init__(self, ds, ids):
        self.ds, self.ids = ds, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, k):
        return read_or_skip(lambda: self.ds[self.ids[k]], self.ids[k])


class FixedViews(torch.utils.data.Dataset):
    """Evaluation views: item k -> scene i = scenes[k] with its fixed_views, as
    (x uint8 [K, 3, H, W], v [K, 7], x_q uint8 [3, H, W], v_q [7], i), or Unreadable(i, why)."""

    def __init__(self, ds, context, seed, scenes=None):
        self.ds, self.context, self.seed = ds, context, seed
        self.scenes = range(len(ds)) if scenes is None else scenes

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, k):
        i = int(self.scenes[k])
        ctx, q = fixed_views(self.seed, i, self.ds.views, self.context)
        loaded = read_or_skip(lambda: self.ds.load(i, [int(j) for j in ctx] + [int(q)]), i)
        if isinstance(loaded, Unreadable):
            return loaded
        frames, cameras = loaded
        return frames[:-1], cameras[:-1], frames[-1], cameras[-1], i


def scene_noise(seed, step, scene, noise_shape, name="eps", kind="normal"):
    """float32 noise [*noise_shape] for one scene at one step, from the stream of `name` (NOISE_STREAMS: the
    posterior's eps, the volume's depth jitter): standard normal, or with kind "uniform" uniform in [0, 1)."""
    rng = _rng(seed, NOISE_STREAMS[name], step, scene)
    if kind == "uniform":
        return rng.random(tuple(noise_shape), dtype=np.float32)
    return rng.standard_normal(tuple(noise_shape), dtype=np.float32)


class TrainBatches(torch.utils.data.Dataset):
    """Map-style dataset of training batches: item `step` is this rank's slice of the global batch of that step.

    Each scene gets M context views, M uniform in min_context..max_context; they are zero-padded to
    K = max_context (capped at S - 1) for every batch, so shapes never change; "mask" marks the real ones. `noise`
    ({name: (kind, shape)}, model.GQN.training_noise) adds each scene's random inputs of the forward pass under
    those names (scene_noise), so that nothing in a step depends on the rank, the world size, the batch's split
    over threads or where a run was resumed.

    A scene that cannot be read (a bad JPEG, a damaged, truncated, replaced or missing file: DatasetError or OSError)
    gives its place to another: refill() draws the candidates from (seed, step, scene), and the place keeps its
    views and noise, so a batch with damaged data is still a pure function of (seed, step, the data). The batch
    says what it skipped ("bad": [(scene, why)]), and "unserved" (None, or why) when REFILLS candidates in a row
    could not be read either. Use as
        DataLoader(TrainBatches(...), batch_size=None, sampler=range(start_step, total_steps), num_workers=w)
    """

    def __init__(self, dataset, batch_size, max_context, seed, noise=None, rank=0, world_size=1, min_context=1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.max_context = min(max_context, dataset.views - 1)
        self.min_context = min_context
        self.noise = dict(noise or {})
        unknown = set(self.noise) - set(NOISE_STREAMS)
        if unknown:
            raise ValueError(f"noise {sorted(unknown)}: no random stream (gqn_dataset.NOISE_STREAMS) for it")
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size

    def refill(self, step, scene):
        """The scenes that fill scene's place in step's batch, in the order they are tried: scene itself, then
        REFILLS drawn from (seed, step, scene) alone, so any rank, worker or resumed run tries the same ones."""
        yield scene
        yield from _rng(self.seed, _REFILL, step, scene).integers(0, len(self.dataset), REFILLS).tolist()

    @property
    def steps_per_epoch(self):
        return -(-len(self.dataset) // self.batch_size)

    def __getitem__(self, step):
        ds, b, k = self.dataset, self.local_batch, self.max_context
        scenes = batch_scenes(self.seed, step, len(ds), self.batch_size)[self.rank * b:(self.rank + 1) * b]
        h = w = ds.image_size
        x = np.zeros((b, k, h, w, 3), dtype=np.uint8)  # decoded straight into the padded batch
        v = np.zeros((b, k, 7), dtype=np.float32)
        mask = np.zeros((b, k), dtype=np.bool_)
        x_q = np.empty((b, h, w, 3), dtype=np.uint8)
        v_q = np.empty((b, 7), dtype=np.float32)
        served, bad, unserved = scenes.clone(), [], None
        for n, scene in enumerate(scenes.tolist()):
            context, query = draw_views(self.seed, step, scene, ds.views, k, self.min_context)
            m = len(context)
            for candidate in self.refill(step, scene):
                try:
                    cameras = ds._load_into(candidate, context.tolist() + [query], list(x[n, :m]) + [x_q[n]])
                except UNREADABLE as e:
                    bad.append((candidate, one_line(e)))
                    continue
                v[n, :m], v_q[n] = cameras[:m], cameras[m]
                mask[n, :m], served[n] = True, candidate
                break
            else:
                unserved = unserved or (f"neither scene {scene} nor any of the {REFILLS} scenes drawn to replace it "
                                        f"can be read (the last: {bad[-1][1]})")
        batch = {"x": torch.from_numpy(x).permute(0, 1, 4, 2, 3).contiguous(),  # (b, K, 3, H, W)
                 "v": torch.from_numpy(v), "mask": torch.from_numpy(mask),
                 "x_q": torch.from_numpy(x_q).permute(0, 3, 1, 2).contiguous(),  # (b, 3, H, W)
                 "v_q": torch.from_numpy(v_q), "scene": served, "bad": bad, "unserved": unserved}
        for name, (kind, shape) in self.noise.items():
            batch[name] = torch.from_numpy(np.stack(
                [scene_noise(self.seed, step, s, shape, name, kind) for s in scenes.tolist()]))
        return batch


# ----------------------------------------------------------------------------------------------------------------
# The model's view of the data

def resize(x, size):
    """Images (..., C, H, W) -> float (..., C, size, size), area interpolation when the sizes differ.

    Area interpolation averages whole pixels, as a camera of lower resolution would see the scene; training,
    evaluation and rendering all resize this way, so a model sees at test time what it saw in training.
    """
    x = x.float()
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    lead = x.shape[:-3]
    x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="area")
    return x.reshape(*lead, *x.shape[-3:])


def to_model(images, size, device):
    """uint8 images (..., 3, H, W) -> float in [0, 1] on device at the model's size (resize)."""
    return resize(images.to(device, non_blocking=True).float().div_(255), size)
