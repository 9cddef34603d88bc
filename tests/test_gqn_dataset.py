"""The converted format, GQNDataset (converted and torch-gqn legacy folders) and the training-batch sampler."""
import collections
import gzip
import io
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch

import cameras
import gqn_dataset as gd
from conftest import legacy_stream
from dataset.convert2torch import convert
from gqn_dataset import DatasetError, GQNDataset, TrainBatches, batch_scenes, draw_views, fixed_views

SM5 = "shepard_metzler_5_parts"


def _expected(fixtures_dir, split):
    name = "001-of-900" if split == "train" else "001-of-100"
    z = np.load(os.path.join(fixtures_dir, "gqn-tfrecord", SM5, split, name + ".expected.npz"))
    return z["frames"], z["cameras"], z["views"]


def _legacy_dir(fixtures_dir):
    return os.path.join(fixtures_dir, "legacy-pt-gz", SM5 + "-torch", "train")


@pytest.fixture
def converted(fixtures_dir, tmp_path):
    """The fixture TFRecords converted into tmp_path; returns the converted root."""
    assert convert(os.path.join(fixtures_dir, "gqn-tfrecord"), str(tmp_path / "conv"), workers=1) == []
    return tmp_path / "conv"


@pytest.mark.parametrize("split", ["train", "test"])
def test_converted_scenes_equal_tensorflow_decode(fixtures_dir, converted, split):
    frames, cameras, views = _expected(fixtures_dir, split)
    ds = GQNDataset(converted / SM5 / split)
    assert (ds.dataset, ds.image_size, ds.views, len(ds)) == (SM5, 64, 15, len(frames))
    for i in range(len(ds)):
        x, v = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (15, 3, 64, 64)
        assert v.dtype == torch.float32 and v.shape == (15, 7)
        np.testing.assert_array_equal(x[views].permute(0, 2, 3, 1).numpy(), frames[i])
        np.testing.assert_allclose(v.numpy(), cameras[i], atol=1e-6)


def test_load_decodes_only_the_views_asked_for(converted):
    ds = GQNDataset(converted / SM5 / "train")
    x, v = ds[1]
    xs, vs = ds.load(1, [14, 0, 7])
    assert torch.equal(xs, x[[14, 0, 7]]) and torch.equal(vs, v[[14, 0, 7]])
    assert torch.equal(ds[-1][0], x)
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(IndexError):
        ds.load(0, [15])


def test_shard_file_is_plain_tensors(converted, fixtures_dir):
    path = converted / SM5 / "train" / "001-of-900.pt"
    obj = torch.load(path, weights_only=True, mmap=True)
    assert obj["format"] == "gqn-jpeg-v1" and obj["dataset"] == SM5
    assert obj["offsets"].shape == (2 * 15 + 1,) and obj["cameras"].shape == (2, 15, 7)
    assert obj["offsets"][-1] == obj["jpeg"].numel()
    tfrecord = os.path.join(fixtures_dir, "gqn-tfrecord", SM5, "train", "001-of-900.tfrecord")
    assert os.path.getsize(path) <= 1.1 * os.path.getsize(tfrecord)  # original JPEG bytes, not re-encoded
    assert not [n for n in os.listdir(path.parent) if n.startswith(".tmp")]


def test_scenes_are_numbered_through_shards_in_name_order(converted, tmp_path):
    src = GQNDataset(converted / SM5 / "train")
    frames, cams = zip(*(src.encoded(i) for i in range(2)))
    frames, cams = list(frames), np.stack(cams)
    out = tmp_path / "two"
    gd.write_shard(str(out / "002-of-002.pt"), frames[:1], cams[:1], SM5, 64)  # scene A
    gd.write_shard(str(out / "001-of-002.pt"), frames[::-1], cams[::-1], SM5, 64)  # scenes B, A
    ds = GQNDataset(out)
    assert len(ds) == 3
    assert torch.equal(ds[0][0], src[1][0]) and torch.equal(ds[1][0], src[0][0]) and torch.equal(ds[2][0], src[0][0])


