"""Fuzzing GQNDataset on converted shards (gqn_dataset.write_shard's files): mutated and hostile shards give scenes
as written or one DatasetError line naming the shard (tests/fuzzing.py)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from fuzzing import member_span, mutated, put, run_reader, saved, scratch, share, written
from gqn_dataset import CAMERA_KEYS, MAX_IMAGE_SIZE, GQNDataset, encode_jpeg, write_shard

SIZE, SCENES, VIEWS = 8, 2, 3
NAME = "001-of-001.pt"


def _valid():
    frames = [[encode_jpeg(np.full((SIZE, SIZE, 3), 40 * (3 * i + j), np.uint8)) for j in range(VIEWS)]
              for i in range(SCENES)]
    cams = np.arange(SCENES * VIEWS * 7, dtype=np.float32).reshape(SCENES, VIEWS, 7) / 10
    return written(NAME, lambda path: write_shard(path, frames, cams, "shepard_metzler_5_parts", SIZE,
                                                  {"fov": 30, "near": 2, "far": 6}, "import"))


VALID, OBJ = _valid()
PICKLE = member_span(VALID, "data.pkl")


def read_scenes(data):
    """GQNDataset on one shard of `data`, reading its first and last scenes -> ((ds, scenes), error)."""
    with scratch() as folder:
        path = put(folder, NAME, data)

        def read():
            ds = GQNDataset(folder)
            return ds, [(i, ds[i], ds.encoded(i)) for i in sorted({0, 1, len(ds) - 1}) if 0 <= i < len(ds)]
        return run_reader(read, path, len(data))


def check(result):
    """What a shard that reads gives: scenes of the header's shape, finite cameras, a valid camera model."""
    ds, scenes = result
    assert 1 <= ds.image_size <= MAX_IMAGE_SIZE and ds.views >= 0
    for fov in (ds.fov, ds.near, ds.far):
        assert fov is None or (math.isfinite(fov) and fov > 0)
    for i, (x, v), (jpegs, v2) in scenes:
        assert x.dtype == torch.uint8 and x.shape == (ds.views, 3, ds.image_size, ds.image_size)
        assert v.dtype == torch.float32 and v.shape == (ds.views, 7) and v.isfinite().all()
        assert len(jpegs) == ds.views and np.array_equal(v.numpy(), v2)


def test_the_valid_shard_reads():
    result, error = read_scenes(VALID)
    assert error is None, error
    check(result)
    ds, scenes = result
    assert (len(ds), ds.fov, ds.near, ds.far) == (SCENES, 30.0, 2.0, 6.0)
    for i, (x, v), (jpegs, _) in scenes:
        assert torch.equal(v, OBJ["cameras"][i]) and jpegs == [bytes(f) for f in _frames(OBJ, i)]


def _frames(obj, i):
    o = obj["offsets"]
    return [obj["jpeg"][o[i * VIEWS + j]:o[i * VIEWS + j + 1]].numpy() for j in range(VIEWS)]


@share(0.5)
@given(st.one_of(mutated(VALID), mutated(VALID, region=PICKLE)))
def test_mutated_shards_read_or_are_refused(data):
    """Whole-file edits (zip structure) and in-place edits of the pickle (torch reads it without checking CRCs)."""
    result, error = read_scenes(data)
    if error is None:
        check(result)


def _offsets_at(k, value):
    o = OBJ["offsets"].clone()
    o[k % len(o)] = value
    return o


def _cameras_at(k, value):
    c = OBJ["cameras"].clone()
    c.view(-1)[k % c.numel()] = value
    return c


