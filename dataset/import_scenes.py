"""Import your own posed images as a GQN data set: two common layouts in, converted shards (gqn_dataset.py) out.

Eslami et al. 2018 learn from scenes of S views, each an image x^k and a viewpoint v^k; DeepMind's data sets
store five raw numbers a camera, (x, y, z, yaw, pitch), and the networks read the 7-d pose made of them
(cameras.py). This module brings other scenes into that form:

    python dataset/import_scenes.py SRC DST [--image_size N] [--background black|white] [--name NAME]
                                    [--test_fraction F] [--fov DEG] [--near D --far D] [--up z|y] [--workers N]

SRC holds SRC/train/<scene>/ and SRC/test/<scene>/ (either may be absent), or only scene folders SRC/<scene>/:
then the test split takes round(F * scenes) of them (--test_fraction F, default 0.1; at least one, spread evenly
through the scenes in name order). Each scene folder is one of two layouts, found by its file:
- `cameras.csv`: columns file,x,y,z,yaw,pitch (DeepMind's raw cameras: radians, world z up, the camera at
  (x, y, z) looks along (cos p cos y, -cos p sin y, sin p)), one row a view, the images (PNG, JPEG) beside it;
- `transforms.json` as NeRF's synthetic scenes, instant-ngp and nerfstudio write it: `camera_angle_x` (or `fl_x`
  with `w`) and `frames`, each with a `file_path` (relative to the folder, extension optional) and a 4x4
  camera-to-world `transform_matrix` (OpenGL: the camera looks along its -z axis, y up), world z up (--up y for
  y-up worlds). The 7-d pose has no roll: views whose camera is rolled are counted in one warning line with the
  largest roll, and stored unrolled (cameras.py's from_matrix).
DST gets DST/train/ and DST/test/ (shards of 250 scenes, GQNDataset's format), named --name (default: SRC's name).

Images: JPEGs are stored byte for byte; other images are encoded once (gqn_dataset.encode_jpeg: quality 95, 4:2:0),
and so are JPEGs that must change. Images with alpha are composited over --background (default black, GQN's
backgrounds; NeRF's synthetic scenes are usually shown over white). All views must have one square size, unless
--image_size N: then each view's centre square is area-resized to N x N (gqn_dataset.resize, as training resizes).

The camera model travels with the data (GQNDataset .fov/.near/.far; train.py --representation volume reads it):
- fov: transforms.json's (camera_angle_x, or 2 atan(w / 2 fl_x)), --fov for cameras.csv; both are horizontal, and
  become the fov of the centre square when images are cropped. Not recorded when unknown.
- near/far: --near/--far, or derived from the cameras (depth_range). For each scene, the point nearest all its
  viewing axes (cameras.py's look_point) and each view's depth to it along its axis; over all scenes,
  near = (1 - m) x the smallest depth and far = (1 + m) x the largest, with margin m = sqrt(2) tan(fov / 2) (what
  fills the frame at that depth lies within half its diagonal of the point) or m = 0.5 without a fov; near is at
  least 0.1 x the smallest depth. Scenes whose axes are nearly parallel or meet behind a camera are left out; when
  no scene is left, nothing is recorded. Cameras 10/3 from the object, 20 degrees: 2.50 to 4.17.

Bad input stops the import with one line naming the scene's file at fault (a missing or unreadable image, a scene
whose view count differs from the first scene's, images of other sizes without --image_size, a malformed CSV or
JSON, a non-finite camera), and DST is left as it was: everything is written beside DST and moved in at the end.
A scene with fewer than 2 views is reported and skipped.

From Python, write_split writes one split from arrays or JPEG bytes; the importer writes through it.
"""
import argparse
import concurrent.futures
import csv
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import simplejpeg
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cameras import direction, from_matrix, look_point, pose7  # noqa: E402
from cli import ArgumentParser, UserError, main as cli_main, one_line, positive_float, positive_int  # noqa: E402
from dataset.shepard_metzler import shard_names  # noqa: E402
from gqn_dataset import DatasetError, camera_model, current_umask, encode_jpeg, resize, write_shard  # noqa: E402
from progress import progress_bar  # noqa: E402