def test_pose7_is_deepmind_order():
    c5 = np.array([[1.0, 2.0, 3.0, 0.3, -0.2]], dtype=np.float32)
    want = [1, 2, 3, np.sin(0.3), np.cos(0.3), np.sin(-0.2), np.cos(-0.2)]
    np.testing.assert_allclose(cameras.pose7(c5)[0], want, rtol=1e-6)
    np.testing.assert_allclose(cameras.pose7(torch.from_numpy(c5)).numpy()[0], want, rtol=1e-6)
    with pytest.raises(ValueError):
        cameras.pose7(np.zeros((2, 7)))


# ---------------------------------------------------------------------------------------------- legacy folders

def test_legacy_folder_reads_like_tensorflow(fixtures_dir):
    frames, cameras, views = _expected(fixtures_dir, "train")
    ds = GQNDataset(_legacy_dir(fixtures_dir))
    assert (ds.format, ds.dataset, ds.image_size, ds.views, len(ds)) == ("legacy", SM5, 64, 15, 2)
    for i in range(2):  # 0.pt.gz is scene A, 1033.pt.gz scene B: numeric order, gaps allowed
        x, v = ds[i]
        np.testing.assert_array_equal(x[views].permute(0, 2, 3, 1).numpy(), frames[i])
        np.testing.assert_allclose(v.numpy(), cameras[i], atol=1e-6)
    xs, vs = ds.load(1, [3, 2])
    assert torch.equal(xs, ds[1][0][[3, 2]]) and torch.equal(vs, ds[1][1][[3, 2]])


def test_legacy_plain_pt_and_zip_format(fixtures_dir, tmp_path, monkeypatch):
    legacy = GQNDataset(_legacy_dir(fixtures_dir))
    folder = tmp_path / "scenes" / "train"
    folder.mkdir(parents=True)
    with gzip.open(os.path.join(_legacy_dir(fixtures_dir), "0.pt.gz")) as f:
        (folder / "10.pt").write_bytes(f.read())  # legacy stream, not gzipped
    # A newer torch (>= 1.6) writes the zip format; torch-gqn's Scene is a namedtuple defined in __main__.
    scene = collections.namedtuple("Scene", ["frames", "cameras"])
    scene.__module__ = "__main__"
    monkeypatch.setattr(sys.modules["__main__"], "Scene", scene, raising=False)
    frames, cams5 = gd.load_legacy_scene(os.path.join(_legacy_dir(fixtures_dir), "1033.pt.gz"))
    torch.save(scene(frames=np.array(frames, dtype=object), cameras=cams5[None]), folder / "9.pt")
    ds = GQNDataset(folder)
    assert ds.format == "legacy" and ds.dataset is None and len(ds) == 2
    assert torch.equal(ds[0][0], legacy[1][0]) and torch.equal(ds[1][0], legacy[0][0])  # 9 before 10
    assert torch.equal(ds[0][1], legacy[1][1])


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["bare", "legacy-stream", "zip"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, form):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    payload = pickle.dumps(evil, protocol=2)
    if form == "legacy-stream":
        payload = legacy_stream(payload)
    elif form == "zip":
        buf = io.BytesIO()
        torch.save(evil, buf)  # pickling only records os.system; nothing runs here
        payload = buf.getvalue()
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "0.pt.gz").write_bytes(gzip.compress(payload))
    with pytest.raises(DatasetError, match=r"0\.pt\.gz.*refused to load (posix|os|nt)\.system"):
        GQNDataset(folder)
    assert not marker.exists()


