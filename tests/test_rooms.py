"""The built-in rooms (dataset/rooms.py): deterministic shards, what the objects change recorded beside the frames,
and the object score at both ends: a model that draws the room empty scores exactly 1, the truth exactly 0."""
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

import evaluate
from conftest import main_error, make_data, run_script
from dataset import builtin, raycast, rooms
from gqn_dataset import GQNDataset, resize
from model import ELBO
from sampling import fixed_views


def shard_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_the_same_seed_gives_the_same_bytes_with_one_and_two_workers(room_data, tmp_path):
    two = builtin.render_dataset(str(tmp_path / "two"), rooms.Rooms(), 8, 6, seed=1, workers=2, scenes_per_shard=4,
                                 progress=False)
    for a, b in zip(room_data, two):
        assert shard_bytes(a) == shard_bytes(b)
    other = builtin.render_dataset(str(tmp_path / "other"), rooms.Rooms(), 8, 0, seed=2, scenes_per_shard=4,
                                   progress=False)
    assert shard_bytes(other[0]) != shard_bytes(room_data[0])


def test_render_workers_run_numpys_blas_on_one_thread_unless_the_environment_says(monkeypatch):
    """A worker a core, each with BLAS threads of its own, oversubscribed the CPU (docs/speed.md: the built-in
    renderer); a thread count the user set is theirs, and the parent's environment is left as it was."""
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    with builtin.one_blas_thread():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            seen = list(pool.map(os.getenv, builtin.BLAS_THREADS))
    assert seen == ["1", "3", "1"] and dict(os.environ) == before


def test_the_shards_hold_rooms_with_their_camera_model_and_the_test_split_what_the_objects_change(room_data):
    train, test = GQNDataset(room_data[0]), GQNDataset(room_data[1])
    assert (train.dataset, train.views, train.image_size, train.source) == ("rooms_ring_camera", 10, 64, "renderer")
    assert (train.fov, train.near) == (45.0, 0.2) and train.far > 2 * rooms.ROOM
    assert not train.has_objects and test.has_objects
    frames, cams = test[0]
    radius = cams[:, :2].norm(dim=1)
    torch.testing.assert_close(radius, torch.full_like(radius, rooms.RING), atol=1e-5, rtol=0)  # on the ring
    assert torch.allclose(cams[:, 2], torch.full_like(cams[:, 2], rooms.HEIGHT))
    sky = frames[:, :, 0].float().mean((0, 2))  # the top row: sky blue
    assert sky[2] > sky[0] > 100 and sky[2] > sky[1]
    empty, masks = test.load_objects(0, range(10))
    assert empty.shape == frames.shape and masks.shape == (10, 64, 64) and masks.any()
    outside = ~masks[:, None].expand_as(frames)
    assert (frames.int() - empty.int()).abs()[outside].float().mean() < 2  # the same room, up to JPEG
    assert (frames.int() - empty.int()).abs()[~outside].float().mean() > 10  # the objects and their shadows


def test_the_rendered_views_differ_from_the_empty_room_exactly_where_the_masks_say():
    rng = np.random.default_rng(5)
    scene, raw = rooms.random_scene(rng), rooms.random_cameras(rng)
    full, empty, masks = rooms.render_views(scene, raw)
    differs = (full != empty).any(-1)
    assert not differs[~masks].any()  # nothing outside the masks changes
    assert differs[masks].mean() > 0.9  # and nearly every masked pixel does (a shadow on a dark mortar line may not)


@pytest.mark.parametrize("shape", rooms.SHAPES)
def test_each_objects_bounding_sphere_holds_all_of_it_and_little_more(shape):
    """Rays are traced against an object only where they pass its bounding sphere (raycast.bounds): a sphere too
    small would cut the object's edges off, one too large costs time. Rays from all around, traced without it."""
    rng = np.random.default_rng(0)
    obj = dict(shape=shape, centre=np.array([0.4, -0.3]), yaw=0.7, size=0.8, colour=np.ones(3))
    centre, radius = raycast.bounds(obj)
    o = (centre[:, None] + 3 * rng.normal(size=(3, 20000))).astype(np.float32)
    d = (centre[:, None] + rng.uniform(-1, 1, size=(3, 20000)) - o).astype(np.float32)
    t, _ = raycast.object_hit(obj, o, d)
    hits = (o + t * d)[:, np.isfinite(t)]
    far = np.linalg.norm(hits - centre[:, None], axis=0).max()
    assert hits.shape[1] > 2000 and 0.95 * radius < far <= radius


