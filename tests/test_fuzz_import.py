"""Fuzzing the importer's cameras.csv and transforms.json readers (dataset/import_scenes.py scan_scene, then
check_scenes and depth_range on what it read): mutated and hostile files give finite cameras and fields of view,
or one DatasetError line naming the scene's file (tests/fuzzing.py)."""
import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st
from PIL import Image

import cameras
from dataset.import_scenes import check_scenes, depth_range, scan_scene
from fuzzing import mutated, put, run_reader, scratch, share

VIEWS = 3
FILES = [f"v{j}.png" for j in range(VIEWS)]
YAW = np.linspace(0, 2 * math.pi, VIEWS, endpoint=False) + 0.3
RAW = np.concatenate([-2.0 * cameras.direction(YAW, np.full(VIEWS, 0.2)), YAW[:, None], np.full((VIEWS, 1), 0.2)], 1)


def _png(j):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 50 * j, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNGS = [_png(j) for j in range(VIEWS)]
CSV = ("file,x,y,z,yaw,pitch\n" + "".join(f"{f},{','.join(map(repr, r.tolist()))}\n" for f, r in zip(FILES, RAW))).encode()
META = {"camera_angle_x": 0.6, "frames": [{"file_path": f, "transform_matrix": m.tolist()}
                                          for f, m in zip(FILES, cameras.matrix(RAW))]}
JSON = json.dumps(META).encode()


def scan(name, data, up="z", fov=30.0):
    """scan_scene on a scene folder holding the images and `data` as `name` -> (scene, depth range), or the error."""
    with scratch() as folder:
        for f, png in zip(FILES, PNGS):
            put(folder, f, png)
        put(folder, name, data)

        def read():
            scene = scan_scene(folder, up, fov)
            if len(scene["files"]) < 2:
                return scene, None
            check_scenes([scene], None)
            return scene, depth_range([scene["raw"]], scene["fovs"][0])
        return run_reader(read, folder, len(data) + sum(map(len, PNGS)))


def check(result):
    scene, depths = result
    raw, roll, fovs = scene["raw"], scene["roll"], scene["fovs"]
    assert raw.shape == (len(scene["files"]), 5) and np.isfinite(raw).all()
    assert roll is None or np.isfinite(roll).all()
    if len(scene["files"]) >= 2:
        assert all(f is None or 0 < f < 180 for f in fovs)
        assert depths is None or (math.isfinite(depths[1]) and 0 < depths[0] < depths[1])


def test_the_valid_files_read():
    for name, data in (("cameras.csv", CSV), ("transforms.json", JSON)):
        result, error = scan(name, data)
        assert error is None, error
        check(result)
        np.testing.assert_allclose(cameras.pose7(result[0]["raw"]), cameras.pose7(RAW), atol=1e-6)


@share(0.5)
@given(st.sampled_from([("cameras.csv", CSV), ("transforms.json", JSON)]).flatmap(
    lambda f: st.tuples(st.just(f[0]), mutated(f[1]))))
def test_mutated_files_read_or_are_refused(file):
    result, error = scan(*file)
    if error is None:
        check(result)


# Cells and JSON values a hostile scene may hold: numbers beyond float64, NaN, infinities, wrong types, odd names.
NUMBERS = st.one_of(st.floats(), st.integers(), st.sampled_from([10**400, -10**400, 1e308, 5e-324, 0, True]))
NAMES = st.one_of(st.sampled_from(FILES + ["", "missing.png", "../v0.png", "/dev/zero", "v0.png\nx", ".",
                                           "cameras.csv", "transforms.json", "v0"]), st.text(max_size=8))
CELLS = st.one_of(NUMBERS.map(str), st.text(max_size=6), st.sampled_from(["nan", "-inf", "1e400", "1_0", ""]))


@st.composite
def csv_files(draw):
    """A header (usually right) and rows of hostile cells, joined by commas as a careless writer would."""
    header = draw(st.one_of(st.just("file,x,y,z,yaw,pitch"), st.lists(CELLS, max_size=7).map(",".join)))
    rows = draw(st.lists(st.tuples(NAMES, st.lists(st.one_of(CELLS, NUMBERS.map(repr)), max_size=6)), max_size=5))
    return "\n".join([header] + [",".join([f, *cells]) for f, cells in rows]).encode("utf-8", "surrogatepass")


