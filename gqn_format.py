"""The converted GQN format: what a shard holds, writing one, and reading one's header checked.

Follows the data of Eslami et al. 2018 (supplementary section "Datasets"): a scene is S views, each an image x^k and
a viewpoint v^k, the viewpoints 7-d, in the order of DeepMind's gqn-datasets data_reader.py: (x, y, z, sin yaw,
cos yaw, sin pitch, cos pitch) (cameras.py). DATASETS and MAX_CONTEXT describe DeepMind's seven data sets.

Converted split folder: one `torch.save` file per source shard (`001-of-900.pt`), loadable with
`torch.load(p, weights_only=True, mmap=True)`: {"format": "gqn-jpeg-v1", "dataset", "image_size", "views",
"jpeg": uint8 [all JPEG bytes], "offsets": int64 [N*S+1], "cameras": float32 [N, S, 7]}, and, when the camera
model is known, the optional float keys "fov" (field of view in degrees, horizontal = vertical: images are
square), "near" and "far" (the depth range the scenes occupy, along the camera's axis, in scene units). Shards
written before these keys existed, DeepMind's and torch-gqn's data have none (GQNDataset gives None). The optional
key "source" says which tool wrote the shard (SOURCES), so that a folder holding two data sets that share a name
(DeepMind's Shepard-Metzler scenes and the built-in renderer's) is refused instead of read as one. The JPEGs are
DeepMind's own bytes (lossless, about the TFRecords' size); a reader reads only the scenes it is asked for, with
os.pread where the zip stores each tensor (Stored), never through a memory map: a shard cut short under a map would
end the run with SIGBUS.
"""
import io
import math
import os
import re
import struct
import zipfile

import numpy as np
import simplejpeg
import torch

from cli import UserError, one_line
from files import atomic_write