BIG = [0, -1, 2**31, 2**63 - 1, -2**63]
# Values a damaged or hostile shard may hold, by key: wrong types, sizes and dtypes, huge claims (a stride-0
# tensor of 2^40 elements stores one), non-finite cameras and camera models.
HOSTILE = {
    "format": st.sampled_from(["gqn-jpeg-v2", None, 1]),
    "dataset": st.sampled_from([None, 5, ["a"], "x" * 300]),
    "image_size": st.one_of(st.sampled_from([0, -SIZE, 8.0, "8", True, MAX_IMAGE_SIZE, MAX_IMAGE_SIZE + 1, 2**31,
                                             2**63, 2**64 + 3, torch.tensor(SIZE)]), st.integers()),
    "views": st.one_of(st.sampled_from([0, -1, 2**40, 3.0, torch.tensor(VIEWS)]), st.integers(-2, 8)),
    "jpeg": st.sampled_from([OBJ["jpeg"].float(), OBJ["jpeg"][:-5], torch.zeros(0, dtype=torch.uint8),
                             torch.zeros(1, dtype=torch.uint8).expand(2**40), OBJ["jpeg"][::2],
                             torch.nn.Parameter(OBJ["jpeg"].float()), OBJ["jpeg"].to_sparse(),
                             OBJ["jpeg"].reshape(1, -1), torch.full_like(OBJ["jpeg"], 255)]),
    "offsets": st.one_of(st.sampled_from([OBJ["offsets"].flip(0), OBJ["offsets"] - 5, OBJ["offsets"] * 1000,
                                          OBJ["offsets"].int(), OBJ["offsets"].float(), OBJ["offsets"][:-1],
                                          torch.zeros(1, dtype=torch.int64).expand(SCENES * VIEWS + 1)]),
                         st.builds(_offsets_at, st.integers(0, 2 * SCENES * VIEWS), st.sampled_from(BIG)),
                         st.builds(_offsets_at, st.integers(0, 2 * SCENES * VIEWS), st.integers(-2**63, 2**63 - 1))),
    "cameras": st.one_of(st.sampled_from([OBJ["cameras"].double(), OBJ["cameras"][..., :6],
                                          torch.zeros(1, 1, 7).expand(2**30, VIEWS, 7),
                                          torch.nn.Parameter(OBJ["cameras"]), OBJ["cameras"][0]]),
                         st.builds(_cameras_at, st.integers(0, 100), st.floats(width=32))),
    **{k: st.one_of(st.floats(), st.sampled_from([0, -1, 180, 10**400, "30", [30.0], torch.tensor(30.0), None]))
       for k in CAMERA_KEYS},
    "source": st.sampled_from([5, "elsewhere", torch.zeros(2), "gqn-datasets", "a\nb"]),
}


@st.composite
def hostile_shards(draw):
    """The valid shard's dict with 1-3 keys given hostile values (or removed), or not a dict at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([None, [], "x", 5, {"format": "gqn-jpeg-v1"}]))
    obj = dict(OBJ)
    for key in draw(st.lists(st.sampled_from(sorted(HOSTILE)), min_size=1, max_size=3, unique=True)):
        value = draw(HOSTILE[key])
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


@share(0.5)
@given(hostile_shards())
def test_hostile_shards_read_or_are_refused(obj):
    result, error = read_scenes(saved(obj))
    if error is None:
        check(result)


@pytest.mark.parametrize("key,value", [("jpeg", None), ("jpeg", [1, 2]),
                                       ("jpeg", torch.nn.Parameter(OBJ["jpeg"].float())),
                                       ("offsets", OBJ["offsets"].float()), ("source", torch.zeros(2)), ("image_size", -8),
                                       ("image_size", 2**31), ("image_size", MAX_IMAGE_SIZE),
                                       ("cameras", OBJ["cameras"].double()), ("cameras", _cameras_at(9, math.nan)),
                                       ("fov", math.nan), ("fov", 0.0), ("offsets", _offsets_at(2, 10**6)),
                                       ("offsets", _offsets_at(4, 1))])
def test_regressions_are_refused_in_one_line(key, value):
    """Found by the fuzzing above, before the reader checked a shard's fields: no `jpeg` (KeyError), a list
    (AttributeError), a tensor that requires grad (RuntimeError from .numpy()), float offsets (TypeError), a tensor
    as `source` (RuntimeError), image_size -8 (ValueError), 2^31 (ValueError: array too big) or 4096 over 8 px
    frames (151 MB allocated), and shards read as if valid: float64 or NaN cameras, fov NaN or 0. Offsets out of
    range or order were refused as bad JPEGs; they are now named as damaged offsets."""
    obj = {k: v for k, v in {**OBJ, key: value}.items() if v is not None}
    _, error = read_scenes(saved(obj))
    assert error is not None
