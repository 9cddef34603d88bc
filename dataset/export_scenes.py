"""Export Shepard-Metzler scenes to the layouts import_scenes.py reads, and compare an import with the originals.

The worked example of dataset/import_scenes.py: the paper's Shepard-Metzler scenes (Eslami et al. 2018,
supplementary "Datasets"), rendered by dataset/shepard_metzler.py or read from a converted data folder, written as
scene folders of images and cameras, imported back, and checked view by view against where they came from:

    python dataset/export_scenes.py OUT --layout csv|transforms [--data_dir DIR] [--scenes N] [--image_format png|jpeg]
    python dataset/import_scenes.py OUT DST [--fov 20]                      # cameras.csv records no fov
    python dataset/export_scenes.py --compare DST [--data_dir DIR] [--scenes N]

The originals: the first N scenes of each split of DIR (DIR/train, DIR/test), or without --data_dir the scenes
shepard_metzler.render_scene draws for --seed and --parts (the same ones each time). OUT/<split>/scene_NNNN/ gets
the views as PNG (decoded pixels; the import encodes them again) or as the stored JPEG bytes (kept byte for byte),
and cameras.csv (DeepMind's raw cameras) or transforms.json (camera_angle_x, camera-to-world OpenGL matrices,
world --up z or y). --compare prints, per split, the largest difference of the 7-d poses, the mean absolute pixel
difference (grey levels) and how many views are byte-identical.
"""
import csv
import json
import math
import os

import numpy as np
import simplejpeg
from PIL import Image

if not __package__:  # `python dataset/export_scenes.py`: the repository's modules, one folder up
    import _repo  # noqa: F401
import cameras  # noqa: E402
from cli import ArgumentParser, UserError, main as cli_main, nonneg_int, positive_int  # noqa: E402
from dataset import shepard_metzler as sm  # noqa: E402
from gqn_dataset import GQNDataset  # noqa: E402

SPLITS = ("train", "test")


def originals(data_dir=None, scenes=8, parts=5, seed=0):
    """{split: (fov in degrees or None, [(list of S JPEG bytes, poses float32 (S, 7)), ...])}: the first `scenes`
    scenes of each split of data_dir, or rendered by the built-in renderer."""
    if data_dir is None:
        fov = sm.camera_model(parts)["fov"]
        return {split: (fov, [_rendered(seed, split, i, parts) for i in range(scenes)]) for split in SPLITS}
    out = {}
    for split in SPLITS:
        folder = os.path.join(data_dir, split)
        if os.path.isdir(folder):
            ds = GQNDataset(folder)
            out[split] = ds.fov, [ds.encoded(i) for i in range(min(scenes, len(ds)))]
    if not out:
        raise UserError(f"--data_dir {data_dir}: no train/ or test/ folder")
    return out


def _rendered(seed, split, index, parts):
    jpegs, raw = sm.render_scene(seed, split, index, parts)
    return jpegs, cameras.pose7(raw)


def raw_cameras(v):
    """7-d poses (S, 7) -> raw cameras (S, 5) float64 (x, y, z, yaw, pitch)."""
    v = np.asarray(v, dtype=np.float64)
    yaw, pitch = cameras.angles(v)
    return np.concatenate([v[:, :3], yaw[:, None], pitch[:, None]], axis=1)