SCENES_PER_SHARD = 250
CSV_COLUMNS = ("file", "x", "y", "z", "yaw", "pitch")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")  # tried after a transforms.json file_path as given
ROLL_TOLERANCE = 1e-3      # radians (0.06 degrees): rounding in a matrix, not a rolled camera
FOV_TOLERANCE = 0.01       # degrees: views of one data set share one camera model
BACKGROUNDS = {"black": 0.0, "white": 255.0}


# ----------------------------------------------------------------------------------------------------------------
# Writing a split: the function for users whose scenes live in their own code

def write_split(folder, frames, cameras, name, fov=None, near=None, far=None, up="z",
                scenes_per_shard=SCENES_PER_SHARD):
    """Write one split of N scenes of S views into `folder` as converted shards; returns the shard paths.

    frames: uint8 (N, S, H, W, 3) array (encoded once, gqn_dataset.encode_jpeg) or N lists of S JPEG `bytes`
        (stored as they are), or any iterable yielding N such scenes (read one at a time); images square, one size.
    cameras: (N, S, 5) DeepMind's raw cameras (x, y, z, yaw, pitch; radians, world z up), or (N, S, 4, 4)
        camera-to-world matrices in the OpenGL convention (world `up` "z" or "y"; a rolled camera is stored
        unrolled, with a warning).
    name: the data set's name (train.py trains under it); fov: degrees, horizontal = vertical, or None.
    near, far: the depth range the scenes occupy; both None: derived from the cameras (depth_range; to give two
        splits one range, call depth_range on all their cameras and pass it), recorded when derivable.
    `folder` must not exist or be empty; the split is written beside it and renamed into place when complete.

        import numpy as np
        from dataset.import_scenes import write_split
        frames = np.zeros((10, 5, 64, 64, 3), np.uint8)          # your renders: 10 scenes of 5 views
        yaw = np.linspace(0, 2 * np.pi, 5, endpoint=False)
        cams = np.stack([-3 * np.cos(yaw), 3 * np.sin(yaw), 0 * yaw, yaw, 0 * yaw], -1)  # on a ring, looking in
        write_split("data/mine/train", frames, np.broadcast_to(cams, (10, 5, 5)), "mine", fov=30)
    """
    raw = np.asarray(cameras, dtype=np.float64)
    if raw.ndim == 4 and raw.shape[-2:] in ((4, 4), (3, 4)):
        raw, roll = from_matrix(raw, up)
        rolled = np.abs(roll) > ROLL_TOLERANCE
        if rolled.any():
            warnings.warn(f"{folder}: {rolled.sum()} of {roll.size} views have a rolled camera (largest "
                          f"{math.degrees(np.abs(roll).max()):.2f} degrees); the 7-d pose has no roll, they are "
                          f"stored unrolled", stacklevel=2)
    if raw.ndim != 3 or raw.shape[-1] != 5:
        raise DatasetError(f"{folder}: cameras of shape {raw.shape}: expected (N, S, 5) or (N, S, 4, 4)")
    n, s = raw.shape[:2]
    bad = np.argwhere(~np.isfinite(raw).all(-1))
    if len(bad):
        raise DatasetError(f"{folder}: scene {bad[0][0]} view {bad[0][1]}: camera is not finite")
    if s < 2:
        raise DatasetError(f"{folder}: scenes of {s} view(s); GQN needs context and a query")
    if (near is None) != (far is None):
        raise DatasetError(f"{folder}: give both near and far, or neither (derived from the cameras)")
    if near is None and (derived := depth_range(list(raw), fov)):
        near, far = derived[:2]
    camera = camera_model(fov, near, far)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise DatasetError(f"{folder} already exists and is not an empty folder")
    tmp = temp_folder_beside(folder)
    try:
        names = shard_names(max(1, math.ceil(n / scenes_per_shard)))
        pending, size, paths, i = [], None, [], -1
        for i, scene in enumerate(frames):
            if i >= n:
                raise DatasetError(f"{folder}: more scenes of frames than the {n} of the cameras")
            jpegs, size = _scene_jpegs(scene, s, size, f"{folder}: scene {i}")
            pending.append(jpegs)
            if len(pending) == scenes_per_shard or i == n - 1:
                paths.append(os.path.join(folder, names[len(paths)]))
                start = i + 1 - len(pending)
                write_shard(os.path.join(tmp, names[len(paths) - 1]), pending,
                            pose7(raw[start:i + 1].astype(np.float32)), name, size, camera, "import")
                pending = []
        if i != n - 1:
            raise DatasetError(f"{folder}: {i + 1} scenes of frames for the {n} of the cameras")
        if os.path.isdir(folder):
            os.rmdir(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def temp_folder_beside(path):
    """A new hidden folder in path's parent (same file system, so os.replace moves it in at once), made with the
    permissions a plain os.makedirs would give (mkdtemp's are 0700)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.partial-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def _scene_jpegs(scene, views, size, where):
    """One scene of frames (S JPEG bytes or S uint8 (H, W, 3) images) -> (list of JPEG bytes, square size)."""
    if len(scene) != views:
        raise DatasetError(f"{where}: {len(scene)} frames for {views} cameras")
    out = []
    for j, f in enumerate(scene):
        if isinstance(f, (bytes, bytearray, memoryview)):
            f = bytes(f)
            try:
                h, w, _, _ = simplejpeg.decode_jpeg_header(f)
            except ValueError as e:
                raise DatasetError(f"{where} view {j}: not a JPEG ({e})") from None
        else:
            f = np.asarray(f)
            if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
                raise DatasetError(f"{where} view {j}: expected JPEG bytes or a uint8 (H, W, 3) image, got "
                                   f"{f.dtype} {f.shape}")
            (h, w), f = f.shape[:2], encode_jpeg(np.ascontiguousarray(f))
        if h != w or (size is not None and h != size):
            raise DatasetError(f"{where} view {j}: {w}x{h} pixels, expected square images of one size"
                               + (f" ({size}x{size})" if size else ""))
        size = h
        out.append(f)
    return out, size


def depth_range(scenes, fov=None):
    """The depth range of scenes seen by raw cameras (list of (S, 5) arrays) -> (near, far, scenes used) or None.

    Per scene, the point nearest its viewing axes and each view's depth to it; near = (1 - m) x the smallest depth,
    far = (1 + m) x the largest, m = sqrt(2) tan(fov / 2) (0.5 without a fov), near >= 0.1 x the smallest depth.
    Scenes whose axes are nearly parallel or meet behind a camera are left out; None when none is left.
    """
    depths = []
    for raw in scenes:
        raw = np.asarray(raw, dtype=np.float64)
        d = direction(raw[:, 3], raw[:, 4])
        p = look_point(raw[:, :3], d)
        if p is not None:
            z = ((p - raw[:, :3]) * d).sum(-1)
            if z.min() > 0:
                depths.append((z.min(), z.max()))
    if not depths:
        return None
    lo, hi = min(z for z, _ in depths), max(z for _, z in depths)
    m = margin(fov)
    return max(1 - m, 0.1) * lo, (1 + m) * hi, len(depths)


def margin(fov):
    """depth_range's margin: sqrt(2) tan(fov / 2) for a fov in degrees, 0.5 when None."""
    return 0.5 if fov is None else math.sqrt(2) * math.tan(math.radians(fov) / 2)


# ----------------------------------------------------------------------------------------------------------------
# Reading scene folders

def find_scenes(src, test_fraction):
    """SRC -> ({split: [scene folders]} in name order, test fraction or None); SRC's own scene folders, when it
    has no train/ or test/, come as split "" (split_off divides them once the usable ones are known)."""
    if not os.path.isdir(src):
        raise UserError(f"SRC {src} is not a folder")

    def folders(root):
        return [os.path.join(root, n) for n in sorted(os.listdir(root))
                if not n.startswith(".") and os.path.isdir(os.path.join(root, n))]

    if any(os.path.exists(os.path.join(src, f)) for f in ("cameras.csv", "transforms.json")):
        raise UserError(f"SRC {src} is one scene: pass a folder of scene folders (SRC/<scene>/ or SRC/train/<scene>/)")
    split_dirs = {s: os.path.join(src, s) for s in ("train", "test") if os.path.isdir(os.path.join(src, s))}
    if split_dirs:
        if test_fraction is not None:
            raise UserError(f"--test_fraction: {src} is split already ({', '.join(split_dirs)}/)")
        splits = {s: folders(d) for s, d in split_dirs.items()}
        for s, found in splits.items():
            if not found:
                raise UserError(f"{split_dirs[s]} holds no scene folders")
        return splits, None
    if not folders(src):
        raise UserError(f"SRC {src} holds no scene folders (SRC/<scene>/ or SRC/train/<scene>/, SRC/test/<scene>/)")
    return {"": folders(src)}, 0.1 if test_fraction is None else test_fraction


def split_off(scenes, fraction):
    """Scenes in name order -> {"train": ..., "test": round(fraction * N) of them (at least 1, at most N - 1),
    spread evenly}; a split left empty is dropped."""
    n = len(scenes)
    n_test = min(max(1, round(fraction * n)), n - 1) if fraction > 0 else 0
    test = {math.floor((k + 0.5) * n / n_test) for k in range(n_test)}
    splits = {"train": [sc for i, sc in enumerate(scenes) if i not in test],
              "test": [sc for i, sc in enumerate(scenes) if i in test]}
    return {s: v for s, v in splits.items() if v}


def _finite(values, where):
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise DatasetError(f"{where}: camera is not finite")
    return values


def _read_csv(folder):
    """cameras.csv -> (files, raw cameras (S, 5), roll None, fovs [None])."""
    path = os.path.join(folder, "cameras.csv")
    files, raw = [], []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path}: no column {', '.join(missing)} (needs a header {','.join(CSV_COLUMNS)})")
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                if None in row or None in row.values():
                    raise DatasetError(f"{where}: expected {len(reader.fieldnames)} columns")
                try:
                    numbers = [float(row[c]) for c in CSV_COLUMNS[1:]]
                except ValueError:
                    bad = next(c for c in CSV_COLUMNS[1:] if not _is_number(row[c]))
                    raise DatasetError(f"{where}: {bad} {row[bad]!r} is not a number") from None
                if not row["file"].strip():
                    raise DatasetError(f"{where}: no file name")
                files.append(os.path.join(folder, row["file"].strip()))
                raw.append(_finite(numbers, f"{where} ({one_line(row['file'].strip())})"))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: not a CSV file ({one_line(e)})") from None
    return files, np.array(raw).reshape(-1, 5), None, [None] * len(files)


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _read_transforms(folder, up):
    """transforms.json -> (files, raw cameras (S, 5), roll (S,), horizontal fov in degrees or None a view)."""
    path = os.path.join(folder, "transforms.json")
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except RecursionError:
        raise DatasetError(f"{path}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise DatasetError(f"{path}: no list of \"frames\"")
    files, matrices, fovs, wheres = [], [], [], []
    for k, frame in enumerate(meta["frames"]):
        where = f"{path}: frame {k}"
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise DatasetError(f"{where}: no \"file_path\"")
        where += f" ({one_line(frame['file_path'])})"
        try:
            m = np.array(frame["transform_matrix"], dtype=np.float64)
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float64
            raise DatasetError(f"{where}: no 4x4 \"transform_matrix\" of numbers") from None
        if m.shape not in ((4, 4), (3, 4)):
            raise DatasetError(f"{where}: transform_matrix is {'x'.join(map(str, m.shape)) or 'a number'}, "
                               f"expected 4x4")
        matrices.append(_finite(m, where)[:3])
        files.append(_find_image(folder, frame["file_path"]))
        fovs.append(_fov_x(frame, meta, where))
        wheres.append(where)
    if not matrices:
        return [], np.zeros((0, 5)), np.zeros(0), []
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        raw, roll = from_matrix(np.stack(matrices), up)
    bad = np.flatnonzero(~(np.isfinite(raw).all(-1) & np.isfinite(roll)))
    if len(bad):  # a zero (or overflowing) axis has no direction
        raise DatasetError(f"{wheres[bad[0]]}: transform_matrix has no rotation (a zero or overflowing axis)")
    return files, raw, roll, fovs


