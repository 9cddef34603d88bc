"""Own scenes in: dataset/import_scenes.py (both layouts, bad inputs), write_split, and the camera model in shards."""
import csv
import json
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import main_error, run_script, script_error
import cameras
import gqn_dataset
from dataset import export_scenes, import_scenes, shepard_metzler as sm
from gqn_dataset import DatasetError, GQNDataset, write_shard

SCENES = 2  # per split: the round trips render 4 built-in scenes once


@pytest.fixture(scope="module")
def built_in():
    return export_scenes.originals(scenes=SCENES)


def tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def run_import(src, dst, *flags, capsys=None):
    """import_scenes.main in this process -> (exit status, stdout, stderr lines)."""
    try:
        import_scenes.main([str(src), str(dst), *flags])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def make_scene(folder, layout="csv", views=3, size=16, mode="RGB", fmt="png", fov=30.0):
    """A tiny scene: `views` coloured images and cameras on a ring around the origin, looking at it."""
    os.makedirs(folder)
    yaw = np.linspace(0, 2 * math.pi, views, endpoint=False) + 0.3
    pitch = np.full(views, 0.2)
    raw = np.concatenate([-2.0 * cameras.direction(yaw, pitch), yaw[:, None], pitch[:, None]], 1)
    files = []
    for j in range(views):
        image = np.full((size, size, len(mode)), 255, np.uint8)        # alpha, if any: opaque
        image[..., 0], image[:size // 4, :, 1 % len(mode)] = 40 * j, 200
        files.append(f"v{j}.{fmt}")
        Image.fromarray(image.squeeze(-1) if mode == "L" else image, mode).save(os.path.join(folder, files[-1]))
    if layout == "csv":
        write_csv(folder, files, raw)
    else:
        write_json(folder, {"camera_angle_x": math.radians(fov),
                            "frames": [{"file_path": f, "transform_matrix": m.tolist()}
                                       for f, m in zip(files, cameras.matrix(raw))]})
    return raw


def write_csv(folder, files, raw):
    with open(os.path.join(folder, "cameras.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(import_scenes.CSV_COLUMNS)
        w.writerows([name, *r] for name, r in zip(files, raw))


def write_json(folder, meta):
    with open(os.path.join(folder, "transforms.json"), "w") as f:
        json.dump(meta, f)


# ----------------------------------------------------------------------------------------------------------------
# Round trips of built-in scenes

@pytest.mark.parametrize("layout,image_format,up", [("csv", "png", "z"), ("transforms", "jpeg", "z"),
                                                    ("transforms", "png", "y")])
def test_round_trip_gives_the_same_cameras_and_pixels(built_in, tmp_path, capsys, layout, image_format, up):
    src, dst = tmp_path / "export", tmp_path / "imported"
    export_scenes.export(str(src), layout, built_in, image_format, up)
    flags = ["--fov", "20"] if layout == "csv" else ["--up", up]
    status, out, err = run_import(src, dst, *flags, capsys=capsys)
    assert status == 0 and err == [], err
    result = export_scenes.compare(str(dst), built_in)
    assert set(result) == {"train", "test"}
    for r in result.values():
        assert r["scenes"] == SCENES and r["pose_error"] < 1e-4
        if image_format == "jpeg":
            assert r["identical"] == r["views"] and r["pixel_error"] == 0    # JPEG sources: the same bytes
        else:
            assert r["pixel_error"] < 2                                      # PNG: encoded once
    ds = GQNDataset(dst / "train")
    assert ds.dataset == "export" and ds.views == sm.VIEWS and ds.image_size == sm.IMAGE_SIZE
    assert ds.fov == pytest.approx(20.0)
    m = import_scenes.margin(20.0)                        # cameras 10/3 from the point all of them look at
    assert (ds.near, ds.far) == pytest.approx(((1 - m) * sm.DISTANCE, (1 + m) * sm.DISTANCE), rel=1e-5)
    assert (GQNDataset(dst / "test").near, GQNDataset(dst / "test").far) == (ds.near, ds.far)
    assert "near = (1 - m) x the smallest" in out and "fov: 20 degrees" in out


def test_y_up_world_needs_up_y(built_in, tmp_path, capsys):
    one = {"train": built_in["train"]}
    export_scenes.export(str(tmp_path / "src"), "transforms", one, "jpeg", "y")
    assert run_import(tmp_path / "src", tmp_path / "as_z", capsys=capsys)[0] == 0
    assert export_scenes.compare(str(tmp_path / "as_z"), one)["train"]["pose_error"] > 0.1  # read as z up: wrong


def test_export_from_a_converted_folder_then_import_and_compare(tmp_path, capsys):
    data = tmp_path / "sm"
    sm.render_dataset(str(data), 1, 1, parts=3, progress=False)
    export_scenes.main(["--data_dir", str(data), "--scenes", "1", str(tmp_path / "src"), "--layout", "csv"])
    status, out, err = run_import(tmp_path / "src", tmp_path / "dst", "--fov", "20", "--near", "2.7", "--far", "4",
                                  capsys=capsys)
    assert status == 0 and "near/far: 2.7, 4 (--near/--far)" in out, err
    export_scenes.main(["--data_dir", str(data), "--scenes", "1", "--compare", str(tmp_path / "dst")])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("7-d poses differ by at most" in line for line in out)


# ----------------------------------------------------------------------------------------------------------------
# What the layouts allow

def test_transforms_fl_x_file_path_without_extension_and_white_background(tmp_path, capsys):
    for i in range(2):
        folder = tmp_path / "src" / f"s{i}"
        raw = make_scene(folder, "transforms", mode="RGBA")
        meta = json.load(open(folder / "transforms.json"))
        del meta["camera_angle_x"]
        meta.update(fl_x=8.0, w=16)                                  # fov 2 atan(16 / 16) = 90 degrees
        for frame in meta["frames"]:
            frame["file_path"] = "./" + frame["file_path"][:-4]       # NeRF's synthetic scenes: no extension
        write_json(folder, meta)
    image = np.array(Image.open(folder / "v1.png"))
    image[..., 3] = 0                                                  # one view fully transparent
    Image.fromarray(image).save(folder / "v1.png")
    status, out, err = run_import(tmp_path / "src", tmp_path / "dst", "--background", "white", capsys=capsys)
    assert status == 0 and err == [], err
    assert "6 with alpha over white" in out and "0 of 6 JPEG sources stored byte for byte" in out
    ds = GQNDataset(tmp_path / "dst" / "train")                        # 2 scenes, 1 of them for the test split
    assert ds.fov == pytest.approx(90.0) and len(ds) == 1 and len(GQNDataset(tmp_path / "dst" / "test")) == 1
    frames, v = GQNDataset(tmp_path / "dst" / "test").load(0, [0, 1])
    assert frames[1].float().mean() > 250                              # transparent -> white
    assert abs(frames[0, 1, :4].float().mean() - 200) < 4              # opaque pixels as they were
    np.testing.assert_allclose(v.numpy(), cameras.pose7(raw[:2]), atol=1e-6)


def test_image_size_crops_the_centre_square_and_adjusts_the_fov(tmp_path, capsys):
    for i in range(2):
        make_scene(tmp_path / "src" / "train" / f"s{i}", "transforms", size=16, fov=60.0)
    for j in range(3):                                                 # one scene of wide images
        Image.new("RGB", (32, 16), (0, 255, 0)).save(tmp_path / "src" / "train" / "s1" / f"v{j}.png")
    status, _, err = run_import(tmp_path / "src", tmp_path / "x", capsys=capsys)
    assert status == 1 and "s1/v0.png: 32x16 pixels, unlike" in err[0] and "--image_size" in err[0]
    make_scene(tmp_path / "src" / "train" / "s2", "transforms", size=32, fov=60.0)
    status, _, err = run_import(tmp_path / "src", tmp_path / "x", "--image_size", "8", capsys=capsys)
    assert status == 1 and "field of view" in err[0]                  # the wide ones' square sees less
    shutil.rmtree(tmp_path / "src" / "train" / "s1")
    status, out, err = run_import(tmp_path / "src", tmp_path / "dst", "--image_size", "8", capsys=capsys)
    assert status == 0 and err == [], err
    ds = GQNDataset(tmp_path / "dst" / "train")
    assert ds.image_size == 8 and ds.fov == pytest.approx(60.0)
    assert import_scenes.square_fov(60.0, (32, 16)) == pytest.approx(2 * math.degrees(math.atan(math.tan(
        math.radians(30)) / 2)))


def test_jpeg_sources_are_kept_byte_for_byte_and_fewer_than_two_views_skipped(tmp_path, capsys):
    for i in range(3):
        make_scene(tmp_path / "src" / f"s{i}", fmt="jpg")
    make_scene(tmp_path / "src" / "lonely", views=1)
    status, out, err = run_import(tmp_path / "src", tmp_path / "dst", "--test_fraction", "0.4", "--name", "mine",
                                  capsys=capsys)
    assert status == 0
    assert err == [f"warning: skipped 1 scene(s) with fewer than 2 views: {tmp_path / 'src' / 'lonely'} (1)"]
    assert "fov: not recorded" in out and "9 of 9 JPEG sources stored byte for byte" in out
    train, test = GQNDataset(tmp_path / "dst" / "train"), GQNDataset(tmp_path / "dst" / "test")
    assert (len(train), len(test), train.dataset, train.fov) == (2, 1, "mine", None)
    m = import_scenes.margin(None)
    assert (train.near, train.far) == pytest.approx(((1 - m) * 2, (1 + m) * 2))
    stored, _ = test.encoded(0)                                        # the test scene is the middle one, s1
    assert stored[2] == open(tmp_path / "src" / "s1" / "v2.jpg", "rb").read()


def test_rolled_cameras_are_reported_in_one_line(tmp_path, capsys):
    raws = []
    for i in range(2):
        folder = tmp_path / "src" / "train" / f"s{i}"
        raws.append(make_scene(folder, "transforms"))
        meta = json.load(open(folder / "transforms.json"))
        for k, angle in ((0, 5.0), (2, -12.5)):
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            m = np.array(meta["frames"][k]["transform_matrix"])
            m[:3, :3] = m[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])  # about the camera's axis
            meta["frames"][k]["transform_matrix"] = m.tolist()
        write_json(folder, meta)
    status, _, err = run_import(tmp_path / "src", tmp_path / "dst", capsys=capsys)
    assert status == 0 and len(err) == 1, err
    assert err[0].startswith("warning: 4 of 6 views have a rolled camera (largest 12.50 degrees") and "v2.png" in err[0]
    v = GQNDataset(tmp_path / "dst" / "train")[1][1]
    np.testing.assert_allclose(v.numpy(), cameras.pose7(raws[1]), atol=1e-6)  # stored unrolled


# ----------------------------------------------------------------------------------------------------------------
# The format and write_split

def test_old_shards_load_without_a_camera_model_and_shards_must_agree(tmp_path):
    jpeg = gqn_dataset.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    cams = np.zeros((1, 2, 7), np.float32)
    write_shard(str(tmp_path / "old" / "001-of-001.pt"), [[jpeg] * 2], cams, "mine", 8)
    shard = torch.load(tmp_path / "old" / "001-of-001.pt", weights_only=True)
    assert not {"fov", "near", "far"} & set(shard)                    # as shards written before these keys
    ds = GQNDataset(tmp_path / "old")
    assert (ds.fov, ds.near, ds.far) == (None, None, None) and len(ds) == 1
    write_shard(str(tmp_path / "new" / "001-of-002.pt"), [[jpeg] * 2], cams, "mine", 8, {"fov": 30, "near": 1})
    ds = GQNDataset(tmp_path / "new")
    assert (ds.fov, ds.near, ds.far) == (30.0, 1.0, None)
    write_shard(str(tmp_path / "new" / "002-of-002.pt"), [[jpeg] * 2], cams, "mine", 8, {"fov": 40})
    with pytest.raises(DatasetError, match="002-of-002.pt: records fov, near, far"):
        GQNDataset(tmp_path / "new")
    with pytest.raises(DatasetError, match="need near < far"):
        write_shard(str(tmp_path / "x.pt"), [[jpeg] * 2], cams, "mine", 8, {"near": 2, "far": 1})


def test_legacy_folder_has_no_camera_model(fixtures_dir):
    ds = GQNDataset(os.path.join(fixtures_dir, "legacy-pt-gz", "shepard_metzler_5_parts-torch", "train"))
    assert (ds.fov, ds.near, ds.far) == (None, None, None)


def test_built_in_renderer_records_its_camera(tmp_path):
    sm.render_dataset(str(tmp_path), 1, 0, parts=3, progress=False)
    ds = GQNDataset(tmp_path / "train")
    assert ds.fov == 20.0 and (ds.near, ds.far) == pytest.approx((10 / 3 - 0.63, 10 / 3 + 0.63), abs=0.005)


def test_write_split_from_arrays_and_matrices(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)
    raw = np.stack([make_ring(4) for _ in range(3)])
    paths = import_scenes.write_split(str(tmp_path / "a"), frames, cameras.matrix(raw), "mine", fov=45,
                                      scenes_per_shard=2)
    assert [os.path.basename(p) for p in paths] == ["001-of-002.pt", "002-of-002.pt"]
    ds = GQNDataset(tmp_path / "a")
    assert (len(ds), ds.views, ds.image_size, ds.fov) == (3, 4, 16, 45.0) and ds.near < 3 < ds.far
    np.testing.assert_allclose(ds[2][1].numpy(), cameras.pose7(raw[2]), atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["a"]                       # no partial folder left
    jpegs = [ds.encoded(i)[0] for i in range(3)]                      # JPEG bytes go in as they are
    import_scenes.write_split(str(tmp_path / "b"), iter(jpegs), raw, "mine", near=1, far=5)
    assert [GQNDataset(tmp_path / "b").encoded(i)[0] for i in range(3)] == jpegs
    with pytest.raises(DatasetError, match="not an empty folder"):
        import_scenes.write_split(str(tmp_path / "b"), jpegs, raw, "mine")
    rolled = cameras.matrix(raw)
    rolled[0, 0, :3, :2] *= -1                                         # image upside down: roll 180 degrees
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import_scenes.write_split(str(tmp_path / "c"), frames, rolled, "mine")
    assert len(w) == 1 and "1 of 12 views have a rolled camera (largest 180.00 degrees)" in str(w[0].message)
    bad = raw.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(DatasetError, match="scene 1 view 2: camera is not finite"):
        import_scenes.write_split(str(tmp_path / "d"), frames, bad, "mine")
    with pytest.raises(DatasetError, match="scene 0 view 0: 8x16 pixels"):
        import_scenes.write_split(str(tmp_path / "d"), frames[..., :8, :], raw, "mine")
    assert not os.path.exists(tmp_path / "d")


def make_ring(views):
    yaw = np.linspace(0, 2 * math.pi, views, endpoint=False)
    return np.concatenate([-3 * cameras.direction(yaw, 0 * yaw), yaw[:, None], 0 * yaw[:, None]], 1)


def test_write_split_docstring_example(tmp_path, monkeypatch):
    example = import_scenes.write_split.__doc__.split("\n\n")[-1]
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(line[8:] for line in example.splitlines()), "example", "exec"), {})
    assert len(GQNDataset("data/mine/train")) == 10 and GQNDataset("data/mine/train").fov == 30


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file at fault, exit status 1, DST as it was

def break_missing(src):
    os.unlink(src / "train" / "b" / "v1.png")
    return "b/v1.png: missing"


def break_unreadable(src):
    (src / "train" / "b" / "v1.png").write_bytes(b"not a picture")
    return "b/v1.png: unreadable image"


def break_truncated(src):
    data = (src / "train" / "b" / "v1.png").read_bytes()
    (src / "train" / "b" / "v1.png").write_bytes(data[:len(data) // 2])
    return "b/v1.png: unreadable image"


def break_view_count(src):
    shutil.rmtree(src / "test" / "c")
    make_scene(src / "test" / "c", views=4)
    return "test/c: 4 views, unlike"


def break_size(src):
    Image.new("RGB", (20, 20)).save(src / "test" / "c" / "v2.png")
    return "test/c/v2.png: 20x20 pixels, unlike"


def break_csv_number(src):
    text = (src / "train" / "b" / "cameras.csv").read_text().splitlines()
    text[2] = text[2].replace(text[2].split(",")[4], "north")
    (src / "train" / "b" / "cameras.csv").write_text("\n".join(text))
    return "b/cameras.csv: line 3: yaw 'north' is not a number"


def break_csv_columns(src):
    (src / "train" / "b" / "cameras.csv").write_text("file,x,y,z,yaw\nv0.png,1,2,3,4\n")
    return "b/cameras.csv: no column pitch"


def break_csv_nan(src):
    text = (src / "train" / "b" / "cameras.csv").read_text().replace(",0.2", ",nan", 1)
    (src / "train" / "b" / "cameras.csv").write_text(text)
    return "b/cameras.csv: line 2 (v0.png): camera is not finite"


def break_json(src):
    text = (src / "train" / "a" / "transforms.json").read_text()
    (src / "train" / "a" / "transforms.json").write_text(text[:-5])
    return "a/transforms.json: not valid JSON"


def break_json_matrix(src):
    meta = json.load(open(src / "train" / "a" / "transforms.json"))
    meta["frames"][1]["transform_matrix"][0][3] = float("inf")
    write_json(src / "train" / "a", meta)
    return "a/transforms.json: frame 1 (v1.png): camera is not finite"


def break_json_shape(src):
    meta = json.load(open(src / "train" / "a" / "transforms.json"))
    meta["frames"][0]["transform_matrix"] = [[1, 0, 0]]
    write_json(src / "train" / "a", meta)
    return "a/transforms.json: frame 0 (v0.png): transform_matrix is 1x3, expected 4x4"


def break_no_layout(src):
    os.unlink(src / "test" / "c" / "cameras.csv")
    return "test/c: no cameras.csv or transforms.json"


@pytest.mark.parametrize("damage", [break_missing, break_unreadable, break_truncated, break_view_count, break_size,
                                    break_csv_number, break_csv_columns, break_csv_nan, break_json,
                                    break_json_matrix, break_json_shape, break_no_layout])
def test_bad_input_one_line_and_dst_unchanged(tmp_path, capsys, damage):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_scene(src / "train" / "a", "transforms")
    make_scene(src / "train" / "b")
    make_scene(src / "test" / "c")
    (dst / "notes").mkdir(parents=True)
    (dst / "notes" / "keep.txt").write_text("mine")
    words = damage(src)
    main_error(import_scenes.main, [str(src), str(dst)], capsys, words)
    assert tree(dst) == {os.path.join("notes", "keep.txt"): b"mine"}
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]              # no partial folder beside DST


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    for name in "abc":                                                 # three scenes: a, c train, b test
        make_scene(tmp_path / "src" / name)
    broken = tmp_path / "src" / "c" / "v1.png"                         # found when its pixels are read, in a worker
    broken.write_bytes(broken.read_bytes()[:60])
    p = run_script("dataset/import_scenes.py", tmp_path / "src", tmp_path / "dst", "--workers", "2", "--test_fraction",
                   "0.3")
    assert script_error(p).startswith(f"error: {broken}: unreadable image (")
    assert sorted(os.listdir(tmp_path)) == ["src"]                     # scene a was written, then taken back


@pytest.mark.parametrize("setup,flags,words", [
    (lambda src: None, ["--test_fraction", "1"], "--test_fraction: expected a number in [0, 1)"),
    (lambda src: None, ["--near", "2"], "--near and --far: give both"),
    (lambda src: os.makedirs(src / "train"), ["--test_fraction", "0.5"], "is split already"),
    (lambda src: os.makedirs(src / "test"), [], "holds no scene folders"),
    (lambda src: [(src / "a" / f).rename(src / f) for f in os.listdir(src / "a")], [], "is one scene"),
])
def test_bad_flags_and_folders(tmp_path, capsys, setup, flags, words):
    make_scene(tmp_path / "src" / "a")
    setup(tmp_path / "src")
    status, _, err = run_import(tmp_path / "src", tmp_path / "dst", *flags, capsys=capsys)
    assert status == 1 and len(err) == 1 and words in err[0], err
    assert not os.path.exists(tmp_path / "dst")


def test_existing_split_is_not_overwritten(tmp_path, capsys):
    make_scene(tmp_path / "src" / "a")
    make_scene(tmp_path / "src" / "b")
    (tmp_path / "dst" / "test").mkdir(parents=True)
    status, _, err = run_import(tmp_path / "src", tmp_path / "dst", capsys=capsys)
    assert status == 1 and "dst/test already exists" in err[0]
    assert os.listdir(tmp_path / "dst") == ["test"]
