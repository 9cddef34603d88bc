"""The built-in worlds, rendered straight into the converted format (gqn_format.py): the same seed gives the same
bytes whatever the number of worker processes, and a split folder that exists is whole.

A world (dataset/shepard_metzler.py's ShepardMetzler, dataset/rooms.py's Rooms) names its data set, and renders
scene `index` of a split as a pure function of (seed, split, index): its JPEG frames, its raw cameras (x, y, z, yaw,
pitch) and, for worlds that know it, what its objects change (the empty views and the masks, gqn_format.write_shard).
train.py's default jobs render a world once into data/builtin/<name> (render_once).
"""
import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import re
import shutil
import time

import numpy as np

if not __package__:  # `python dataset/builtin.py`: the repository's modules, one folder up
    import _repo  # noqa: F401
import cameras  # noqa: E402
from cli import ArgumentParser, UserError, nonneg_int, positive_int  # noqa: E402
from gqn_format import foreign_shards, write_shard  # noqa: E402
from progress import progress_bar  # noqa: E402

SHARD_NAME = re.compile(r"\d{3,}-of-\d{3,}\.pt")
CHUNK = 25  # scenes a task renders (finer than shards, for the progress bar)
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")  # numpy's BLAS: OpenBLAS or MKL


def shard_names(num_shards):
    """DeepMind's file names: 001-of-NNN.pt (wider when there are more than 999 shards)."""
    width = max(3, len(str(num_shards)))
    return [f"{i + 1:0{width}d}-of-{num_shards:0{width}d}.pt" for i in range(num_shards)]


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_counts(train_scenes, test_scenes, seed, workers, scenes_per_shard):
    """UserError naming the flag when a count is not one."""
    for name, value in (("train_scenes", train_scenes), ("test_scenes", test_scenes)):
        if not _is_int(value) or value < 0:
            raise UserError(f"--{name} must be a non-negative integer, got {value!r}")
    if train_scenes + test_scenes == 0:
        raise UserError("nothing to render: --train_scenes and --test_scenes are both 0")
    for name, value, low in (("seed", seed, 0), ("workers", workers, 1), ("scenes_per_shard", scenes_per_shard, 1)):
        if not _is_int(value) or value < low:
            kind = "non-negative" if low == 0 else "positive"
            raise UserError(f"--{name} must be a {kind} integer, got {value!r}")


