"""Fuzzing the restricted unpickler for torch-gqn scene files (gqn_dataset.load_legacy_scene, GQNDataset on `N.pt`
and `N.pt.gz`): mutated and hostile pickles give a scene or one DatasetError line naming the file, and nothing
they name runs (tests/fuzzing.py)."""
import collections
import gzip
import io
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import legacy_stream
from fuzzing import mutated, put, run_reader, scratch, share
from gqn_dataset import GQNDataset, encode_jpeg, load_legacy_scene

VIEWS = 3
FRAMES = np.array([encode_jpeg(np.full((8, 8, 3), 60 * j, np.uint8)) for j in range(VIEWS)], dtype=object)
CAMERAS = np.arange(VIEWS * 5, dtype=np.float32).reshape(1, VIEWS, 5) / 10
Scene = collections.namedtuple("Scene", ["frames", "cameras"])
Scene.__module__ = "__main__"  # as torch-gqn's converter defined it


def dumps(obj):
    """pickle protocol 2, as torch-gqn's converter wrote, with Scene found in __main__ while pickling."""
    main = sys.modules["__main__"]
    had = hasattr(main, "Scene")
    old = getattr(main, "Scene", None)
    main.Scene = Scene
    try:
        return pickle.dumps(obj, protocol=2)
    finally:
        if had:
            main.Scene = old
        else:
            del main.Scene


def zipped(payload):
    """The zip form torch >= 1.6 writes: <name>/data.pkl holding the payload."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


PAYLOAD = dumps(Scene(frames=FRAMES, cameras=CAMERAS))
STREAM = legacy_stream(PAYLOAD)


def read_scene(data, name="0.pt"):
    """load_legacy_scene and GQNDataset on `data` as a scene file -> ((frames, cameras, ds), error)."""
    with scratch() as folder:
        path = put(folder, name, data)

        def read():
            frames, cameras = load_legacy_scene(path)
            ds = GQNDataset(folder)
            return frames, cameras, ds, ds[0]
        return run_reader(read, path, len(data))


def check(result):
    frames, cameras, ds, (x, v) = result
    assert frames and all(type(f) is bytes for f in frames)
    assert cameras.dtype == np.float32 and cameras.shape == (len(frames), 5) and np.isfinite(cameras).all()
    assert x.shape == (len(frames), 3, ds.image_size, ds.image_size) and v.isfinite().all()


def test_the_valid_inputs_read():
    for data, name in ((STREAM, "0.pt"), (gzip.compress(STREAM), "0.pt.gz"), (zipped(PAYLOAD), "0.pt")):
        result, error = read_scene(data, name)
        assert error is None, error
        check(result)
        assert result[0] == list(FRAMES) and np.array_equal(result[1], CAMERAS[0])


@st.composite
def files(draw):
    """(bytes, name): the legacy stream mutated (plain or then gzipped), its gzip mutated, or the payload mutated
    inside a well-formed zip (Python's zipfile checks CRCs, so edits must be made before zipping)."""
    form = draw(st.sampled_from(["pt", "gz", "gz-bytes", "zip"]))
    if form == "gz-bytes":
        return draw(mutated(gzip.compress(STREAM))), "0.pt.gz"
    if form == "zip":
        return zipped(draw(mutated(PAYLOAD))), "0.pt"
    data = draw(mutated(STREAM))
    return (gzip.compress(data), "0.pt.gz") if form == "gz" else (data, "0.pt")


@share(0.4)
@given(files())
def test_mutated_scene_files_read_or_are_refused(file):
    result, error = read_scene(*file)
    if error is None:
        check(result)


# Values a hostile Scene may hold: numbers of any size, NaN, bytes, strings, arrays of any dtype and shape, nested.
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70), st.floats(),
                   st.binary(max_size=32), st.text(max_size=8), st.just(FRAMES[0]),
                   st.builds(lambda n: np.zeros(n, np.float32), st.integers(0, 20)),
                   st.builds(lambda n, d: np.zeros(n, d), st.integers(0, 6), st.sampled_from(["f8", "u1", "O", "S3"])),
                   st.just(FRAMES), st.just(CAMERAS), st.just(np.full((1, VIEWS, 5), np.nan, np.float32)))
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                                                       st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                      max_leaves=12)


@st.composite
def hostile_payloads(draw):
    """A Scene (or a tuple, or anything) of hostile fields, pickled as torch-gqn did."""
    frames, cameras = draw(st.one_of(VALUES, st.just(FRAMES))), draw(st.one_of(VALUES, st.just(CAMERAS)))
    kind = draw(st.sampled_from(["scene", "tuple", "value"]))
    obj = Scene(frames, cameras) if kind == "scene" else (frames, cameras) if kind == "tuple" else frames
    return dumps(obj)


@share(0.3)
@given(hostile_payloads(), st.booleans())
def test_hostile_scenes_read_or_are_refused(payload, gz):
    data = legacy_stream(payload)
    result, error = read_scene(gzip.compress(data) if gz else data, "0.pt.gz" if gz else "0.pt")
    if error is None:
        check(result)