class Oracle(torch.nn.Module):
    """A stand-in GQN that draws, for each query camera, the image `lookup` gives for it."""

    def __init__(self, lookup):
        super().__init__()
        self.lookup, self.noise_shape, self.config = lookup, (1, 1, 1, 1), {"image_size": 64}

    def forward(self, x, v, v_q, x_q, sigma, eps=None):
        zero = torch.zeros(len(x))
        return ELBO(zero, zero, zero, torch.zeros(len(x), 1))

    def generate(self, x, v, v_q, generator=None):
        return torch.stack([self.lookup[tuple(p.tolist())] for p in v_q])


def oracles(folder):
    """Oracle models that draw each query view's empty room, and its truth, as evaluate() scores them."""
    ds = GQNDataset(folder)
    room, truth = {}, {}
    for i in range(len(ds)):
        frames, cams = ds[i]
        empty, _ = ds.load_objects(i, range(ds.views))
        for j in range(ds.views):
            room[tuple(cams[j].tolist())] = resize(empty[j:j + 1], 64)[0] / 255
            truth[tuple(cams[j].tolist())] = resize(frames[j:j + 1], 64)[0] / 255
    return Oracle(room), Oracle(truth)


def query_mask_share(ds, context):
    """The share of the evaluation query views' pixels that the objects or their shadows cover, read from the
    masks themselves (the views evaluate() scores: sampling.fixed_views, seed 0)."""
    shares = []
    for i in range(len(ds)):
        _, q = fixed_views(0, i, ds.views, context)
        shares.append(ds.load_objects(i, [q])[1].float().mean().item())
    return sum(shares) / len(shares)


def test_the_object_score_is_one_for_the_empty_room_and_zero_for_the_truth(room_data):
    empty_room, truth = oracles(room_data[1])
    ds = GQNDataset(room_data[1])
    for context in (1, 3):
        r = evaluate.evaluate(empty_room, ds, context, seed=0, size=64, progress=False)
        assert r["object_score"] == 1.0 and r["object_rmse"] == r["empty_room_rmse"] > 0
        r = evaluate.evaluate(truth, ds, context, seed=0, size=64, progress=False)
        assert r["object_score"] == 0.0 and r["object_rmse"] == 0.0
        assert r["object_pixels"] == pytest.approx(query_mask_share(ds, context))
    r = evaluate.evaluate(empty_room, ds, 3, seed=0, size=64, samples=2, baseline=torch.zeros(3, 64, 64),
                          progress=False)
    assert r["object_score"] == r["mean_of_samples_object_score"] == 1.0


def test_data_that_records_no_objects_gets_no_object_score_and_one_line_why(tmp_path, capsys):
    from conftest import make_checkpoint

    data = make_data(tmp_path / "test", scenes=3, views=6)
    ckpt = make_checkpoint(tmp_path / "c.pt")
    r = evaluate.main(["--checkpoint", str(ckpt), "--test_data_dir", str(data), "--device", "cpu"])
    assert r["object_score"] is None
    line = [t for t in capsys.readouterr().out.splitlines() if t.startswith("no object score")]
    assert line == [f"no object score: {data}'s scenes do not record what their objects change (the built-in rooms "
                    f"of dataset/rooms.py do)"]


def test_the_command_line_renders_rooms_and_bad_flags_get_one_line(tmp_path, capsys):
    r = run_script("dataset/rooms.py", "--out", tmp_path / "r", "--train_scenes", "2", "--test_scenes", "1")
    assert r.returncode == 0, r.stderr
    assert GQNDataset(tmp_path / "r" / "test").has_objects
    main_error(rooms.main, ["--out", str(tmp_path / "x"), "--train_scenes", "-1", "--test_scenes", "1"], capsys,
               "--train_scenes")
    main_error(rooms.main, ["--out", str(tmp_path / "r"), "--train_scenes", "1", "--test_scenes", "1"], capsys,
               "already exists; pass --overwrite")


def test_training_on_rooms_logs_the_object_score_and_scores_it_at_the_end(room_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train
    from conftest import args

    train.main(args(room_data, tmp_path, "run", 3))
    out = capsys.readouterr().out
    assert "| object score " in out.splitlines()[-3]  # the log line at step 3
    assert "where the objects are, RMSE" in out and "for the empty room (object score" in out
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/object_score")] == [3]
    assert acc.Scalars("eval/object_score")[0].value > 0
