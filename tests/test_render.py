"""render.py: the ring of cameras is DeepMind's geometry, and the PNG/GIF come out with the promised layout."""
import math

import pytest
import torch
from PIL import Image

import cameras
import pictures
import render
from checkpoint import load_model
from conftest import SIZE, make_checkpoint, make_data


@pytest.fixture(params=["pool", "volume"])
def setup(tmp_path, request):
    data = make_data(tmp_path / "test", scenes=2, views=6)
    return tmp_path, str(make_checkpoint(tmp_path / "latest.pt", representation=request.param)), str(data)


def test_camera_round_trips_yaw_and_pitch_and_looks_at_the_centre():
    yaw, pitch = torch.tensor([0.3, -2.0, 3.0]), torch.tensor([0.5, -0.2, 1.1])
    v = cameras.look_at(10 / 3, yaw, pitch)
    y, p = cameras.angles(v)
    assert torch.allclose(y, yaw, atol=1e-6) and torch.allclose(p, pitch, atol=1e-6)
    assert torch.allclose(v[:, :3].norm(dim=-1), torch.full((3,), 10 / 3))
    # DeepMind's cameras sit at -dist * d: the view direction d points from the camera to the centre.
    d = torch.stack([p.cos() * y.cos(), -p.cos() * y.sin(), p.sin()], -1)
    assert torch.allclose(v[:, :3], -(10 / 3) * d, atol=1e-6)


def test_ring_keeps_the_scenes_distance_and_pitch_and_steps_evenly():
    cams = cameras.look_at(3.0, torch.tensor([0.1, 1.0, 2.0]), torch.tensor([0.2, 0.4, 0.3]))
    r = cameras.ring(cams, 8)
    y, p = cameras.angles(r)
    assert torch.allclose(r[:, :3].norm(dim=-1), torch.full((8,), 3.0), atol=1e-5)
    assert torch.allclose(p, torch.full((8,), 0.3), atol=1e-5)
    assert y[0].item() == pytest.approx(0.1, abs=1e-6)
    steps = torch.remainder(y.diff(), 2 * math.pi)
    assert torch.allclose(steps, torch.full((7,), 2 * math.pi / 8), atol=1e-5)


def test_png_has_one_row_per_panel(setup):
    tmp, ckpt, data = setup
    out = tmp / "out" / "scene.png"
    render.main(["--checkpoint", ckpt, "--data_dir", data, "--scene", "1", "--out", str(out),
                 "--views", "4", "--context", "2", "--scale", "1", "--device", "cpu"])
    im = Image.open(out)
    cols = max(2, 4, 6 - 2)
    assert im.size == (pictures.LABEL + cols * (SIZE + pictures.GAP), 4 * (SIZE + pictures.GAP) + pictures.GAP)
    assert [p.name for p in out.parent.iterdir()] == ["scene.png"]  # no temp file left


def test_gif_plays_the_ring_then_the_held_out_views(setup):
    tmp, ckpt, data = setup
    out = tmp / "scene.gif"
    render.main(["--checkpoint", ckpt, "--data_dir", data, "--out", str(out), "--views", "5",
                 "--context", "3", "--scale", "2", "--device", "cpu"])
    im = Image.open(out)
    assert im.n_frames == 5 + (6 - 3)
    tile, gap = 2 * SIZE, 2 * pictures.GAP
    assert im.size == ((3 + 2) * (tile + gap) + 3 * gap, pictures.label_px(tile) + 6 + tile + gap)


def test_same_seed_same_picture(setup):
    tmp, ckpt, data = setup
    for name in ("a.png", "b.png"):
        render.main(["--checkpoint", ckpt, "--data_dir", data, "--out", str(tmp / name), "--device", "cpu"])
    assert (tmp / "a.png").read_bytes() == (tmp / "b.png").read_bytes()


