"""Data-pipeline benchmark: conversion, full-scene reads and training batches, each beside a torch-gqn-style reader.

Measures the input side of GQN training (Eslami et al. 2018, supplementary "Training": M context views and one
query view per scene) on Shepard-Metzler-shaped data (64 px, 15 views), made by repeating two scenes into a
temporary folder: two real scenes of DeepMind's data from the project's test fixtures (../shared/fixtures, beside
a clone of the repository in the project's CI) or, without them, two scenes of the built-in renderer. One command,
one table:

    python bench_data.py [--scenes 200] [--batch 36] [--workers 2] [--scenes_from fixtures|renderer]

The torch-gqn-style reader is what torch-gqn's GQNDataset does per scene: gzip, unpickle (torch.load of a
pickled Scene), Pillow-decode all S frames. One row compares the converted reader (os.pread) with the memory-mapped
reader it replaced instead (MappedShards). Timings run on one thread (torch.set_num_threads(1)).
"""
import bisect
import collections
import gzip
import io
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import simplejpeg
import torch
from PIL import Image

import cli
from cameras import pose7
from cli import UserError, positive_int
from dataset.convert2torch import convert_shard
from dataset.tfrecord import make_example, parse_example, read_records, write_records
from gqn_dataset import GQNDataset, TrainBatches, write_shard

SM5 = "shepard_metzler_5_parts"
ROOT = os.path.dirname(os.path.abspath(__file__))
# torch-gqn pickled this namedtuple from its converter's __main__; torch.load(weights_only=False) needs it here.
Scene = collections.namedtuple("Scene", ["frames", "cameras"])


class TorchGQNStyle(torch.utils.data.Dataset):
    """torch-gqn's reader: one gzip'd pickled Scene per file, every frame decoded with Pillow."""

    def __init__(self, root):
        self.root, self.files = root, sorted(os.listdir(root), key=lambda n: int(n.split(".")[0]))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with gzip.open(os.path.join(self.root, self.files[i]), "rb") as f:
            scene = torch.load(f, weights_only=False)
        frames = np.stack([np.asarray(Image.open(io.BytesIO(x)).convert("RGB")) for x in scene.frames])
        return torch.from_numpy(frames).permute(0, 3, 1, 2), torch.from_numpy(pose7(scene.cameras[0]))


class MappedShards:
    """The converted reader as it was before os.pread: each shard memory-mapped (torch.load mmap=True), a scene's
    frames sliced out of the map. A shard cut short under a map ends the process with SIGBUS, so it is only the
    reference that the pread reader's speed is compared with."""

    def __init__(self, root):
        self.shards = [torch.load(os.path.join(root, n), weights_only=True, mmap=True) for n in sorted(os.listdir(root))]
        self.starts = np.cumsum([0] + [len(s["cameras"]) for s in self.shards]).tolist()

    def __getitem__(self, i):
        k = bisect.bisect_right(self.starts, i) - 1
        shard, local = self.shards[k], i - self.starts[k]
        views, size, jpeg = shard["views"], shard["image_size"], shard["jpeg"].numpy()
        o = shard["offsets"].numpy()[local * views:(local + 1) * views + 1]
        out = np.empty((views, size, size, 3), dtype=np.uint8)
        for j in range(views):
            simplejpeg.decode_jpeg(jpeg[o[j]:o[j + 1]], colorspace="RGB", buffer=out[j])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(shard["cameras"][local].numpy())


def torch_gqn_batch(frames, cameras, rng, k):
    """torch-gqn's sample_batch: one M and one set of view indices for the whole batch (the query may repeat)."""
    m = int(rng.integers(1, k + 1))
    idx = torch.from_numpy(rng.permutation(frames.shape[1]))
    return frames[:, idx[:m]], cameras[:, idx[:m]], frames[:, idx[m]], cameras[:, idx[m]]


