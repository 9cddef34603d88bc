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


def blocks_of(panels):
    """panel_blocks without the pixels: [(headings' texts, [(row label, tiles)])]."""
    return [([text for _, text in headings], [(label, len(tiles)) for label, tiles in rows])
            for headings, rows in pictures.panel_blocks(panels)]


def test_png_has_a_block_each_for_the_context_the_new_cameras_and_the_held_out_views(setup, tmp_path):
    tmp, ckpt, data = setup
    out = tmp / "out" / "scene.png"
    render.main(["--checkpoint", ckpt, "--data_dir", data, "--scene", "1", "--out", str(out),
                 "--views", "4", "--context", "2", "--scale", "1", "--device", "cpu"])
    assert [p.name for p in out.parent.iterdir()] == ["scene.png"]  # no temp file left
    model, _ = load_model(ckpt)
    ds = render.open_split(data, "--data_dir")
    frames, cams = ds[1]
    panels = pictures.novel_views(model, frames, cams, [5, 2], n_ring=4, seed=0)
    yaw0 = round(math.degrees(cameras.angles(cams[5])[0].item()))
    blocks = blocks_of(panels)
    assert blocks[0] == (["view 5", "view 2"], [("context", 2)])  # headed by the views' indices, not the ring's
    assert blocks[1][0][0] == f"yaw {yaw0}°" and blocks[1][1] == [("new cameras", 4)]
    assert blocks[2] == (["view 0", "view 1", "view 3", "view 4"], [("truth", 4), ("model", 4)])
    with Image.open(out) as im:
        assert im.size == pictures.panels_grid(render_panels(ckpt, data), 1).size


def render_panels(ckpt, data):
    model, _ = load_model(ckpt)
    frames, cams = render.open_split(data, "--data_dir")[1]
    return pictures.novel_views(model, frames, cams, [5, 2], n_ring=4, seed=0)


def test_held_out_views_with_draws_show_their_spread_beside_the_error_of_their_mean(setup):
    tmp, ckpt, data = setup
    model, _ = load_model(ckpt)
    frames, cams = render.open_split(data, "--data_dir")[0]
    panels = pictures.novel_views(model, frames, cams, [0, 1], n_ring=3, samples=4, seed=0)
    rows = blocks_of(panels)[2][1]
    assert rows == [("truth", 4)] + [(f"draw {k}", 4) for k in (1, 2, 3, 4)] + [("spread", 4), ("error", 4)]
    err = pictures.panel_blocks(panels)[2][1][-1][1]
    want = pictures.error(panels["model"].mean(0), panels["truth"])
    assert all(torch.equal(a, b) for a, b in zip(err, want))
    im = pictures.panels_grid(panels, 2)
    font = pictures.font(pictures.LABEL_FONT * 2)
    assert im.width >= font.getlength("context") + 4 * (2 * SIZE)  # the longest label fits its column


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
        model, _ = load_model(ckpt)
        frames, cams = render.open_split(data, "--data_dir")[0]
        args = render.parse_args(["--checkpoint", ckpt, "--data_dir", data, "--out", str(out), *argv])
        panels = pictures.novel_views(model, frames, cams, [0, 4], samples=3, queries=render.query_poses(args, cams))
        # the draws of z are rows of their own, never "novel 1, 2, 3": a row a draw, their spread; no truth
        assert blocks_of(panels)[1][1] == [("draw 1", cols), ("draw 2", cols), ("draw 3", cols), ("spread", cols)]
        assert len(blocks_of(panels)) == 2


def test_samples_differ_and_the_spread_is_their_standard_deviation(tmp_path):
    model, _ = load_model(make_checkpoint(tmp_path / "c.pt"))
    x, v = torch.rand(2, 3, SIZE, SIZE), cameras.look_at(3.0, torch.tensor([0.0, 1.5]), torch.tensor(0.2))
    v_q = cameras.look_at(3.0, torch.tensor([0.7, 2.5, 4.0]), torch.tensor(0.3))
    views = pictures.sample_views(model, x, v, v_q, samples=4, seed=5)
    assert views.shape == (4, 3, 3, SIZE, SIZE)
    assert torch.equal(views, pictures.sample_views(model, x, v, v_q, samples=4, seed=5))  # the same seed
    assert not torch.equal(views[0], views[1])  # z drawn anew for each sample
    sd = pictures.spread(views)
    want = (views.var(0, correction=0).mean(1).sqrt() / pictures.SPREAD_WHITE).clamp(0, 1)
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


def test_chosen_held_out_views_without_a_ring(setup, capsys):
    tmp, ckpt, data = setup
    out = tmp / "held.png"
    render.main(["--checkpoint", ckpt, "--data_dir", data, "--out", str(out), "--context_views", "0",
                 "--query_views", "2", "5", "--views", "0", "--samples", "2", "--scale", "1", "--device", "cpu"])
    model, _ = load_model(ckpt)
    frames, cams = render.open_split(data, "--data_dir")[0]
    panels = pictures.novel_views(model, frames, cams, [0], 0, samples=2, held=[2, 5])
    assert panels["held_ids"] == [2, 5] and panels["ring"].shape[1] == 0
    blocks = blocks_of(panels)
    assert len(blocks) == 2 and blocks[1][0] == ["view 2", "view 5"]  # context, then only the views asked for
    with pytest.raises(SystemExit) as e:
        render.main(["--checkpoint", ckpt, "--data_dir", data, "--out", str(out), "--context_views", "0",
                     "--query_views", "0", "--device", "cpu"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().startswith("error: --query_views 0: need views of 0..")
