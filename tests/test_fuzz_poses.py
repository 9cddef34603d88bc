"""Fuzzing render.py's `--poses FILE` reader (render.read_poses): mutated and hostile files give finite float32
poses (N, 7) or one UserError line naming the file (tests/fuzzing.py)."""
import pytest
import torch
from hypothesis import given, strategies as st

from fuzzing import mutated, put, run_reader, scratch, share
from render import read_poses

VALID = b"# x y z yaw pitch\n0 -3 0.5 1.57 0.1\n3, 0, 0, 3.14, 0\n1 2 3 0 1 0 1\n"


def read(data):
    with scratch() as folder:
        path = put(folder, "poses.txt", data)
        return run_reader(lambda: read_poses(path), path, len(data))


def check(poses):
    assert poses.dtype == torch.float32 and poses.dim() == 2 and poses.shape[1] == 7 and poses.isfinite().all()


def test_the_valid_file_reads():
    poses, error = read(VALID)
    assert error is None and poses.shape == (3, 7)


@share(0.5)
@given(mutated(VALID))
def test_mutated_files_read_or_are_refused(data):
    poses, error = read(data)
    if error is None:
        check(poses)


WORDS = st.one_of(st.floats().map(repr), st.integers().map(str), st.text(max_size=5),
                  st.sampled_from(["1e39", "-1e39", "3.4e38", "nan", "inf", "1_0", "#", ",", "\x00", "\u2028"]))


@share(0.5)
@given(st.lists(st.lists(WORDS, max_size=8).map(" ".join), max_size=6), st.sampled_from(["\n", "\r\n", "\r"]),
       st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_hostile_files_read_or_are_refused(lines, newline, encoding):
    poses, error = read(newline.join(lines).encode(encoding, "surrogatepass" if encoding != "latin-1" else "replace"))
    if error is None:
        check(poses)


@pytest.mark.parametrize("data", [b"0 0 0 0 0\n\xff\xfe\n", b"1e39 0 0 0 0\n", b"0 0 0 0 0 0 -3.5e38\n"])
def test_regressions_are_refused_in_one_line(data):
    """Found by the fuzzing above: bytes that are not UTF-8 (UnicodeDecodeError), and numbers beyond float32, which
    passed the finite check as float64 and became inf in the poses."""
    _, error = read(data)
    assert error is not None