def two_scenes(fixtures, folder):
    """Two scenes as TFRecord records and torch-gqn files: the fixtures' two real ones, or (fixtures None) two of the
    built-in renderer, written as torch-gqn's converter wrote its files (gzip of a legacy torch.save stream of a
    __main__.Scene). -> (records, [two torch-gqn files])."""
    if fixtures:
        records = list(read_records(os.path.join(fixtures, "gqn-tfrecord", SM5, "train", "001-of-900.tfrecord")))
        return records, [os.path.join(fixtures, "legacy-pt-gz", SM5 + "-torch", "train", n)
                         for n in ("0.pt.gz", "1033.pt.gz")]
    from dataset.shepard_metzler import render_scene

    records, files = [], []
    for i in range(2):
        frames, raw = render_scene(0, "train", i, parts=5)
        records.append(make_example({"frames": frames, "cameras": raw.astype(np.float32).ravel().tolist()}))
        files.append(os.path.join(folder, f"scene{i}.pt.gz"))
        with gzip.open(files[-1], "wb") as f:
            torch.save(Scene(np.array(frames, dtype=object), raw[None].astype(np.float32)), f,
                       _use_new_zipfile_serialization=False)
    return records, files


def make_data(fixtures, folder, scenes):
    """TFRecord, converted and torch-gqn copies of `scenes` scenes, cycling two scenes (two_scenes)."""
    records, files = two_scenes(fixtures, folder)
    big = os.path.join(folder, "big.tfrecord")
    write_records(big, [records[i % len(records)] for i in range(max(scenes, 1000))])  # ~22 MB
    parsed = [parse_example(r) for r in records]
    per_shard = 20
    for s in range(0, scenes, per_shard):
        idx = [i % len(parsed) for i in range(s, min(s + per_shard, scenes))]
        cams = np.stack([np.asarray(parsed[i]["cameras"], np.float32).reshape(15, 5) for i in idx])
        n = -(-scenes // per_shard)
        write_shard(os.path.join(folder, "converted", f"{s // per_shard + 1:03d}-of-{n:03d}.pt"),
                    [parsed[i]["frames"] for i in idx], pose7(cams), SM5, 64)
    legacy = os.path.join(folder, "legacy")
    os.makedirs(legacy)
    for i in range(scenes):
        shutil.copy(files[i % 2], os.path.join(legacy, f"{i}.pt.gz"))
    return big


def rate(fn, count, repeat=3):
    """Median of `repeat` timed runs of fn() (after one warm-up) -> count per second."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return count / statistics.median(times)


def read_all(ds, order):
    def run():
        for i in order:
            ds[i]
    return run


def loader_rate(loader, scenes_per_batch):
    """Scenes/s through a DataLoader, timed from its first batch (so worker start-up is not counted)."""
    it = iter(loader)
    next(it)
    t, n = time.perf_counter(), 0
    for _ in it:
        n += 1
    return n * scenes_per_batch / (time.perf_counter() - t)


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=positive_int, default=200, help="scenes in the benchmark data (default 200)")
    parser.add_argument("--batch", type=positive_int, default=36, help="training batch size (the paper's 36)")
    parser.add_argument("--steps", type=positive_int, default=30, help="training batches timed per loader (default 30)")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="DataLoader workers for the N-worker rows (default 2)")
    parser.add_argument("--scenes_from", choices=["fixtures", "renderer"], default=None,
                        help="two real scenes from the project's test fixtures (../shared/fixtures), or two of the "
                             "built-in renderer (default: fixtures where they are, else renderer)")
    args = parser.parse_args(argv)
    if args.scenes < args.batch:
        raise UserError(f"--scenes {args.scenes}: fewer than one batch (--batch {args.batch})")
    return args


def run(argv=None):
    args = parse_args(argv)
    fixtures = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")
    found = os.path.isdir(os.path.join(fixtures, "gqn-tfrecord"))
    source = args.scenes_from or ("fixtures" if found else "renderer")
    if source == "fixtures" and not found:
        raise UserError(f"--scenes_from fixtures: {fixtures} does not hold gqn-tfrecord/ (the project's test "
                        f"fixtures); use --scenes_from renderer")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        big = make_data(fixtures if source == "fixtures" else None, folder, args.scenes)
        mb = os.path.getsize(big) / 1e6
        out = os.path.join(folder, "out.pt")
        rows.append(("convert TFRecord -> .pt, 1 worker", rate(lambda: convert_shard(big, out, SM5), mb), "MB/s",
                     "(TensorFlow needed)", None))

        jpeg = parse_example(next(read_records(big)))["frames"][0]
        sj = rate(lambda: [simplejpeg.decode_jpeg(jpeg) for _ in range(500)], 500)
        pil = rate(lambda: [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for _ in range(500)], 500)
        rows.append(("decode one 64 px JPEG (simplejpeg vs Pillow)", 1e6 / sj, "us", 1e6 / pil, None))

        converted = GQNDataset(os.path.join(folder, "converted"))
        legacy = GQNDataset(os.path.join(folder, "legacy"))
        old = TorchGQNStyle(os.path.join(folder, "legacy"))
        order = np.random.default_rng(0).permutation(args.scenes).tolist()
        baseline = rate(read_all(old, order), args.scenes)
        rows.append(("full scene (15 views), converted shards", rate(read_all(converted, order), args.scenes),
                     "scenes/s", baseline, True))
        mapped = rate(read_all(MappedShards(os.path.join(folder, "converted")), order), args.scenes)
        rows.append(("  the same, against the memory-mapped reader it replaced", rate(read_all(converted, order),
                     args.scenes), "scenes/s", mapped, True))
        rows.append(("full scene (15 views), torch-gqn folder via GQNDataset", rate(read_all(legacy, order),
                     args.scenes), "scenes/s", baseline, True))
        rows += loader_rows(converted, old, args)
    print_table(rows, args, source)


def loader_rows(converted, old, args):
    """Training batches from our loader and from a torch-gqn-style one, with 0 and --workers workers -> rows."""
    k, steps, rows = 15, args.steps, []
    for workers in (0, args.workers):
        ours = TrainBatches(converted, args.batch, k, seed=0, noise={"eps": ("normal", (12, 3, 16, 16))})
        loader = torch.utils.data.DataLoader(ours, batch_size=None, sampler=range(steps + 1), num_workers=workers)
        rng = np.random.default_rng(0)
        theirs = torch.utils.data.DataLoader(old, batch_size=args.batch, shuffle=True, num_workers=workers,
                                             drop_last=True)

        def old_batches():  # torch-gqn: full scenes through the loader, views picked in the training loop
            for _ in range(-(-(steps + 1) * args.batch // len(old))):
                for frames, cameras in theirs:
                    yield torch_gqn_batch(frames, cameras, rng, k - 1)
        baseline = loader_rate(old_batches(), args.batch)
        rows.append((f"training batches (batch {args.batch}), {workers} workers",
                     loader_rate(loader, args.batch), "scenes/s", baseline, True))
    return rows


def print_table(rows, args, source):
    print(f"\nGQN data benchmark: {args.scenes} Shepard-Metzler scenes (64 px, 15 views; two "
          f"{'real scenes of the fixtures' if source == 'fixtures' else 'of the built-in renderer'}, repeated), "
          f"batch {args.batch}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores, torch.set_num_threads(1)\n")
    print(f"| {'what':<56} | {'this repo':>13} | {'torch-gqn style':>19} | {'speed-up':>8} |")
    print(f"|{'-' * 58}|{'-' * 14}:|{'-' * 20}:|{'-' * 9}:|")
    for what, ours, unit, theirs, faster_is_higher in rows:
        theirs_s = theirs if isinstance(theirs, str) else f"{theirs:.0f} {unit}"
        if theirs is None or isinstance(theirs, str):
            ratio = ""
        else:
            ratio = f"{ours / theirs if faster_is_higher else theirs / ours:.1f}x"
        print(f"| {what:<56} | {f'{ours:.0f} {unit}':>13} | {theirs_s:>19} | {ratio:>8} |")


def main(argv=None):
    cli.main(run, argv)


if __name__ == "__main__":
    main()
