"""Tests for dataset/shepard_metzler.py: the built-in Shepard-Metzler data set (Eslami et al. 2018, supplement)."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import main_error, run_script, script_error
from dataset import shepard_metzler as sm
import cameras
import gqn_dataset

# The two real objects of ../shared/fixtures (scene A, scene B), recovered by searching all 5-cube self-avoiding
# walks for the one whose silhouettes match the real frames over all 15 views.
REAL_OBJECTS = [
    [[0, 0, 0], [0, 0, -1], [0, 0, -2], [0, -1, -2], [-1, -1, -2]],
    [[0, 0, 0], [0, 1, 0], [0, 1, 1], [-1, 1, 1], [-1, 0, 1]],
]


def cameras5(yaw, pitch):
    yaw, pitch = np.asarray(yaw, np.float64), np.asarray(pitch, np.float64)
    position = -sm.DISTANCE * cameras.direction(yaw, pitch)
    return np.concatenate([position, yaw[:, None], pitch[:, None]], 1).astype(np.float32)


@pytest.mark.parametrize("parts", [1, 2, 5, 7, 12, 20])
def test_cubes_face_connected_self_avoiding_centred(parts):
    rng = np.random.default_rng(parts)
    for _ in range(50):
        cells = sm.random_walk(rng, parts)
        assert cells.shape == (parts, 3)
        assert len({tuple(c) for c in cells}) == parts                        # self-avoiding
        assert (np.abs(np.diff(cells, axis=0)).sum(1) == 1).all()             # each cube shares a face with the next
        centres, colours = sm.random_object(rng, parts)
        np.testing.assert_allclose(centres.min(0) + centres.max(0), 0, atol=1e-12)   # centred
        steps = np.abs(np.diff(centres, axis=0)).sum(1)
        np.testing.assert_allclose(steps, sm.CUBE)
        assert colours.shape == (parts, 3) and colours.min() >= 0 and colours.max() <= 1


def test_camera_geometry_follows_deepmind():
    rng = np.random.default_rng(0)
    cams = sm.random_cameras(rng, 2000)
    yaw, pitch = cams[:, 3].astype(np.float64), cams[:, 4].astype(np.float64)
    assert yaw.min() >= 0 and yaw.max() < 2 * math.pi
    assert pitch.min() >= -1.36 and pitch.max() <= 1.51
    assert pitch.min() < -1.3 and pitch.max() > 1.45                          # covers the real range
    np.testing.assert_allclose(pitch / (math.pi / 100), np.round(pitch / (math.pi / 100)), atol=1e-4)
    np.testing.assert_allclose(yaw / (math.pi / 50), np.round(yaw / (math.pi / 50)), atol=1e-4)
    v = cameras.pose7(cams)                                               # (x, y, z, sy, cy, sp, cp)
    d = np.stack([v[:, 6] * v[:, 4], -v[:, 6] * v[:, 3], v[:, 5]], 1)        # view direction from the pose alone
    np.testing.assert_allclose(np.linalg.norm(v[:, :3], axis=1), 10 / 3, atol=1e-5)
    np.testing.assert_allclose(v[:, :3], -(10 / 3) * d, atol=1e-5)           # looks at the centre


def test_cube_at_origin_is_centred_in_every_view():
    yaw = np.arange(0, 100, 7) * math.pi / 50
    pitch = np.linspace(-43, 48, len(yaw)).round() * math.pi / 100
    images = sm.render_views(np.zeros((1, 3)), np.ones((1, 3)), cameras5(yaw, pitch))
    assert images.shape == (len(yaw), 64, 64, 3) and images.dtype == np.uint8
    for im in images.max(-1):
        assert im[31:33, 31:33].min() > 0
        r, c = np.nonzero(im)                       # silhouette; perspective makes it only nearly symmetric
        assert abs(r.mean() + 0.5 - 32) < 0.5 and abs(c.mean() + 0.5 - 32) < 0.5


def test_image_axes_world_z_up_not_mirrored():
    # Camera at yaw 0, pitch 0 sits at (-10/3, 0, 0) looking along +x: +z must be up, -y must be right.
    cams = cameras5([0.0], [0.0])
    for offset, expect in (([0, 0, 2], "up"), ([0, -2, 0], "right")):
        image = sm.render_views(np.array([offset]) * sm.CUBE, np.ones((1, 3)), cams)[0].max(-1)
        r, c = np.nonzero(image > 128)
        if expect == "up":
            assert r.mean() < 26 and abs(c.mean() - 31.5) < 1
        else:
            assert c.mean() > 38 and abs(r.mean() - 31.5) < 1


def test_real_objects_match_real_frames(fixtures_dir):
    """The real scenes' objects, rendered with their real cameras, cover the real frames' silhouettes."""
    data = np.load(os.path.join(fixtures_dir, "gqn-tfrecord", "shepard_metzler_5_parts", "train",
                                "001-of-900.expected.npz"))
    for scene, cells in enumerate(REAL_OBJECTS):
        cells = np.array(cells, np.float64)
        centres = (cells - (cells.min(0) + cells.max(0)) / 2) * sm.CUBE
        v = data["cameras"][scene]
        cams = np.concatenate([v[:, :3], np.arctan2(v[:, 3:4], v[:, 4:5]), np.arctan2(v[:, 5:6], v[:, 6:7])], 1)
        ours = sm.render_views(centres, np.ones((5, 3)), cams).max(-1) > 128
        real = data["frames"][scene].max(-1) > 40
        iou = (ours & real).sum() / (ours | real).sum()
        assert iou > 0.8, f"scene {scene}: silhouette IoU {iou:.2f}"


def test_random_objects_centred_and_visible():
    rng = np.random.default_rng(1)
    for _ in range(10):
        centres, colours = sm.random_object(rng, 7)
        images = sm.render_views(centres, colours, sm.random_cameras(rng))
        for im in images.max(-1) > 10:
            r, c = np.nonzero(im)
            assert 100 < len(r) < 64 * 64 / 2
            assert np.hypot(r.mean() - 31.5, c.mean() - 31.5) < 12


def read_tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_render_dataset_format_and_determinism(tmp_path):
    a = sm.render_dataset(str(tmp_path / "a"), 5, 3, parts=5, seed=3, scenes_per_shard=2, progress=False)
    assert a == [str(tmp_path / "a" / "train"), str(tmp_path / "a" / "test")]
    assert sorted(os.listdir(a[0])) == ["001-of-003.pt", "002-of-003.pt", "003-of-003.pt"]
    assert sorted(os.listdir(tmp_path / "a")) == ["test", "train"]            # no partial folders left
    sm.render_dataset(str(tmp_path / "b"), 5, 3, parts=5, seed=3, scenes_per_shard=2, workers=2, progress=False)
    sm.render_dataset(str(tmp_path / "c"), 5, 3, parts=5, seed=4, scenes_per_shard=2, progress=False)
    tree = read_tree(tmp_path / "a")
    assert tree == read_tree(tmp_path / "b")                                  # same seed: same bytes, any workers
    other = read_tree(tmp_path / "c")
    assert all(tree[k] != other[k] for k in tree)                             # another seed: other scenes

    shard = torch.load(os.path.join(a[0], "001-of-003.pt"), weights_only=True, mmap=True)
    assert shard["format"] == "gqn-jpeg-v1" and shard["dataset"] == "shepard_metzler_5_parts"
    assert shard["image_size"] == 64 and shard["views"] == 15
    assert shard["cameras"].shape == (2, 15, 7) and shard["offsets"].shape == (2 * 15 + 1,)
    first = bytes(shard["jpeg"][shard["offsets"][0]:shard["offsets"][1]].numpy())
    assert first[:2] == b"\xff\xd8" and first[-2:] == b"\xff\xd9"

    for folder, n in zip(a, (5, 3)):
        ds = gqn_dataset.GQNDataset(folder)
        assert len(ds) == n and ds.dataset == "shepard_metzler_5_parts" and ds.image_size == 64 and ds.views == 15
        frames, cameras = ds[n - 1]
        assert frames.shape == (15, 3, 64, 64) and frames.dtype == torch.uint8
        assert cameras.shape == (15, 7) and cameras.dtype == torch.float32
        assert frames.float().mean() > 1                                      # not a black image
        np.testing.assert_allclose(cameras[:, :3].norm(dim=1).numpy(), 10 / 3, atol=1e-5)


def test_cli_renders(tmp_path, capsys):
    out = str(tmp_path / "sm")
    p = run_script("dataset/shepard_metzler.py", "--out", out, "--train_scenes", "2", "--test_scenes", "1", "--parts", "3", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert os.listdir(os.path.join(out, "train")) == ["001-of-001.pt"]
    assert gqn_dataset.GQNDataset(os.path.join(out, "test")).dataset == "shepard_metzler_3_parts"
    with pytest.raises(SystemExit):                                           # already there
        sm.main(["--out", out, "--train_scenes", "2", "--test_scenes", "1"])
    assert "--overwrite" in capsys.readouterr().err
    sm.main(["--out", out, "--train_scenes", "3", "--test_scenes", "1", "--overwrite"])
    assert len(gqn_dataset.GQNDataset(os.path.join(out, "train"))) == 3


@pytest.mark.parametrize("args", [
    ["--train_scenes", "-1", "--test_scenes", "1"],
    ["--train_scenes", "two", "--test_scenes", "1"],
    ["--train_scenes", "1", "--test_scenes", "1", "--parts", "0"],
    ["--train_scenes", "1", "--test_scenes", "1", "--workers", "0"],
    ["--train_scenes", "1", "--test_scenes", "1", "--bogus"],
    ["--train_scenes", "0", "--test_scenes", "0"],
    ["--train_scenes", "1"],
])
def test_bad_flags_one_line_exit_1(tmp_path, capsys, args):
    main_error(sm.main, ["--out", str(tmp_path / "x"), *args], capsys)
    assert not os.path.exists(tmp_path / "x" / "train")


def test_cli_bad_input_no_traceback(tmp_path):
    (tmp_path / "f").write_text("")
    p = run_script("dataset/shepard_metzler.py", "--out", str(tmp_path / "f"), "--train_scenes", "1", "--test_scenes", "1")
    assert script_error(p) == f"error: --out {tmp_path / 'f'} exists and is not a folder"
