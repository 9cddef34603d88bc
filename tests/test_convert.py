"""dataset/convert2torch.py and dataset/tfrecord.py: TFRecords to the converted format, without TensorFlow."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset import convert2torch
from dataset.tfrecord import (TFRecordError, make_example, masked_crc, parse_example, read_records,
                              write_records)
from conftest import ROOT, main_error, run_script, script_error
from gqn_dataset import GQNDataset

SM5 = "shepard_metzler_5_parts"


@pytest.fixture
def src(fixtures_dir, tmp_path):
    """A writable copy of the fixture TFRecords (SRC_ROOT layout) that tests may damage."""
    root = tmp_path / "src"
    for split in ("train", "test"):
        (root / SM5 / split).mkdir(parents=True)
        for f in os.listdir(os.path.join(fixtures_dir, "gqn-tfrecord", SM5, split)):
            if f.endswith(".tfrecord"):
                shutil.copy(os.path.join(fixtures_dir, "gqn-tfrecord", SM5, split, f), root / SM5 / split / f)
    return root


def _run(args, capsys):
    """main() in-process -> (exit status, stderr)."""
    try:
        convert2torch.main([str(a) for a in args])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def test_records_and_crcs(fixtures_dir, tmp_path):
    path = os.path.join(fixtures_dir, "gqn-tfrecord", SM5, "train", "001-of-900.tfrecord")
    records = list(read_records(path))
    assert len(records) == 2
    features = parse_example(records[0])
    assert len(features["frames"]) == 15 and len(features["cameras"]) == 75
    assert features["frames"][0][:2] == b"\xff\xd8"  # JPEG
    copy = tmp_path / "copy.tfrecord"
    write_records(copy, records)
    assert copy.read_bytes() == open(path, "rb").read()  # same framing and CRCs as TensorFlow's writer
    assert parse_example(make_example(features)) == features
    assert masked_crc(b"") == 0xA282EAD8  # CRC32C("") = 0, plus TFRecord's mask delta


def test_convert_matches_tensorflow_and_is_idempotent(src, tmp_path, fixtures_dir, capsys):
    dst = tmp_path / "dst"
    status, err = _run([src, dst, "--workers", "2"], capsys)
    assert status == 0 and "converted 2 shards (3 scenes)" in err
    for split, name in (("train", "001-of-900"), ("test", "001-of-100")):
        z = np.load(os.path.join(fixtures_dir, "gqn-tfrecord", SM5, split, name + ".expected.npz"))
        ds = GQNDataset(dst / SM5 / split)
        assert len(ds) == len(z["frames"]) and os.path.exists(dst / SM5 / split / (name + ".pt"))
        for i in range(len(ds)):
            x, v = ds[i]
            np.testing.assert_array_equal(x[z["views"]].permute(0, 2, 3, 1).numpy(), z["frames"][i])
            np.testing.assert_allclose(v.numpy(), z["cameras"][i], atol=1e-6)
    shard = dst / SM5 / "train" / "001-of-900.pt"
    before = shard.stat().st_mtime_ns
    stale = dst / SM5 / "train" / ".tmp-killed.pt"  # what a kill -9 during write_shard leaves
    stale.write_bytes(b"half a shard")
    status, err = _run([src, dst], capsys)
    assert not stale.exists()
    assert status == 0 and "converted 0 shards" in err and "skipped 2" in err
    assert shard.stat().st_mtime_ns == before


def _damage(path, how):
    data = bytearray(path.read_bytes())
    second = 12 + int.from_bytes(data[:8], "little") + 4  # offset of record 1
    if how == "flip":
        data[second + 12 + 100] ^= 0x01  # a byte inside record 1's data
    elif how == "truncate":
        data = data[:second + 500]
    elif how == "length":
        data[second] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,what", [("flip", "corrupt data (CRC32C mismatch)"),
                                      ("truncate", "truncated"),
                                      ("length", "corrupt length field (CRC32C mismatch)")])
def test_damaged_shard_is_named_and_others_convert(src, tmp_path, capsys, how, what):
    bad = src / SM5 / "train" / "001-of-900.tfrecord"
    _damage(bad, how)
    dst = tmp_path / "dst"
    status, err = _run([src, dst, "--workers", "1"], capsys)
    assert status == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: record 1: {what}")
    assert "1 failed" in err
    assert len(GQNDataset(dst / SM5 / "test")) == 1  # the healthy shard still converted
    assert not (dst / SM5 / "train").exists() or not os.listdir(dst / SM5 / "train")  # nothing half-written
    with pytest.raises(TFRecordError, match="record 1"):
        list(read_records(bad))


def test_wrong_schema_and_unknown_folder(src, tmp_path, capsys):
    write_records(src / SM5 / "test" / "001-of-100.tfrecord",
                  [make_example({"frames": [b"x"] * 14, "cameras": [0.0] * 70})])
    (src / "my_scenes" / "train").mkdir(parents=True)
    status, err = _run([src, tmp_path / "dst"], capsys)
    assert status == 1
    assert "record 0: expected 15 frames and 75 camera values for shepard_metzler_5_parts, found 14 and 70" in err
    assert f"{src / 'my_scenes'}: not a gqn-datasets name" in err
    assert (tmp_path / "dst" / SM5 / "train" / "001-of-900.pt").exists()


def test_datasets_filter(src, tmp_path, capsys):
    status, err = _run([src, tmp_path / "dst", "--datasets", "jaco"], capsys)
    assert status == 1 and err.strip().startswith("error: --datasets: no folder")
    status, err = _run([src, tmp_path / "dst", "--datasets", SM5, "--workers", "1"], capsys)
    assert status == 0


@pytest.mark.parametrize("args,what", [(["{tmp}/nope", "{tmp}/dst"], "SRC_ROOT {tmp}/nope is not a folder"),
                                       (["{src}", "{tmp}/dst", "--datasets", "lego"], "unknown data set 'lego'"),
                                       (["{src}", "{tmp}/dst", "--workers", "0"], "--workers: expected a positive integer, got '0'"),
                                       (["{src}/" + SM5, "{tmp}/dst"], "is a data set folder"),
                                       (["{src}", "{tmp}/dst", "--bogus"], "unrecognized arguments: --bogus")])
def test_bad_command_lines(src, tmp_path, capsys, args, what):
    args = [a.format(tmp=tmp_path, src=src) for a in args]
    main_error(convert2torch.main, args, capsys, what.format(tmp=tmp_path))


def test_cli_without_tensorflow(src, tmp_path):
    """The script runs as the README says, imports no TensorFlow/TensorBoard, and fails without a traceback."""
    # as `python dataset/convert2torch.py` runs it: the script's folder first on sys.path
    code = ("import runpy, sys; sys.argv = ['convert2torch.py'] + sys.argv[1:]; sys.path[0] = 'dataset'\n"
            "try:\n    runpy.run_path('dataset/convert2torch.py', run_name='__main__')\n"
            "finally:\n    assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorboard')]")
    ok = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "dst"), "--workers", "1"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = run_script("dataset/convert2torch.py", tmp_path / "nope", tmp_path, cwd=ROOT)
    assert script_error(bad) == f"error: SRC_ROOT {tmp_path / 'nope'} is not a folder"
    assert torch.load(tmp_path / "dst" / SM5 / "test" / "001-of-100.pt", weights_only=True)["views"] == 15


def test_the_default_job_and_deepminds_data_stay_apart_and_a_mixed_folder_is_refused(src, tmp_path, monkeypatch,
                                                                                         capsys):
    """The default job renders into data/builtin/<name>; the README's conversion writes DeepMind's shards of the same
    name to data/<name>. A folder that holds both is refused in one line naming both, by the reader and by the
    converter, never read as one data set."""
    import config
    import train
    from conftest import tiny_default_job
    from gqn_dataset import DatasetError

    tiny_default_job(monkeypatch, tmp_path)
    monkeypatch.setattr(config, "BUILTIN_DATA", dict(parts=5, train_scenes=6, test_scenes=2, seed=0, workers=1))
    train.main([])  # the default job, in tmp_path
    status, _ = _run([src, tmp_path / "data"], capsys)  # the README's conversion, into data/
    assert status == 0
    builtin, deepmind = tmp_path / "data" / "builtin" / SM5, tmp_path / "data" / SM5
    assert len(GQNDataset(builtin / "train")) == 6 and GQNDataset(builtin / "train").source == "renderer"
    assert len(GQNDataset(deepmind / "train")) == 2 and GQNDataset(deepmind / "train").source == "gqn-datasets"

    mixed = tmp_path / "mixed"
    shutil.copytree(deepmind / "train", mixed)
    shutil.copy(builtin / "train" / "001-of-001.pt", mixed / "002-of-900.pt")
    with pytest.raises(DatasetError) as e:
        GQNDataset(mixed)
    message = str(e.value)
    assert "\n" not in message and "holds two data sets" in message
    assert "DeepMind's gqn-datasets" in message and "the built-in renderer" in message
    # converting into a folder of the renderer's shards: refused before anything is written
    target = tmp_path / "target"
    shutil.copytree(builtin, target / SM5)
    before = sorted(p.name for p in (target / SM5 / "train").iterdir())
    status, err = _run([src, target], capsys)
    assert status == 1 and err.count("\n") == 1 and "holds another data set of the same name" in err
    assert "the built-in renderer" in err and sorted(p.name for p in (target / SM5 / "train").iterdir()) == before