def check_folders(out, splits, overwrite):
    """The split folders may be (re)written: UserError naming the folder otherwise."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a folder")
    for split, _ in splits:
        folder = os.path.join(out, split)
        if not os.path.exists(folder):
            continue
        if not overwrite:
            raise UserError(f"{folder} already exists; pass --overwrite to replace its shards")
        if not os.path.isdir(folder):
            raise UserError(f"{folder} exists and is not a folder")
        if any(not SHARD_NAME.fullmatch(f) for f in os.listdir(folder)):  # never delete what we did not write
            raise UserError(f"{folder} holds files other than shards; remove it yourself to render there")
        other = foreign_shards(folder, "renderer")
        if other:
            raise UserError(f"{folder} holds another data set, {other}; render into another folder")


def _render_chunk(args):
    world, seed, split, start, stop = args
    return [world.render_scene(seed, split, i) for i in range(start, stop)]


def plan(out, splits, scenes_per_shard, world, seed):
    """The shards to write, in order, as (split, path, scenes), and the rendering tasks that fill them."""
    tasks, shards = [], []
    for split, n in splits:
        partial = os.path.join(out, f".{split}.partial")
        for name, start in zip(shard_names(math.ceil(n / scenes_per_shard)), range(0, n, scenes_per_shard)):
            stop = min(n, start + scenes_per_shard)
            shards.append((split, os.path.join(partial, name), stop - start))
            tasks += [(world, seed, split, a, min(stop, a + CHUNK)) for a in range(start, stop, CHUNK)]
        if os.path.isdir(partial):  # left by a killed run
            shutil.rmtree(partial)
        os.makedirs(partial)
    return shards, tasks


def write(world, path, scenes):
    """One shard of rendered scenes (world.render_scene's)."""
    frames = [s["frames"] for s in scenes]
    poses = cameras.pose7(np.stack([s["cameras"] for s in scenes]))
    objects = {}
    if scenes and scenes[0].get("empty") is not None:
        objects = dict(empty=[s["empty"] for s in scenes], masks=np.stack([s["masks"] for s in scenes]))
    write_shard(path, frames, poses, world.name, world.image_size, world.camera_model(), "renderer", **objects)


@contextlib.contextmanager
def one_blas_thread():
    """Processes started inside run numpy's BLAS on one thread (unless the caller's environment says otherwise).

    The rooms' matrix products start BLAS threads in every worker, and with a worker a core they oversubscribe the
    CPU: 1.2-1.3x the rooms' rendering time on 2 cores (docs/speed.md, the built-in renderer). A worker's BLAS
    reads the variable when numpy loads, so it is set while the processes start and put back after."""
    names = [n for n in BLAS_THREADS if n not in os.environ]
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for n in names:
            os.environ.pop(n, None)


def render_dataset(out, world, train_scenes, test_scenes, seed=0, workers=1, scenes_per_shard=250, overwrite=False,
                   progress=True):
    """Render `train_scenes` and `test_scenes` scenes of `world` into `out/train` and `out/test` -> the split folders.

    The same arguments give byte-identical shards, whatever `workers`. A split is written into
    `out/.<split>.partial` and renamed to `out/<split>` when complete, so a split folder that exists is whole.
    Raises UserError on bad arguments, or when a split folder exists (unless `overwrite`: its shards are replaced).
    """
    check_counts(train_scenes, test_scenes, seed, workers, scenes_per_shard)
    splits = [(s, int(n)) for s, n in (("train", train_scenes), ("test", test_scenes)) if n > 0]
    check_folders(out, splits, overwrite)
    shards, tasks = plan(out, splits, scenes_per_shard, world, int(seed))
    pool = None
    if workers > 1:
        # A process pool that fails loudly (BrokenProcessPool) if a worker dies, where multiprocessing.Pool hangs.
        # "spawn": no fork of a parent that may hold torch threads; the caller needs an `if __name__ == "__main__"`.
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        with one_blas_thread():  # the workers start here, with the tasks
            results = pool.map(_render_chunk, tasks)
    else:
        results = map(_render_chunk, tasks)
    bar = progress_bar(total=train_scenes + test_scenes, unit="scene", desc=f"render {world.name}",
                       disable=not progress)
    try:
        pending = []
        for i, (split, path, count) in enumerate(shards):
            while len(pending) < count:
                scenes = next(results)
                pending += scenes
                bar.update(len(scenes))
            write(world, path, pending[:count])
            pending = pending[count:]
            if i + 1 == len(shards) or shards[i + 1][0] != split:  # split complete: swap it in
                folder = os.path.join(out, split)
                if os.path.isdir(folder):
                    for f in os.listdir(folder):
                        os.unlink(os.path.join(folder, f))
                    os.rmdir(folder)
                os.replace(os.path.dirname(path), folder)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return [os.path.join(out, s) for s, _ in splits]


def render_once(out, world, train_scenes, test_scenes, seed=0, workers=1):
    """Render the world's data set into out/ unless a whole one is there already -> (train, test) folders.

    train.py's default data: rendered into a side folder and renamed, so a run killed half-way never leaves half
    a data set; an empty or half-filled `out` from elsewhere is set aside (out.old-<time>), not deleted.
    """
    splits = os.path.join(out, "train"), os.path.join(out, "test")
    foreign = next(filter(None, (foreign_shards(s, "renderer") for s in splits)), None)
    if foreign:
        print(f"{out}/ holds another data set ({foreign}): it is set aside and the built-in one rendered.")
    elif all(os.path.isdir(s) and any(f.endswith(".pt") for f in os.listdir(s)) for s in splits):
        print(f"Using the built-in data set in {out}/ (rendered before).")
        return splits
    print(f"Rendering the built-in data set once: {train_scenes} + {test_scenes} {world.describe}, "
          f"{world.views} views each, into {out}/ (about {world.seconds(train_scenes + test_scenes, workers):.0f} s "
          f"on {workers} cores).")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    render_dataset(partial, world, train_scenes, test_scenes, seed=seed, workers=workers)
    if os.path.exists(out):
        os.replace(out, out + f".old-{int(time.time())}")
    os.replace(partial, out)
    return splits


def render_parser(description):
    """A renderer's command line (dataset/shepard_metzler.py, dataset/rooms.py): the flags they share."""
    p = ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="output folder (gets train/ and test/)")
    p.add_argument("--train_scenes", type=nonneg_int, required=True, help="number of training scenes")
    p.add_argument("--test_scenes", type=nonneg_int, required=True, help="number of test scenes")
    p.add_argument("--seed", type=nonneg_int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--workers", type=positive_int, default=1, help="rendering processes (default 1)")
    p.add_argument("--scenes_per_shard", type=positive_int, default=250, help="scenes per .pt file (default 250)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT/train, OUT/test")
    return p


def render_command(args, world):
    """render_parser's args and a world -> its splits written, and said; an unwritable folder is one line."""
    try:
        folders = render_dataset(args.out, world, args.train_scenes, args.test_scenes, args.seed, args.workers,
                                 args.scenes_per_shard, args.overwrite)
    except OSError as e:
        raise UserError(f"{e.filename or args.out}: {e.strerror}") from None
    print("wrote " + ", ".join(folders))
