"""Sampling GQN's training examples and evaluation views: pure functions of (seed, step, scene), so that resumed runs,
DDP ranks, DataLoader workers and threads draw exactly what one uninterrupted process draws.

Eslami et al. 2018, supplementary "Training": per scene M context views (x, v), M uniform in 1..K, and one other
view as the query (x_q, v_q). TrainBatches builds each step's batch (and the random inputs of its forward pass:
the posterior's noise, the volume's depth jitter), filling the place of a scene that cannot be read from others.
"""
import functools
from collections import namedtuple

import numpy as np
import torch

from cli import one_line
from gqn_format import DatasetError

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
    (x uint8 [K, 3, H, W], v [K, 7], x_q uint8 [3, H, W], v_q [7], i), or Unreadable(i, why). With `objects` (data
    that records what its objects change: GQNDataset.has_objects) two more: the query view with the objects
    removed, uint8 [3, H, W], and where they are, bool [H, W]."""

    def __init__(self, ds, context, seed, scenes=None, objects=False):
        self.ds, self.context, self.seed, self.objects = ds, context, seed, objects
        self.scenes = range(len(ds)) if scenes is None else scenes

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, k):
        i = int(self.scenes[k])
        ctx, q = fixed_views(self.seed, i, self.ds.views, self.context)

        def load():
            frames, cameras = self.ds.load(i, [int(j) for j in ctx] + [int(q)])
            item = (frames[:-1], cameras[:-1], frames[-1], cameras[-1], i)
            if self.objects:
                empty, masks = self.ds.load_objects(i, [int(q)])
                item += (empty[0], masks[0])
            return item

        return read_or_skip(load, i)


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
            raise ValueError(f"noise {sorted(unknown)}: no random stream (sampling.NOISE_STREAMS) for it")
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
                    cameras = ds.load_into(candidate, context.tolist() + [query], list(x[n, :m]) + [x_q[n]])
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