def test_bad_input_gets_one_line(setup, capsys):
    tmp, ckpt, data = setup
    with pytest.raises(SystemExit) as e:
        render.main(["--checkpoint", ckpt, "--data_dir", data, "--scene", "2", "--out", str(tmp / "x.png")])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: --scene 2: {data} has scenes 0..1"
    with pytest.raises(SystemExit) as e:
        render.main(["--checkpoint", ckpt, "--data_dir", data, "--out", str(tmp / "x.jpg")])
    assert e.value.code != 0 and "--out" in capsys.readouterr().err
    other = make_checkpoint(tmp / "c32.pt", image_size=2 * SIZE)
    with pytest.raises(SystemExit) as e:
        render.main(["--checkpoint", str(other), "--data_dir", data, "--out", str(tmp / "x.png")])
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: --data_dir")


def test_cameras_of_the_users_choosing_with_samples_and_their_spread(setup, capsys):
    tmp, ckpt, data = setup
    poses = tmp / "poses.txt"
    poses.write_text("# x y z yaw pitch\n0 -3 0.5 1.57 0.1\n3, 0, 0, 3.14, 0\n")
    for argv, cols in ((["--yaw", "0", "90", "180", "270", "--pitch", "20", "--distance", "3"], 4),
                       (["--poses", str(poses)], 2)):
        out = tmp / "mine.png"
        render.main(["--checkpoint", ckpt, "--data_dir", data, "--out", str(out), "--context_views", "0", "4",
                     "--samples", "3", "--scale", "1", "--device", "cpu", *argv])
        assert "context views [0, 4]" in capsys.readouterr().out
        im = Image.open(out)
        # rows: context, 3 samples, their spread; as many columns as cameras (or the 2 context views)
        assert im.size == (pictures.LABEL + max(2, cols) * (SIZE + pictures.GAP), 5 * (SIZE + pictures.GAP) +
                           pictures.GAP)


def test_samples_differ_and_the_spread_is_their_standard_deviation(tmp_path):
    model, _ = load_model(make_checkpoint(tmp_path / "c.pt"))
    x, v = torch.rand(2, 3, SIZE, SIZE), cameras.look_at(3.0, torch.tensor([0.0, 1.5]), torch.tensor(0.2))
    v_q = cameras.look_at(3.0, torch.tensor([0.7, 2.5, 4.0]), torch.tensor(0.3))
    views = pictures.sample_views(model, x, v, v_q, samples=4, seed=5)
    assert views.shape == (4, 3, 3, SIZE, SIZE)
    assert torch.equal(views, pictures.sample_views(model, x, v, v_q, samples=4, seed=5))  # the same seed
    assert not torch.equal(views[0], views[1])  # z drawn anew for each sample
    sd = pictures.spread(views)
    want = (views.std(0, correction=0).mean(1) / pictures.SPREAD_WHITE).clamp(0, 1)
    assert torch.allclose(sd[:, 0], want) and torch.equal(sd[:, 0], sd[:, 2])
    assert torch.equal(pictures.spread(views[:1].expand(4, -1, -1, -1, -1)), torch.zeros_like(sd))


def test_bad_cameras_get_one_line(setup, capsys):
    tmp, ckpt, data = setup
    (tmp / "bad.txt").write_text("1 2 3\n")
    for argv, words in ((["--poses", str(tmp / "bad.txt")], "line 1: expected 7 or 5 finite numbers"),
                        (["--poses", str(tmp / "none.txt")], "cannot read"),
                        (["--yaw", "10", "--poses", str(tmp / "bad.txt")], "give one of them"),
                        (["--context_views", "0", "0"], "distinct views of 0..5"),
                        (["--context_views", "9"], "distinct views of 0..5")):
        with pytest.raises(SystemExit) as e:
            render.main(["--checkpoint", ckpt, "--data_dir", data, "--out", str(tmp / "x.png"), "--device", "cpu",
                         *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and words in err[0], err
