"""Fuzzing the TFRecord reader, the tf.train.Example decoder (dataset/tfrecord.py) and convert2torch.convert_shard:
mutated and hostile TFRecords end in a result or one TFRecordError line naming the file (tests/fuzzing.py)."""
import math
import os
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

from cameras import pose7
from dataset.convert2torch import convert_shard
from dataset.tfrecord import TFRecordError, make_example, masked_crc, parse_example, read_records
from fuzzing import mutated, put, run_reader, scratch, share
from gqn_dataset import DATASETS, GQNDataset, encode_jpeg

SM5 = "shepard_metzler_5_parts"
S = DATASETS[SM5]["views"]
JPEG = encode_jpeg(np.full((64, 64, 3), 90, np.uint8))
RECORDS = [make_example({"frames": [JPEG] * S, "cameras": [0.1 * (k + j) for j in range(5 * S)]}) for k in range(3)]


def frame(data):
    """One TFRecord record around `data`, both CRCs honest (so that what follows reaches the Example decoder)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


VALID = b"".join(map(frame, RECORDS))


def read_all(data):
    """read_records on `data` as a file -> (records, error)."""
    with scratch() as folder:
        path = put(folder, "001-of-900.tfrecord", data)
        return run_reader(lambda: list(read_records(path)), path, len(data))


@share(0.35)
@given(mutated(VALID))
def test_mutated_tfrecords_read_back_exactly_or_are_refused(data):
    records, error = read_all(data)
    if error is None:  # every CRC checked: what was read is exactly what the file frames
        assert b"".join(map(frame, records)) == data


@share(0.05)
@given(st.lists(st.sampled_from(range(len(RECORDS))), max_size=6))
def test_records_in_any_order_read_back_in_that_order(order):
    records, error = read_all(b"".join(frame(RECORDS[k]) for k in order))
    assert error is None and records == [RECORDS[k] for k in order]


@share(0.2)
@given(st.one_of(st.sampled_from([2**64 - 1, 2**63, 2**40, 2**32 + 5, 10**9]), st.integers(0, 2**64 - 1)),
       st.binary(max_size=64), st.booleans())
def test_a_length_field_of_any_size_is_checked_against_the_file_before_reading(length, tail, honest):
    """A length up to 2^64 - 1 with its CRC right: refused without allocating it (f.read(n) would)."""
    head = struct.pack("<Q", length)
    data = head + struct.pack("<I", masked_crc(head) if honest else 0) + tail
    records, error = read_all(data)
    assert error is not None or b"".join(map(frame, records)) == data


@pytest.mark.parametrize("length", [2**64 - 1, 2**40])
def test_a_length_of_2_to_the_64_is_refused_in_one_line(length):
    """Regression: read_records read f.read(length) first: OverflowError for 2^63 and more, MemoryError (or
    gigabytes allocated) below."""
    head = struct.pack("<Q", length)
    _, error = read_all(head + struct.pack("<I", masked_crc(head)) + b"tiny")
    assert "record 0: truncated" in str(error)


@share(0.2)
@given(mutated(RECORDS[0]))
def test_mutated_examples_decode_or_raise_value_error(data):
    """parse_example: a dict of lists, or ValueError (convert_shard adds the file and the record)."""
    try:
        features = parse_example(data)
    except ValueError:
        return
    assert all(isinstance(k, str) and isinstance(v, list) for k, v in features.items())


# Feature values as make_example writes them: bytes lists, float lists (NaN, inf included) or int64 lists.
VALUES = st.one_of(st.lists(st.sampled_from([JPEG, b"", b"\xff\xd8\xff", b"junk"]), max_size=S + 1),
                   st.lists(st.floats(width=32), max_size=5 * S + 1),
                   st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=5 * S + 1),
                   st.just([JPEG] * S), st.just([0.5] * (5 * S)))


@st.composite
def examples(draw):
    """An Example as a converter meets it, CRCs honest: hostile features, or a valid record's bytes mutated."""
    if draw(st.booleans()):
        return draw(mutated(RECORDS[1]))
    features = {"frames": draw(VALUES), "cameras": draw(VALUES)}
    for name in draw(st.sets(st.sampled_from(["frames", "cameras"]))):
        del features[name]
    return make_example(features)


@share(0.2)
@given(st.lists(examples(), max_size=3), st.integers(0, 3))
def test_hostile_records_convert_or_are_refused(records, at):
    """convert_shard on honest framing with hostile Examples: a shard that GQNDataset reads back (frames as
    stored, cameras finite), or one TFRecordError line naming the file."""
    records = RECORDS[:1] + records if at == 0 else records  # most start with a valid scene, as a shard would
    data = b"".join(map(frame, records))
    with scratch() as folder:
        src = put(folder, "001-of-900.tfrecord", data)
        dst = os.path.join(folder, "out", "001-of-900.pt")
        n, error = run_reader(lambda: convert_shard(src, dst, SM5), src, len(data))
        assert error is None or isinstance(error, TFRecordError)
        if error is None:
            ds = GQNDataset(os.path.dirname(dst))
            assert len(ds) == n == len(records)
            for i, record in enumerate(records):
                jpegs, cams = ds.encoded(i)
                features = parse_example(record)
                assert jpegs == features["frames"] and np.isfinite(cams).all()
                np.testing.assert_array_equal(
                    cams, pose7(np.asarray(features["cameras"], np.float32).reshape(S, 5)))


@pytest.mark.parametrize("features,what", [({"frames": [0.5] * S, "cameras": [0.5] * (5 * S)}, "frames must be a"),
                                           ({"frames": [JPEG] * S, "cameras": [math.nan] * (5 * S)}, "not finite")])
def test_frames_as_floats_or_nan_cameras_are_refused_in_one_line(features, what):
    """Regression: a float list as `frames` crashed the JPEG header check with a TypeError; NaN cameras were
    converted silently (a NaN loss later)."""
    with scratch() as folder:
        src = put(folder, "a.tfrecord", frame(make_example(features)))
        _, error = run_reader(lambda: convert_shard(src, os.path.join(folder, "a.pt"), SM5), src, 0)
        assert what in str(error)