def _find_image(folder, file_path):
    """A frame's image: file_path as given, else with the first extension that exists (NeRF omits it)."""
    path = os.path.normpath(os.path.join(folder, file_path))
    if os.path.exists(path):
        return path
    return next((path + e for e in EXTENSIONS if os.path.exists(path + e)), path)


def _fov_x(frame, meta, where):
    """A frame's horizontal field of view in degrees (its own intrinsics, else the file's), or None; with fl_x
    but no w, (fl_x, None) until the image's width is known (scan_scene)."""
    def get(key):
        value = frame.get(key, meta.get(key))
        if value is not None and not _positive_number(value):
            raise DatasetError(f"{where}: {key} {one_line(repr(value)[:40])} is not a positive number")
        return value
    angle, fl_x, w = get("camera_angle_x"), get("fl_x"), get("w")
    if angle is not None:
        if angle >= math.pi:
            raise DatasetError(f"{where}: camera_angle_x {angle} is not below pi (180 degrees)")
        return math.degrees(angle)
    if fl_x is not None:
        return (fl_x, w)  # degrees once the image width is known, if w is absent
    return None


def _positive_number(value):
    """A JSON number (not a bool, which Python counts as int) that is finite and positive as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return 0 < float(value) < math.inf
    except OverflowError:  # an integer beyond float64
        return False


def scan_scene(folder, up, fov):
    """Read one scene folder's cameras and its images' headers -> dict(folder, files, raw, roll, sizes, fovs).

    fovs: per view, the horizontal fov in degrees of the source image (or None when unknown).
    """
    layouts = [f for f in ("cameras.csv", "transforms.json") if os.path.isfile(os.path.join(folder, f))]
    if len(layouts) != 1:
        raise DatasetError(f"{folder}: " + ("holds both cameras.csv and transforms.json; keep one" if layouts else
                                            "no cameras.csv or transforms.json (a scene folder needs one)"))
    if layouts[0] == "cameras.csv":
        files, raw, roll, fovs = _read_csv(folder)
        fovs = [fov] * len(files)
    else:
        files, raw, roll, fovs = _read_transforms(folder, up)
    scene = dict(folder=folder, layout=layouts[0], files=files, raw=raw, roll=roll, sizes=[], fovs=fovs)
    if len(files) < 2:
        return scene  # skipped by the caller: its images do not matter
    for k, path in enumerate(files):
        if not os.path.isfile(path):
            raise DatasetError(f"{one_line(path)}: missing (named in {os.path.join(folder, layouts[0])})")
        try:
            with Image.open(path) as im:
                size = im.size
        except Exception as e:
            raise DatasetError(f"{one_line(path)}: unreadable image ({one_line(e)})") from None
        scene["sizes"].append(size)
        if isinstance(fovs[k], tuple):  # fl_x: the fov needs the image width when w is not given
            fl_x, w = fovs[k]
            fovs[k] = math.degrees(2 * math.atan2(float(w or size[0]), 2 * float(fl_x)))  # atan2: no overflow
            if not 0 < fovs[k] < 180:
                raise DatasetError(f"{os.path.join(folder, layouts[0])}: frame {k}: fl_x {fl_x} and width "
                                   f"{w or size[0]} give no field of view between 0 and 180 degrees")
    return scene


def square_fov(fov_x, size):
    """The horizontal fov (degrees) of a (w, h) image -> the fov of its centre square."""
    w, h = size
    return math.degrees(2 * math.atan(math.tan(math.radians(fov_x) / 2) * min(w, h) / w))


def load_scene(files, size, background):
    """A scene's images -> (list of JPEG bytes of size x size, views stored as they are, views composited).

    JPEGs of the right size are kept byte for byte (after a full decode, so a damaged one is caught here); other
    images are composited over `background` if they have alpha, centre-cropped, resized and encoded once.
    """
    out, kept, composited = [], 0, 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        if data[:3] == b"\xff\xd8\xff":
            try:
                h, w, _, _ = simplejpeg.decode_jpeg_header(data)
                if h == w == size:
                    simplejpeg.decode_jpeg(data, colorspace="RGB")
                    out.append(data)
                    kept += 1
                    continue
            except ValueError:
                pass  # not a JPEG libjpeg-turbo reads as RGB (e.g. CMYK): through Pillow below, or named
        try:
            with Image.open(path) as im:
                alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
                image = np.asarray(im.convert("RGBA" if alpha else "RGB"), dtype=np.float32)
        except Exception as e:
            raise DatasetError(f"{path}: unreadable image ({e})") from None
        if alpha:
            a = image[..., 3:] / 255
            image = image[..., :3] * a + BACKGROUNDS[background] * (1 - a)
            composited += 1
        h, w = image.shape[:2]
        side = min(h, w)
        image = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        x = resize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), size)  # (3, size, size)
        image = x.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        out.append(encode_jpeg(np.ascontiguousarray(image)))
    return out, kept, composited


def _load_task(task):
    return load_scene(*task)


def _one_thread():
    torch.set_num_threads(1)  # each worker resizes one image at a time; the workers are the parallelism


# ----------------------------------------------------------------------------------------------------------------
# The command

def check_scenes(scenes, image_size):
    """Scanned scenes (skipped ones removed) -> (image size, fov of the stored squares or None, how it was found).

    One view count, one image size (square) unless image_size, one field of view: else DatasetError naming both.
    """
    first = scenes[0]
    for sc in scenes:
        if len(sc["files"]) != len(first["files"]):
            raise DatasetError(f"{sc['folder']}: {len(sc['files'])} views, unlike {first['folder']} "
                               f"({len(first['files'])}): every scene needs the same number of views")
    size = image_size
    if size is None:
        w0, h0 = first["sizes"][0]
        for sc in scenes:
            for path, (w, h) in zip(sc["files"], sc["sizes"]):
                if (w, h) != (w0, h0):
                    raise DatasetError(f"{path}: {w}x{h} pixels, unlike {first['files'][0]} ({w0}x{h0}); "
                                       f"pass --image_size N to resize every view to N x N")
                if w != h:
                    raise DatasetError(f"{path}: {w}x{h} pixels; the format stores square images: pass "
                                       f"--image_size N (the centre square, resized)")
        size = w0
    fovs = [(path, None if f is None else square_fov(f, wh))
            for sc in scenes for path, wh, f in zip(sc["files"], sc["sizes"], sc["fovs"])]
    unknown = next((path for path, f in fovs if f is None), None)
    if unknown is not None:
        return size, None, f"not recorded: unknown for {unknown} (--fov for cameras.csv, camera_angle_x or fl_x " \
                           f"in transforms.json)"
    path0, fov0 = fovs[0]
    for path, f in fovs:
        if abs(f - fov0) > FOV_TOLERANCE:
            raise DatasetError(f"{path}: field of view {f:.3f} degrees, unlike {path0} ({fov0:.3f}); "
                               f"one data set needs one camera model")
    layouts = sorted({sc["layout"] for sc in scenes})
    how = " and ".join("--fov" if lay == "cameras.csv" else "transforms.json" for lay in layouts)
    return size, fov0, how


def roll_warning(scenes):
    """One line about the views whose camera is rolled, or None."""
    rolls = [(abs(r), path) for sc in scenes if sc["roll"] is not None for r, path in zip(sc["roll"], sc["files"])]
    rolled = [r for r in rolls if r[0] > ROLL_TOLERANCE]
    if not rolled:
        return None
    worst, path = max(rolled)
    return (f"{len(rolled)} of {sum(len(sc['files']) for sc in scenes)} views have a rolled camera (largest "
            f"{math.degrees(worst):.2f} degrees, {path}); the 7-d pose has no roll: they are stored unrolled, "
            f"images as they are")


def _fraction(s):
    try:
        x = float(s)
    except ValueError:
        x = float("nan")
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}")
    return x


def _map(pool, fn, items):
    return pool.map(fn, items) if pool is not None else map(fn, items)


def import_scenes(src, dst, image_size=None, background="black", name=None, test_fraction=None, fov=None,
                  near=None, far=None, up="z", workers=1):
    """The command: SRC's scenes -> DST/train, DST/test; prints what it did. Raises UserError on bad input."""
    if (near is None) != (far is None):
        raise UserError("--near and --far: give both, or neither (then they are derived from the cameras)")
    if near is not None and near >= far:
        raise UserError(f"--near {near} and --far {far}: need near < far")
    dst = os.path.normpath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"DST {dst} exists and is not a folder")
    found, fraction = find_scenes(src, test_fraction)
    for split in ("train", "test") if "" in found else found:
        if os.path.exists(os.path.join(dst, split)):
            raise UserError(f"{os.path.join(dst, split)} already exists: remove it, or import into another DST")
    name = name or os.path.basename(os.path.abspath(src))
    pool = None
    if workers > 1:
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_one_thread)
    try:
        splits = scan(pool, found, fraction, up, fov)
        scenes = [sc for v in splits.values() for sc in v]
        size, fov, fov_how = check_scenes(scenes, image_size)
        warning = roll_warning(scenes)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if near is not None:
            depth_how = "--near/--far"
        elif (derived := depth_range([sc["raw"] for sc in scenes], fov)) is not None:
            near, far, used = derived
            depth_how = (f"derived: per scene the point nearest all viewing axes and each view's depth to it; "
                         f"near = (1 - m) x the smallest, far = (1 + m) x the largest, m = {margin(fov):.3f} "
                         f"({'sqrt(2) tan(fov/2)' if fov else 'no fov'}), from {used} of {len(scenes)} scenes")
        else:
            depth_how = "not recorded: the viewing axes do not meet in front of the cameras; pass --near/--far"
        counts = write(pool, dst, splits, name, size, background, fov, near, far)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    views = sum(len(sc["files"]) for sc in scenes)
    print(f"imported {' + '.join(f'{len(v)} {s}' for s, v in splits.items())} scenes of "
          f"{len(scenes[0]['files'])} views, {size}x{size} px, as {name!r} -> "
          + ", ".join(os.path.join(dst, s) for s in splits))
    print(f"images: {counts['kept']} of {views} JPEG sources stored byte for byte, {views - counts['kept']} encoded "
          f"once (quality 95, 4:2:0)" + (f", {counts['composited']} with alpha over {background}"
                                          if counts["composited"] else ""))
    print("fov: " + (f"{fov:.4g} degrees ({fov_how})" if fov is not None else fov_how))
    print("near/far: " + (f"{near:.4g}, {far:.4g} ({depth_how})" if near is not None else depth_how))
    return [os.path.join(dst, s) for s in splits]


