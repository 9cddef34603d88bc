"""GQN scenes as tensors: GQNDataset reads a split folder (converted shards or a torch-gqn folder).

A scene is S views, each an image x^k and a viewpoint v^k (Eslami et al. 2018, supplementary "Datasets"). The
format and its writer: gqn_format.py; torch-gqn's scene files: legacy_scenes.py; training batches and evaluation
views: sampling.py; the model's input (resize, to_model): model.py. Their public names are importable from here too.
"""
import bisect
import contextlib
import os

import numpy as np
import simplejpeg
import torch

from cameras import pose7
from cli import one_line
from files import current_umask  # noqa: F401
from gqn_format import (CAMERA_KEYS, DATASETS, FORMAT, JPEG_QUALITY, MAX_CONTEXT, MAX_IMAGE_SIZE,  # noqa: F401
                        SOURCES, DatasetError, camera_model, encode_jpeg, foreign_shards, is_converted,
                        read_shard, write_shard)
from legacy_scenes import LEGACY_NAME, load_legacy_scene  # noqa: F401
from model import resize, to_model  # noqa: F401
from sampling import (NOISE_STREAMS, REFILLS, UNREADABLE, FixedViews, TrainBatches, Unreadable,  # noqa: F401
                      WholeScenes, batch_scenes, collate_readable, draw_views, fixed_views, read_or_skip, scene_noise)

def _decode_into(jpeg, out, where):
    """Decode one JPEG into out ([H, W, 3] uint8, contiguous) with libjpeg's accurate IDCT, as Pillow does."""
    try:
        img = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=out)
    except ValueError as e:
        raise DatasetError(f"{where}: bad JPEG ({one_line(e)})") from None
    if img.shape != out.shape:
        raise DatasetError(f"{where}: JPEG is {img.shape[1]}x{img.shape[0]}, expected {out.shape[1]}x{out.shape[0]}")


@contextlib.contextmanager
def _opened(path):
    """The file open for os.pread, closed after; DatasetError naming it if it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({one_line(e.strerror or e)})") from None
    try:
        yield fd
    finally:
        os.close(fd)


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
        legacy = sorted((int(m.group(1)), n) for n in names if (m := LEGACY_NAME.match(n)))
        shards = [n for n in names if n.endswith(".pt") and not LEGACY_NAME.match(n)]
        # A digits-only name such as `0.pt` may still be a converted shard: look inside before calling it legacy.
        if legacy and not shards and is_converted(os.path.join(self.root, legacy[0][1])):
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
        self.has_objects = True  # every shard records what its objects change (dataset/rooms.py's do)
        self._paths = [os.path.join(self.root, n) for n in shards]
        self._shards, self._mapped = {}, {}
        counts = []
        for i, path in enumerate(self._paths):
            try:
                identity = _identity(path)
                head, camera, source, arrays = read_shard(path)
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
            self.has_objects = self.has_objects and arrays[3] is not None
            self._shards[i] = arrays  # where the tensors lie: this holds no file handle and reads no JPEG bytes
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
        self.has_objects = False
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
        # DataLoader workers started with spawn find the shards' tensors again themselves (cheap: headers only).
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

    def load_objects(self, i, views):
        """What the objects of scene i change in these views -> (the views with the objects removed, uint8 [V, 3, H,
        W]; masks bool [V, H, W], True where the objects or their shadows are). Only where ds.has_objects: the
        scenes of a renderer that records it (dataset/rooms.py); DatasetError otherwise."""
        if not self.has_objects:
            raise DatasetError(f"{self.root}: its scenes do not record what their objects change")
        k, local = self._locate(i)
        views = [int(j) for j in views]
        empty, offsets, masks = self._shard(k)[3]
        with _opened(self._paths[k]) as fd:
            blob, o = self._frames(k, empty, offsets, local, "empty views", fd)
            bits = masks.rows(local, local + 1, fd)[0][views]
        out = np.empty((len(views), self.image_size, self.image_size, 3), dtype=np.uint8)
        for j, im in zip(views, out):
            _decode_into(blob[o[j]:o[j + 1]], im, self._paths[k])
        bits = np.unpackbits(bits, axis=-1, count=self.image_size * self.image_size)
        return (torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(bits.reshape(len(views), self.image_size, self.image_size).astype(bool)))

    def load(self, i, views):
        """Scene i, only the given views -> (frames uint8 [V, 3, H, W], cameras float32 [V, 7])."""
        views = [int(j) for j in views]
        out = np.empty((len(views), self.image_size, self.image_size, 3), dtype=np.uint8)
        cameras = self.load_into(i, views, list(out))
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
        """Shard k's Stored arrays (where its tensors lie in the file), found again when the file has changed on disk
        since: each read first compares the file's identity (a stat, about a microsecond), so a shard rewritten in
        place is read where its new tensors lie."""
        path = self._paths[k]
        identity = _identity(path)
        shard = self._shards.get(k)
        if shard is None or self._mapped.get(k) != identity:
            self._shards.pop(k, None)
            shard = read_shard(path)[3]
            if len(shard[2]) != self._starts[k + 1] - self._starts[k]:
                raise DatasetError(f"{path}: changed since {self.root} was opened; open it again")
            self._shards[k], self._mapped[k] = shard, identity
        return shard

    def _scene(self, k, local):
        """Scene `local` of shard k -> (its JPEG bytes, the S+1 offsets of its views into them, cameras [S, 7]).

        Checked per scene, which costs microseconds, rather than all offsets and cameras when a folder is opened."""
        jpeg, offsets, cameras, _ = self._shard(k)
        with _opened(self._paths[k]) as fd:
            camera = cameras.rows(local, local + 1, fd)[0].copy()  # writable, as torch.from_numpy wants
            if not np.isfinite(camera).all():
                raise DatasetError(f"{self._paths[k]}: scene {local} is damaged (a camera not finite)")
            blob, o = self._frames(k, jpeg, offsets, local, "views", fd)
        return blob, o, camera

    def _frames(self, k, jpeg, offsets, local, what, fd):
        """One scene's JPEG frames, read in one go -> (their bytes, the S+1 offsets of its views into them)."""
        o = offsets.read(local * self.views, (local + 1) * self.views + 1, fd)
        if o[0] < 0 or o[-1] > len(jpeg) or (o[1:] < o[:-1]).any():
            raise DatasetError(f"{self._paths[k]}: scene {local}'s {what} are damaged (JPEG offsets out of order or "
                               f"out of range)")
        return jpeg.read(o[0], o[-1], fd), o - o[0]

    def _legacy(self, k):
        frames, cameras5 = load_legacy_scene(self._paths[k])
        if len(frames) != self.views:
            raise DatasetError(f"{self._paths[k]}: {len(frames)} views, unlike {self._paths[0]} ({self.views})")
        return frames, cameras5

    def load_into(self, i, views, outs):
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
