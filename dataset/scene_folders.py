"""Reading posed images from scene folders for dataset/import_scenes.py: the two layouts (`cameras.csv`,
`transforms.json`), each scene's files and cameras checked, and its images loaded at one square size.

A camera is read as DeepMind's raw five numbers (x, y, z, yaw, pitch) (cameras.py); a transforms.json camera-to-world
matrix loses its roll (counted, never silently). Every fault is one DatasetError naming the file at fault.
"""
import csv
import json
import math
import os

import numpy as np
import simplejpeg
import torch
from PIL import Image

from cameras import from_matrix
from cli import UserError, one_line
from gqn_dataset import DatasetError, encode_jpeg, resize

CSV_COLUMNS = ("file", "x", "y", "z", "yaw", "pitch")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")  # tried after a transforms.json file_path as given
BACKGROUNDS = {"black": 0.0, "white": 255.0}


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