def export(out, layout, source, image_format="png", up="z"):
    """Write each split's scenes of `source` (originals()) into out/<split>/scene_NNNN/ -> list of scene folders."""
    if os.path.exists(out):
        raise UserError(f"OUT {out} already exists; export into a new folder")
    folders = []
    for split, (fov, scenes) in source.items():
        for i, (jpegs, v) in enumerate(scenes):
            folder = os.path.join(out, split, f"scene_{i:04d}")
            os.makedirs(folder)
            files = [f"{j:02d}.{'jpg' if image_format == 'jpeg' else 'png'}" for j in range(len(jpegs))]
            for f, data in zip(files, jpegs):
                if image_format == "jpeg":
                    with open(os.path.join(folder, f), "wb") as fh:
                        fh.write(data)
                else:
                    Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB")).save(os.path.join(folder, f))
            raw = raw_cameras(v)
            if layout == "csv":
                with open(os.path.join(folder, "cameras.csv"), "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["file", "x", "y", "z", "yaw", "pitch"])
                    w.writerows([f, *map(repr, map(float, r))] for f, r in zip(files, raw))
            else:
                meta = {"frames": [{"file_path": f"./{f}", "transform_matrix": m.tolist()}
                                   for f, m in zip(files, cameras.matrix(raw, up))]}
                if fov is not None:
                    meta = {"camera_angle_x": math.radians(fov), **meta}
                with open(os.path.join(folder, "transforms.json"), "w") as fh:
                    json.dump(meta, fh, indent=1)
            folders.append(folder)
    return folders


def compare(imported, source):
    """Imported data folder against `source` (originals()) -> {split: dict(scenes, pose_error, pixel_error,
    identical, views)}: the largest |difference| of the 7-d poses, the mean |difference| of the decoded pixels in
    grey levels, and the number of views whose JPEG bytes are the same."""
    result = {}
    for split, (_, scenes) in source.items():
        folder = os.path.join(imported, split)
        if not os.path.isdir(folder):
            continue
        ds = GQNDataset(folder)
        if len(ds) != len(scenes):
            raise UserError(f"{folder}: {len(ds)} scenes, the originals have {len(scenes)}")
        pose_error, diffs, identical, views = 0.0, [], 0, 0
        for i, (jpegs, v) in enumerate(scenes):
            ours, w = ds.encoded(i)
            pose_error = max(pose_error, float(np.abs(np.asarray(w) - np.asarray(v)).max()))
            for a, b in zip(jpegs, ours):
                x, y = (simplejpeg.decode_jpeg(f, colorspace="RGB").astype(np.int16) for f in (a, b))
                diffs.append(np.abs(x - y).mean() if x.shape == y.shape else np.inf)
                identical += a == b
                views += 1
        result[split] = dict(scenes=len(scenes), pose_error=pose_error, pixel_error=float(np.mean(diffs)),
                             identical=identical, views=views)
    if not result:
        raise UserError(f"--compare {imported}: no split of the originals there")
    return result


def run(argv):
    p = ArgumentParser(description="Export Shepard-Metzler scenes as cameras.csv or transforms.json scene folders "
                                   "(import_scenes.py's layouts), or compare an import with them.")
    p.add_argument("out", metavar="OUT", nargs="?", help="output folder (gets train/ and test/ scene folders)")
    p.add_argument("--layout", choices=("csv", "transforms"), help="cameras.csv or transforms.json")
    p.add_argument("--compare", metavar="DST", help="instead: compare the imported data folder DST with the originals")
    p.add_argument("--data_dir", help="the originals: a converted data folder (train/, test/); default: rendered")
    p.add_argument("--scenes", type=positive_int, default=8, help="scenes per split (default 8)")
    p.add_argument("--parts", type=positive_int, default=5, help="rendered: cubes per object (default 5)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="rendered: the renderer's seed (default 0)")
    p.add_argument("--image_format", choices=("png", "jpeg"), default="png",
                   help="png: decoded pixels; jpeg: the stored bytes (default png)")
    p.add_argument("--up", choices=("z", "y"), default="z", help="transforms.json's world up axis (default z)")
    args = p.parse_args(argv)
    if (args.out is None) == (args.compare is None):
        raise UserError("give OUT (with --layout) to export, or --compare DST, not both")
    if args.out is not None and args.layout is None:
        raise UserError("--layout: required to export (csv or transforms)")
    if args.parts > sm.MAX_PARTS:
        raise UserError(f"--parts {args.parts}: at most {sm.MAX_PARTS}")
    source = originals(args.data_dir, args.scenes, args.parts, args.seed)
    if args.compare is not None:
        for split, r in compare(args.compare, source).items():
            print(f"{split}: {r['scenes']} scenes, 7-d poses differ by at most {r['pose_error']:.2g}, pixels by "
                  f"{r['pixel_error']:.3f} grey levels on average, {r['identical']} of {r['views']} views "
                  f"byte-identical")
        return
    folders = export(args.out, args.layout, source, args.image_format, args.up)
    print(f"wrote {len(folders)} scene folders ({args.layout}, {args.image_format}) -> "
          + ", ".join(os.path.join(args.out, s) for s in source))


def main(argv=None):
    cli_main(run, argv)


if __name__ == "__main__":
    main()