JSON_VALUES = st.recursive(st.one_of(st.none(), NUMBERS, st.text(max_size=5)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=10)


@st.composite
def matrices(draw):
    """A camera's matrix, often valid, or with a hostile element, a zero axis, another shape, or any JSON value."""
    m = cameras.matrix(RAW[draw(st.integers(0, VIEWS - 1))]).tolist()
    kind = draw(st.sampled_from(["valid", "element", "zero axis", "3x4", "shape", "any"]))
    if kind == "element":
        m[draw(st.integers(0, 3))][draw(st.integers(0, 3))] = draw(st.one_of(NUMBERS, JSON_VALUES))
    elif kind == "zero axis":
        for row in m[:3]:
            row[draw(st.integers(0, 2))] = 0.0 if draw(st.booleans()) else 1e308
    elif kind == "3x4":
        m = m[:3]
    elif kind == "shape":
        m = m[:draw(st.integers(0, 4))] if draw(st.booleans()) else [r[:draw(st.integers(0, 4))] for r in m]
    elif kind == "any":
        m = draw(JSON_VALUES)
    return m


@st.composite
def json_files(draw):
    """transforms.json with hostile intrinsics and frames, or any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return json.dumps(draw(JSON_VALUES)).encode()
    meta = {k: draw(NUMBERS | JSON_VALUES) for k in draw(st.sets(st.sampled_from(["camera_angle_x", "fl_x", "w"])))}
    meta["frames"] = [{"file_path": draw(NAMES), "transform_matrix": draw(matrices()),
                       **{k: draw(NUMBERS) for k in draw(st.sets(st.sampled_from(["fl_x", "w", "camera_angle_x"])))}}
                      for _ in range(draw(st.integers(0, 4)))]
    return json.dumps(meta).encode()


@share(0.5)
@given(st.one_of(st.tuples(st.just("cameras.csv"), csv_files()), st.tuples(st.just("transforms.json"), json_files())),
       st.sampled_from(["z", "y"]))
def test_hostile_files_read_or_are_refused(file, up):
    result, error = scan(*file, up=up)
    if error is None:
        check(result)


M = cameras.matrix(RAW).tolist()
FRAMES = [{"file_path": f, "transform_matrix": m} for f, m in zip(FILES, M)]
BAD = {"nested": b"[" * 100000 + b"]" * 100000,
       "big int": json.dumps({"frames": [{**FRAMES[0], "transform_matrix": [[10**400] * 4] * 4}]}).encode(),
       "big angle": json.dumps({"camera_angle_x": 10**400, "frames": FRAMES}).encode(),
       "zero axis": json.dumps({"frames": [{**f, "transform_matrix": [[0.0] * 4] * 4} for f in FRAMES]}).encode(),
       "wide angle": json.dumps({"camera_angle_x": 3.2, "frames": FRAMES}).encode(),
       "newline": json.dumps({"frames": [{**f, "file_path": "v\n" + f["file_path"]} for f in FRAMES]}).encode()}


@pytest.mark.parametrize("what", sorted(BAD))
def test_regressions_are_refused_in_one_line(what):
    """Found by the fuzzing above: JSON nested 100000 deep (RecursionError), an integer beyond float64 in a matrix
    or as camera_angle_x (OverflowError), a zero axis (NaN cameras, no error), a camera_angle_x of pi or more (a
    field of view of 180 degrees and more), a file name holding a newline (a message of two lines)."""
    _, error = scan("transforms.json", BAD[what])
    assert error is not None


def test_3x4_and_4x4_matrices_in_one_file_read():
    """Regression: np.stack of a 3x4 and a 4x4 matrix raised ValueError; both forms are read, so both together."""
    frames = [{**f, "transform_matrix": f["transform_matrix"][:3] if j else f["transform_matrix"]}
              for j, f in enumerate(FRAMES)]
    result, error = scan("transforms.json", json.dumps({"camera_angle_x": 0.6, "frames": frames}).encode())
    assert error is None, error
    np.testing.assert_allclose(cameras.pose7(result[0]["raw"]), cameras.pose7(RAW), atol=1e-6)