def scan(pool, found, fraction, up, fov):
    """find_scenes' folders -> {split: [scanned scenes]}: scenes of fewer than 2 views reported and left out."""
    tasks = [(split, folder) for split, folders in found.items() for folder in folders]
    scanned = list(progress_bar(_map(pool, _scan_task, [(f, up, fov) for _, f in tasks]), total=len(tasks),
                        unit="scene", desc="reading cameras"))
    skipped = [f"{sc['folder']} ({len(sc['files'])})" for sc in scanned if len(sc["files"]) < 2]
    if skipped:
        print(f"warning: skipped {len(skipped)} scene(s) with fewer than 2 views: " + ", ".join(skipped[:5])
              + (", ..." if len(skipped) > 5 else ""), file=sys.stderr)
    splits = {s: [sc for (split, _), sc in zip(tasks, scanned) if split == s and len(sc["files"]) >= 2]
              for s in found}
    for s, scenes in splits.items():
        if not scenes:
            raise UserError(f"{s or 'no'} scene has 2 views or more: nothing to import")
    return split_off(splits[""], fraction) if "" in splits else splits


def write(pool, dst, splits, name, size, background, fov, near, far):
    """Load, encode and write every split beside dst, then move them in -> counts of views kept and composited."""
    tmp = temp_folder_beside(dst)
    counts = dict(kept=0, composited=0)
    try:
        for split, scenes in splits.items():
            frames = _frames(pool, scenes, size, background, counts, f"importing {split}")
            write_split(os.path.join(tmp, split), frames, np.stack([sc["raw"] for sc in scenes]), name,
                        fov, near, far)
        if not os.path.exists(dst):
            os.replace(tmp, dst)
        else:
            for split in splits:
                os.replace(os.path.join(tmp, split), os.path.join(dst, split))
            os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _scan_task(args):
    return scan_scene(*args)