# Hand-written pickle opcodes (protocol 2 framing; CPython's unpickler reads them all): what no pickler writes.
SCENE = b"c__main__\nScene\n"
RECONSTRUCT = b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"


def scene_of(frames, cameras=None):
    return b"\x80\x02" + SCENE + frames + (cameras or pickle.dumps(CAMERAS, protocol=2)[2:-1]) + b"\x86\x81."


def array(shape, dtype, data):
    """numpy's own opcodes for an array: _reconstruct(ndarray, (0,), b'b'), then BUILD with (1, shape, dtype,
    False, data), the shape and data as given."""
    empty = RECONSTRUCT + b"K\x00\x85" + pickle.dumps(b"b", protocol=2)[2:-1] + b"\x87R"
    state = (b"(K\x01" + pickle.dumps(shape, protocol=2)[2:-1] + pickle.dumps(np.dtype(dtype), protocol=2)[2:-1]
             + b"\x89" + pickle.dumps(data, protocol=2)[2:-1] + b"tb")
    return empty + state


def big(n):
    return b"\x8a" + bytes([len(n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True))]) + \
        n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)  # LONG1


HOSTILE = {
    # ndarray.__setstate__ allocates (and for objects fills) the stated shape before it compares it with the data
    "object array of 2^26 from one element": scene_of(array((2**26,), "O", [FRAMES[0]])),
    "float array of 2^40 from no data": scene_of(array((3,), "f4", b""), array((2**40, 5), "f4", b"")),
    # _reconstruct allocates its shape: numpy passes (0,), a hostile file anything
    "_reconstruct of 2^26 objects": scene_of(RECONSTRUCT + big(2**26) + b"\x85" + pickle.dumps("O", protocol=2)[2:-1]
                                             + b"\x87R"),
    # bytes(n) allocates n zero bytes; frames of ints became bytes(n) in load_legacy_scene
    "bytes(2^29)": scene_of(b"cbuiltins\nbytes\n" + big(2**29) + b"\x85R" + b"\x85"),
    "frames of an int": scene_of(b"]" + big(2**29) + b"a"),
    # CPython allocates a BINBYTES8's stated length before reading it, and a memo table up to a PUT's index
    "BINBYTES8 of 2^62": scene_of(b"\x8e" + struct.pack("<Q", 2**62) + b"abc"),
    "LONG_BINPUT 2^25": scene_of(b"]r" + struct.pack("<I", 2**25)),
    # nesting and cycles
    "nested 100000 deep": scene_of(b"(" * 100000 + b"l" * 100000),
    "a list holding itself": scene_of(b"]q\x00h\x00a"),
    "no frames": scene_of(b"]"),
    "NaN cameras": scene_of(pickle.dumps(FRAMES, protocol=2)[2:-1],
                            pickle.dumps(np.full((1, VIEWS, 5), np.nan, np.float32), protocol=2)[2:-1]),
    "os.system": b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.",
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
@pytest.mark.parametrize("form", ["legacy stream", "zip"])
def test_hand_written_hostile_pickles_are_refused_in_one_line(what, form):
    """Regressions, found by the properties above or written for what they found: an object array whose state holds
    fewer elements than its shape crashed the process (numpy 2.4 segfaults in __setstate__); the others allocated far
    beyond the file (bytes(n): n bytes; a memo index: a table of its size; _reconstruct: its shape; BINBYTES8: its
    length; nesting 100000 deep: 500 MB resident) or returned a scene they should not (NaN cameras)."""
    _, error = read_scene(legacy_stream(HOSTILE[what]) if form == "legacy stream" else zipped(HOSTILE[what]))
    assert error is not None


def test_a_gzip_bomb_is_refused_before_inflating():
    """Regression: 64 MB of zeros in a 64 KB .pt.gz were inflated whole (gzip.decompress) before the pickle was read;
    the same in a deflated zip member."""
    bomb = pickle.dumps(bytes(64 << 20), protocol=2)
    _, error = read_scene(gzip.compress(legacy_stream(bomb)), "0.pt.gz")
    assert "decompresses to more than" in str(error)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", bomb)
    _, error = read_scene(buf.getvalue())
    assert "data.pkl claims" in str(error)


@share(0.1)
@given(st.integers(0, 2**64 - 1), st.sampled_from([b"\x8e", b"\x8d", b"\x96"]))
def test_counted_lengths_of_any_size_are_checked_before_allocating(n, opcode):
    """BINBYTES8, BINUNICODE8, BYTEARRAY8 with any stated length over a few real bytes."""
    _, error = read_scene(legacy_stream(scene_of(opcode + struct.pack("<Q", n) + b"abcd")))
    assert error is not None


@share(0.2)
@given(st.lists(st.integers(0, 2**33), max_size=3), st.sampled_from(["O", "f4", "u1", "V1000", "S7"]),
       st.one_of(st.binary(max_size=64), st.lists(st.just(FRAMES[0]), max_size=4)))
def test_array_states_of_any_shape_are_checked_against_their_data(shape, dtype, data):
    result, error = read_scene(legacy_stream(scene_of(array(tuple(shape), dtype, data))))
    if error is None:
        check(result)
