"""train.py on a data set of one's own: it trains under its own name, K comes from --max_context or half its views,
and --representation volume takes the camera model (fov, near, far) the data records unless flags say otherwise."""
import json
import os

import numpy as np
import pytest

import train
from conftest import args, weights
from dataset.import_scenes import write_split
from gqn_dataset import GQNDataset


@pytest.fixture(scope="module")
def mine(data, tmp_path_factory):  # noqa: F811
    """The test renderer's scenes written again through write_split, as a user's own data set `my_scenes`."""
    out = tmp_path_factory.mktemp("own") / "my_scenes"
    for split, folder in zip(("train", "test"), data):
        ds = GQNDataset(folder)
        frames, poses = zip(*(ds.encoded(i) for i in range(len(ds))))
        poses = np.stack(poses)
        raw = np.concatenate([poses[..., :3], np.arctan2(poses[..., 3:4], poses[..., 4:5]),
                              np.arctan2(poses[..., 5:6], poses[..., 6:7])], -1)  # x, y, z, yaw, pitch
        write_split(str(out / split), [list(f) for f in frames], raw, "my_scenes", fov=20.0, near=2.5, far=4.2)
    return str(out / "train"), str(out / "test")


def test_own_data_trains_under_its_name_with_k_from_its_views(mine, tmp_path, capsys):
    train.main(args(mine, tmp_path, "own", 2))
    out = capsys.readouterr().out
    assert "K=7: half of its 15 views per scene (--max_context sets it)" in out
    ckpt = weights(tmp_path / "own")
    assert ckpt["step"] == 2 and ckpt["config"]["dataset"] == "my_scenes" and ckpt["data"]["max_context"] == 7
    train.main(args(mine, tmp_path, "own5", 2, "--max_context", "5"))
    assert "K=5: --max_context" in capsys.readouterr().out


def test_volume_takes_the_camera_model_from_the_data_unless_given(mine, tmp_path, capsys):
    train.main(args(mine, tmp_path, "vol", 2, "--representation", "volume"))
    out = capsys.readouterr().out
    assert "from the data's camera model: fov=20  near=2.5  far=4.2" in out
    with open(tmp_path / "vol" / "config.json") as f:
        cfg = json.load(f)
    assert (cfg["fov"], cfg["near"], cfg["far"]) == (20.0, 2.5, 4.2)
    assert {k: weights(tmp_path / "vol")["model_config"][k] for k in ("fov", "near", "far")} == \
        {"fov": 20.0, "near": 2.5, "far": 4.2}
    train.main(args(mine, tmp_path, "flag", 2, "--representation", "volume", "--near", "3"))
    out = capsys.readouterr().out
    assert "fov=20  far=4.2" in out and "near=" not in out.split("camera model:")[1].splitlines()[0]
    assert weights(tmp_path / "flag")["model_config"]["near"] == 3.0
    # a flag that does not fit the data's range is refused in one line, like any bad flag
    with pytest.raises(SystemExit) as e:
        train.main(args(mine, tmp_path, "bad", 2, "--representation", "volume", "--near", "5"))
    assert e.value.code == 1 and "--near 5.0 and --far 4.2: need 0 < near < far" in capsys.readouterr().err


def test_builtin_renderer_records_its_camera_model(data):  # noqa: F811
    ds = GQNDataset(data[0])
    assert ds.fov == 20.0 and ds.near == pytest.approx(10 / 3 - 0.63, abs=1e-3)
    assert ds.far == pytest.approx(10 / 3 + 0.63, abs=1e-3)
    assert os.path.basename(os.path.dirname(data[0])) == ds.dataset