def _frames(pool, scenes, size, background, counts, desc):
    """The scenes' JPEG lists, loaded in order (in the pool when there is one), counting what was kept as is."""
    results = _map(pool, _load_task, [(sc["files"], size, background) for sc in scenes])
    for jpegs, kept, composited in progress_bar(results, total=len(scenes), unit="scene", desc=desc):
        counts["kept"] += kept
        counts["composited"] += composited
        yield jpegs


def run(argv):
    p = ArgumentParser(description="Import posed images (cameras.csv or transforms.json scene folders) into "
                                   "GQN's converted format: DST/train, DST/test.")
    p.add_argument("src", metavar="SRC", help="SRC/train/<scene>/, SRC/test/<scene>/, or SRC/<scene>/")
    p.add_argument("dst", metavar="DST", help="output folder (gets train/ and test/)")
    p.add_argument("--image_size", type=positive_int, help="area-resize every view's centre square to N x N "
                                                           "(default: keep; all views must then agree)")
    p.add_argument("--background", choices=sorted(BACKGROUNDS), default="black",
                   help="images with alpha are composited over it (default black)")
    p.add_argument("--name", help="the data set's name (default: SRC's folder name)")
    p.add_argument("--test_fraction", type=_fraction,
                   help="share of SRC/<scene>/ folders for the test split when SRC has no train/test (0.1)")
    p.add_argument("--fov", type=positive_float, help="horizontal field of view in degrees of cameras.csv scenes")
    p.add_argument("--near", type=positive_float, help="nearest depth of the scenes (default: derived)")
    p.add_argument("--far", type=positive_float, help="farthest depth of the scenes (default: derived)")
    p.add_argument("--up", choices=("z", "y"), default="z", help="transforms.json's world up axis (default z)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes reading images (default 1)")
    args = p.parse_args(argv)
    if args.fov is not None and args.fov >= 180:
        raise UserError(f"--fov {args.fov}: must be below 180 degrees")
    try:
        import_scenes(args.src, args.dst, args.image_size, args.background, args.name, args.test_fraction,
                      args.fov, args.near, args.far, args.up, args.workers)
    except OSError as e:
        raise UserError(f"{e.filename or args.dst}: {e.strerror or e}") from None


def main(argv=None):
    cli_main(run, argv, interrupted="interrupted; DST is as it was")


if __name__ == "__main__":
    main()