def test_legacy_scene_with_other_payload_is_refused(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "0.pt").write_bytes(legacy_stream(pickle.dumps({"frames": 1}, protocol=2)))
    with pytest.raises(DatasetError, match="0.pt: not a torch-gqn Scene file"):
        GQNDataset(folder)
    (folder / "0.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match="0.pt"):
        GQNDataset(folder)


# ---------------------------------------------------------------------------------------------- bad folders

def test_bad_folders_raise_one_clear_error(tmp_path, fixtures_dir, converted):
    cases = {tmp_path / "missing": "does not exist", tmp_path / "empty": "holds no GQN data",
             converted / SM5: "pass a split folder",
             os.path.join(fixtures_dir, "gqn-tfrecord", SM5, "train"): "convert them first"}
    (tmp_path / "empty").mkdir()
    for folder, what in cases.items():
        with pytest.raises(DatasetError, match=what) as e:
            GQNDataset(folder)
        assert str(folder) in str(e.value) and "\n" not in str(e.value)
    assert issubclass(DatasetError, ValueError)


def test_damaged_shard_is_named(converted, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(converted / SM5 / "train", folder)
    data = (folder / "001-of-900.pt").read_bytes()
    (folder / "001-of-900.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(DatasetError, match="001-of-900.pt: not a converted GQN shard"):
        GQNDataset(folder)


# ---------------------------------------------------------------------------------------------- sampling

def test_draw_views_is_pure_and_valid():
    ms = set()
    for scene in range(300):
        context, query = draw_views(7, 3, scene, 15, 15)
        c2, q2 = draw_views(7, 3, scene, 15, 15)
        assert torch.equal(context, c2) and query == q2
        assert context.dtype == torch.int64 and 1 <= len(context) <= 14  # capped at S - 1
        assert query not in context.tolist() and len(set(context.tolist())) == len(context)
        assert all(0 <= j < 15 for j in context.tolist() + [query])
        ms.add(len(context))
    assert ms == set(range(1, 15))  # every M of 1..K occurs
    assert max(len(draw_views(0, s, 0, 10, 5)[0]) for s in range(200)) == 5
    assert not torch.equal(draw_views(7, 3, 0, 300, 20)[0], draw_views(7, 4, 0, 300, 20)[0])
    # a range of context sizes: every M in it occurs and no other; min_context 1 is the default draw
    assert {len(draw_views(0, s, 0, 15, 6, min_context=4)[0]) for s in range(200)} == {4, 5, 6}
    assert {len(draw_views(0, s, 0, 15, 3, min_context=3)[0]) for s in range(20)} == {3}
    assert all(torch.equal(draw_views(0, s, 1, 15, 9, min_context=1)[0], draw_views(0, s, 1, 15, 9)[0])
               for s in range(20))


def test_batch_scenes_walks_a_permutation_per_epoch():
    seen = torch.cat([batch_scenes(1, step, 12, 4) for step in range(3)])
    assert sorted(seen.tolist()) == list(range(12))
    nxt = torch.cat([batch_scenes(1, step, 12, 4) for step in range(3, 6)])
    assert sorted(nxt.tolist()) == list(range(12)) and not torch.equal(seen, nxt)
    assert torch.equal(batch_scenes(1, 5, 12, 4), batch_scenes(1, 5, 12, 4))
    # Slot g = step * B + b, so two steps of 4 are one step of 8.
    assert torch.equal(batch_scenes(2, 1, 10, 8), torch.cat([batch_scenes(2, 2, 10, 4), batch_scenes(2, 3, 10, 4)]))


def test_fixed_views_are_deterministic():
    context, query = fixed_views(0, 5, 15, 3)
    assert torch.equal(context, fixed_views(0, 5, 15, 3)[0]) and query == fixed_views(0, 5, 15, 3)[1]
    assert len(context) == 3 and query not in context.tolist()
    assert len(fixed_views(0, 5, 4, 10)[0]) == 3


def test_train_batches_content(converted):
    ds = GQNDataset(converted / SM5 / "train")
    tb = TrainBatches(ds, batch_size=4, max_context=15, seed=3,
                      noise={"eps": ("normal", (2, 3, 4, 4)), "depth_noise": ("uniform", (5,))})
    batch = tb[5]
    assert batch.pop("bad") == [] and batch.pop("unserved") is None  # every scene could be read
    k = 14
    shapes = {"x": (4, k, 3, 64, 64), "v": (4, k, 7), "mask": (4, k), "x_q": (4, 3, 64, 64), "v_q": (4, 7),
              "scene": (4,), "eps": (4, 2, 3, 4, 4), "depth_noise": (4, 5)}
    dtypes = {"x": torch.uint8, "v": torch.float32, "mask": torch.bool, "x_q": torch.uint8,
              "v_q": torch.float32, "scene": torch.int64, "eps": torch.float32, "depth_noise": torch.float32}
    assert {n: tuple(t.shape) for n, t in batch.items()} == shapes
    assert {n: t.dtype for n, t in batch.items()} == dtypes
    assert torch.equal(batch["scene"], batch_scenes(3, 5, 2, 4))
    for n, scene in enumerate(batch["scene"].tolist()):
        context, query = draw_views(3, 5, scene, 15, 15)
        m = len(context)
        assert batch["mask"][n].tolist() == [True] * m + [False] * (k - m)
        x, v = ds.load(scene, context.tolist() + [query])
        assert torch.equal(batch["x"][n, :m], x[:m]) and torch.equal(batch["v"][n, :m], v[:m])
        assert torch.equal(batch["x_q"][n], x[m]) and torch.equal(batch["v_q"][n], v[m])
        assert not batch["x"][n, m:].any() and not batch["v"][n, m:].any()  # zero padding
    exactly3 = TrainBatches(ds, batch_size=4, max_context=3, seed=3, min_context=3)[5]
    assert exactly3["mask"].all() and exactly3["x"].shape[1] == 3
    assert batch["x"].is_contiguous()
    assert torch.equal(tb[5]["eps"], batch["eps"]) and torch.equal(tb[5]["depth_noise"], batch["depth_noise"])
    assert 0 <= batch["depth_noise"].min() and batch["depth_noise"].max() < 1  # uniform: the volume's jitter
    assert not torch.equal(tb[6]["depth_noise"], batch["depth_noise"])


def test_train_batches_ranks_and_resume_match_one_process(converted):
    ds = GQNDataset(converted / SM5 / "train")
    noise = {"eps": ("normal", (3,)), "depth_noise": ("uniform", (4,))}  # each scene's, whatever its rank
    whole = TrainBatches(ds, batch_size=4, max_context=15, seed=9, noise=noise)
    parts = [TrainBatches(ds, 4, 15, 9, noise=noise, rank=r, world_size=2) for r in range(2)]
    for step in (0, 7):
        split = [p[step] for p in parts]
        for key, value in whole[step].items():
            if key == "bad":  # what each rank skipped: its share of the whole batch's report
                assert value == sum((s[key] for s in split), [])
            elif key == "unserved":
                assert value is None and all(s[key] is None for s in split)
            else:
                assert torch.equal(value, torch.cat([s[key] for s in split])), key
    loader = torch.utils.data.DataLoader(whole, batch_size=None, sampler=range(0, 4), num_workers=2)
    run = list(loader)
    resumed = list(torch.utils.data.DataLoader(whole, batch_size=None, sampler=range(2, 4)))
    for a, b in zip(run[2:], resumed):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    with pytest.raises(ValueError, match="divisible"):
        TrainBatches(ds, 5, 15, 0, world_size=2)


def test_train_batches_from_legacy_folder(fixtures_dir):
    batch = TrainBatches(GQNDataset(_legacy_dir(fixtures_dir)), 2, 15, 0)[0]
    assert batch["x"].shape == (2, 14, 3, 64, 64) and batch["mask"].any(1).all()


def test_simplejpeg_pixels_equal_pillow(fixtures_dir):
    """The hot path decodes with simplejpeg; it must give Pillow's (accurate-IDCT) pixels exactly."""
    from PIL import Image
    from dataset.tfrecord import parse_example, read_records
    path = os.path.join(fixtures_dir, "gqn-tfrecord", SM5, "train", "001-of-900.tfrecord")
    for record in read_records(path):
        for jpeg in parse_example(record)["frames"]:
            out = np.empty((64, 64, 3), np.uint8)
            gd._decode_into(jpeg, out, path)
            np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