FORMAT = "gqn-jpeg-v1"
CAMERA_KEYS = ("fov", "near", "far")  # optional shard keys: the camera model, when known
# The optional shard key "source": which tool wrote it, and how an error names that.
SOURCES = {"gqn-datasets": "DeepMind's gqn-datasets (dataset/convert2torch.py)",
           "renderer": "the built-in renderers (dataset/shepard_metzler.py, dataset/rooms.py)",
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


def _blob(path, frames, n, s):
    """N lists of S JPEG bytes -> (all the bytes, uint8 tensor; offsets, int64 tensor [N * S + 1])."""
    views = [bytes(f) for scene in frames for f in scene]
    if len(frames) != n or len(views) != n * s or any(len(scene) != s for scene in frames):
        raise ValueError(f"{path}: every one of the {n} scenes must have {s} views")
    lengths = np.fromiter((len(f) for f in views), dtype=np.int64, count=len(views))
    offsets = np.zeros(n * s + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = bytearray(b"".join(views))
    jpeg = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    return jpeg, torch.from_numpy(offsets)


def write_shard(path, frames, cameras, dataset, image_size, camera=None, source=None, empty=None, masks=None):
    """Write one converted shard atomically (files.atomic_write).

    frames: N lists of S JPEG `bytes` (stored as they are, never re-encoded); cameras: float32 [N, S, 7];
    camera: None or a dict with any of "fov", "near", "far" (camera_model), stored as top-level floats; source: a key
    of SOURCES, the tool that wrote it (None: not recorded). What a scene's objects change, for scenes whose
    renderer knows it (both or neither): empty, the same views with the objects removed (N lists of S JPEG bytes),
    and masks, bool [N, S, image_size, image_size], True where the objects or their shadows are (OBJECT_KEYS).
    """
    n = len(frames)
    cameras = np.ascontiguousarray(cameras, dtype=np.float32)
    s = len(frames[0]) if n else (cameras.shape[1] if cameras.ndim == 3 else 0)
    if cameras.shape != (n, s, 7):
        raise ValueError(f"{path}: cameras shape {cameras.shape} does not match {n} scenes x {s} views x 7")
    if not 1 <= int(image_size) <= MAX_IMAGE_SIZE:  # what GQNDataset would refuse to read
        raise DatasetError(f"{path}: image_size {image_size}: the format holds 1 to {MAX_IMAGE_SIZE} pixels a side")
    jpeg, offsets = _blob(path, frames, n, s)
    obj = {"format": FORMAT, "dataset": str(dataset), "image_size": int(image_size), "views": int(s),
           "jpeg": jpeg, "offsets": offsets, "cameras": torch.from_numpy(cameras)}
    if (empty is None) != (masks is None):
        raise ValueError(f"{path}: give both the empty views and the masks, or neither")
    if empty is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != (n, s, image_size, image_size):
            raise ValueError(f"{path}: masks of shape {masks.shape}, not {(n, s, image_size, image_size)}")
        obj["empty_jpeg"], obj["empty_offsets"] = _blob(path, empty, n, s)
        obj["masks"] = torch.from_numpy(np.packbits(masks.reshape(n, s, -1), axis=-1))
    unknown = set(camera or {}) - set(CAMERA_KEYS)
    if unknown:
        raise ValueError(f"{path}: camera keys {sorted(unknown)}: only {', '.join(CAMERA_KEYS)}")
    obj.update(camera_model(**(camera or {})))
    if source is not None:
        if source not in SOURCES:
            raise ValueError(f"{path}: source {source!r}: one of {', '.join(SOURCES)}")
        obj["source"] = source
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())  # a killed run leaves no half-written shard under the real name


def encode_jpeg(image):
    """uint8 [H, W, 3] -> JPEG bytes at JPEG_QUALITY with 4:2:0 chroma subsampling, as in DeepMind's frames."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Reading a shard's header

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


def is_converted(path):
    try:
        obj = torch.load(path, weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


# The shard's arrays as write_shard stores them: key, dtype, rank; and those of what the objects change, optional.
_SHARD_TENSORS = (("jpeg", torch.uint8, 1), ("offsets", torch.int64, 1), ("cameras", torch.float32, 3))
OBJECT_KEYS = (("empty_jpeg", torch.uint8, 1), ("empty_offsets", torch.int64, 1), ("masks", torch.uint8, 3))



def _plain(t, name, dtype, dim):
    """A shard's tensor, if it is what write_shard stores: dense, contiguous, on the CPU, of that dtype and rank, the
    whole of its storage. Its size is then its bytes in the file (a stride-0 or sparse tensor could claim any size)."""
    if (type(t) is not torch.Tensor or t.dtype != dtype or t.dim() != dim or t.layout != torch.strided
            or t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.nbytes):
        raise ValueError(f"{name} is not a contiguous {dim}-d {dtype} tensor")
    return t


class Stored:
    """A tensor a shard holds, read from the file with os.pread when asked, never memory-mapped: a shard cut short
    while a run reads it (the stat before each read cannot close that window) is a short read, a DatasetError the
    run skips the scene for, where a page of a memory map past the file's new end ends the process (SIGBUS)."""

    def __init__(self, path, start, dtype, shape):
        self.path, self.start, self.dtype, self.shape = path, start, np.dtype(dtype), tuple(shape)

    def __len__(self):
        return self.shape[0]

    def read(self, lo, hi, fd=None):
        """Flat elements lo..hi-1 -> numpy array; fd: the file, open, to read several arrays with one open."""
        n = (hi - lo) * self.dtype.itemsize
        if lo < 0 or n < 0:
            raise DatasetError(f"{self.path}: a read out of range (elements {lo} to {hi})")
        own = fd is None
        fd = os.open(self.path, os.O_RDONLY) if own else fd
        try:
            data = os.pread(fd, n, self.start + lo * self.dtype.itemsize)
        finally:
            if own:
                os.close(fd)
        if len(data) != n:
            raise DatasetError(f"{self.path}: cut short (it ends inside the bytes a scene needs)")
        return np.frombuffer(data, self.dtype)

    def rows(self, i, j, fd=None):
        """Rows i..j-1 along the first axis -> numpy array of shape (j - i, *shape[1:])."""
        per = math.prod(self.shape[1:])
        return self.read(i * per, j * per, fd).reshape(j - i, *self.shape[1:])


_STORAGE = re.compile(r"/data/\d+$")


def stored(path, tensors):
    """{name: tensor} of a torch.save file loaded with mmap -> {name: Stored}: where each tensor's bytes lie in the
    file. The zip's storage entries and the tensors' storages are both in file order (the addresses of the map),
    and each tensor is the whole of its own storage (_plain), so they pair up one to one; torch writes the entries
    uncompressed, after a local header whose name and extra lengths say where the bytes start."""
    out = {k: Stored(path, 0, t.numpy().dtype, t.shape) for k, t in tensors.items() if t.nbytes == 0}  # no bytes
    order = sorted((k for k in tensors if k not in out), key=lambda k: tensors[k].untyped_storage().data_ptr())
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        entries = sorted((i for i in z.infolist() if _STORAGE.search(i.filename) and i.file_size),
                         key=lambda i: i.header_offset)
        if len(entries) != len(order):
            raise ValueError(f"{len(entries)} stored arrays for {len(order)} tensors")
        for name, info in zip(order, entries):
            t = tensors[name]
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != t.nbytes:
                raise ValueError(f"{name}'s bytes are not stored as written")
            header = os.pread(f.fileno(), 30, info.header_offset)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise ValueError(f"{name}'s zip entry has no local header")
            n, m = struct.unpack("<HH", header[26:30])
            out[name] = Stored(path, info.header_offset + 30 + n + m, t.numpy().dtype, t.shape)
    return out


def read_shard(path):
    """Load and check one converted shard -> ((dataset, image_size, views), (fov, near, far), source, (jpeg,
    offsets, cameras, objects) as Stored arrays; objects: None, or (empty_jpeg, empty_offsets, masks)). The fields
    are checked against each other and their ends (the offsets' first and last, the cameras' shape), so that nothing
    is sized from a damaged or hostile value; each scene's own offsets and cameras are checked when it is read
    (GQNDataset._scene). DatasetError names the file."""
    try:
        obj = torch.load(path, weights_only=True, mmap=True)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"no format {FORMAT!r}")
        dataset, size, views, source = (obj.get(k) for k in ("dataset", "image_size", "views", "source"))
        if not isinstance(dataset, str) or not (source is None or isinstance(source, str)):
            raise ValueError("dataset or source is not a string")
        if type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE or type(views) is not int or views < 0:
            raise ValueError(f"image_size {size!r} or views {views!r} out of range")
        tensors = {k: _plain(obj.get(k), k, dtype, dim) for k, dtype, dim in _SHARD_TENSORS}
        present = [k for k, _, _ in OBJECT_KEYS if obj.get(k) is not None]
        if present and len(present) < len(OBJECT_KEYS):
            raise ValueError(f"{', '.join(present)} without the rest of {', '.join(k for k, _, _ in OBJECT_KEYS)}")
        tensors.update({k: _plain(obj.get(k), k, dtype, dim) for k, dtype, dim in OBJECT_KEYS if present})
        arrays = stored(path, tensors)
        jpeg, offsets, cameras = (arrays[k] for k, _, _ in _SHARD_TENSORS)
        ends = offsets.read(0, 1).tolist() + offsets.read(len(offsets) - 1, len(offsets)).tolist()
        if cameras.shape[1:] != (views, 7) or len(offsets) != len(cameras) * views + 1 or ends != [0, len(jpeg)]:
            raise ValueError("inconsistent header")
        if len(offsets) > 1:  # the first frame's size, so that a damaged image_size allocates nothing to decode
            h, w, _, _ = simplejpeg.decode_jpeg_header(jpeg.read(0, offsets.read(1, 2)[0]).tobytes())
            if (h, w) != (size, size):
                raise ValueError(f"its first frame is {w}x{h}, its image_size {size}")
        camera = camera_model(**{k: obj[k] for k in CAMERA_KEYS if obj.get(k) is not None})
        objects = _objects(arrays, len(cameras), views, size) if present else None
    except Exception as e:  # torch's zip reader adds paragraphs of advice after its first sentence
        why = one_line(e).removeprefix(f"{path}: ").split(". ")[0]
        raise DatasetError(f"{path}: not a converted GQN shard ({why})") from None
    return (dataset, size, views), tuple(camera.get(k) for k in CAMERA_KEYS), source, \
        (jpeg, offsets, cameras, objects)


def _objects(arrays, n, views, size):
    """A shard's record of what its objects change -> (empty_jpeg, empty_offsets, masks), checked as the frames are."""
    empty, offsets, masks = (arrays[k] for k, _, _ in OBJECT_KEYS)
    ends = offsets.read(0, 1).tolist() + offsets.read(len(offsets) - 1, len(offsets)).tolist()
    if len(offsets) != n * views + 1 or ends != [0, len(empty)] or masks.shape != (n, views, -(-size * size // 8)):
        raise ValueError("inconsistent record of the empty views")
    return empty, offsets, masks
