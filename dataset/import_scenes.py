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
Reading the layouts: dataset/scene_folders.py.

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
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import simplejpeg

if not __package__:  # `python dataset/import_scenes.py`: the repository's modules, one folder up
    import _repo  # noqa: F401
from cameras import direction, from_matrix, look_point, pose7  # noqa: E402
from cli import ArgumentParser, UserError, main as cli_main, positive_float, positive_int  # noqa: E402
from dataset.scene_folders import (BACKGROUNDS, CSV_COLUMNS, EXTENSIONS, find_scenes, load_scene,  # noqa: E402,F401
                                   scan_scene, split_off, square_fov, _load_task, _one_thread)
from dataset.builtin import shard_names  # noqa: E402
from gqn_dataset import DatasetError, camera_model, current_umask, encode_jpeg, write_shard  # noqa: E402
from progress import progress_bar  # noqa: E402

SCENES_PER_SHARD = 250
ROLL_TOLERANCE = 1e-3      # radians (0.06 degrees): rounding in a matrix, not a rolled camera
FOV_TOLERANCE = 0.01       # degrees: views of one data set share one camera model


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
    raw = raw_cameras(folder, cameras, up)
    n, s = raw.shape[:2]
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


def raw_cameras(folder, cameras, up):
    """write_split's cameras -> DeepMind's raw cameras (N, S, 5), float64, checked; matrices lose their roll, and a
    warning counts the views that had one."""
    raw = np.asarray(cameras, dtype=np.float64)
    if raw.ndim == 4 and raw.shape[-2:] in ((4, 4), (3, 4)):
        raw, roll = from_matrix(raw, up)
        rolled = np.abs(roll) > ROLL_TOLERANCE
        if rolled.any():
            warnings.warn(f"{folder}: {rolled.sum()} of {roll.size} views have a rolled camera (largest "
                          f"{math.degrees(np.abs(roll).max()):.2f} degrees); the 7-d pose has no roll, they are "
                          f"stored unrolled", stacklevel=3)
    if raw.ndim != 3 or raw.shape[-1] != 5:
        raise DatasetError(f"{folder}: cameras of shape {raw.shape}: expected (N, S, 5) or (N, S, 4, 4)")
    bad = np.argwhere(~np.isfinite(raw).all(-1))
    if len(bad):
        raise DatasetError(f"{folder}: scene {bad[0][0]} view {bad[0][1]}: camera is not finite")
    return raw


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
