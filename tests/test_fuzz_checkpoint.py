"""Fuzzing checkpoint loading (checkpoint.load_model, as evaluate.py, render.py and view.py call it, then run_seed
and input_size on what it returns): mutated and hostile checkpoints give a model or one CheckpointError line
naming the file, and a config claiming a huge model allocates nothing (tests/fuzzing.py)."""
import types

import pytest
import torch
from hypothesis import given, strategies as st

from checkpoint import CheckpointError, input_size, load_model, run_seed
from cli import UserError
from conftest import SIZE, make_checkpoint
from fuzzing import member_span, mutated, put, run_reader, saved, scratch, share, written
from model import GQN

NAME = "latest.pt"


VALID, CKPT = written(NAME, make_checkpoint)
PICKLE = member_span(VALID, "data.pkl")


def load(data):
    """load_model on `data` as a checkpoint file, then what the commands read from it -> (result, error)."""
    with scratch() as folder:
        path = put(folder, NAME, data)

        def read():
            model, ckpt = load_model(path)
            return model, ckpt, run_seed(ckpt)
        return run_reader(read, path, len(data))


def check(result):
    model, ckpt, seed = result
    assert isinstance(model, GQN) and not model.training and type(seed) is int and seed >= 0
    try:  # what evaluate.py and render.py ask next: a UserError naming the data folder, or a size
        assert type(input_size(ckpt, types.SimpleNamespace(image_size=SIZE), "data", "--data_dir")) is int
    except UserError as e:
        assert str(e).startswith("--data_dir data")


def test_the_valid_checkpoint_loads():
    result, error = load(VALID)
    assert error is None, error
    check(result)


@share(0.5)
@given(st.one_of(mutated(VALID), mutated(VALID, region=PICKLE)))
def test_mutated_checkpoints_load_or_are_refused(data):
    """Whole-file edits (zip structure, weights) and in-place edits of the pickle (read without CRC checks)."""
    result, error = load(data)
    if error is None:
        check(result)


# model_config values that build nothing or a model far larger than the file: they must fail on the meta device.
DIMS = st.one_of(st.integers(-2, 40), st.sampled_from([10**5, 2**31, 2**63, 10**9, 8.5, "8", None, True, [8]]))
CONFIG = {"representation": st.sampled_from(["pool", "tower", "pyramid", "volume", "nope", ["pool"], None]),
          "L": DIMS, "shared_core": st.sampled_from([True, False, "yes", None]), "x_channels": DIMS, "v_dim": DIMS,
          "r_dim": DIMS, "h_dim": DIMS, "z_dim": DIMS, "u_dim": DIMS, "image_size": DIMS, "kernel_size": DIMS,
          "checkpoint_activations": st.sampled_from([True, "x"]), "fov": st.floats(), "near": st.floats(),
          "far": st.floats(), "depth_samples": DIMS, "cell_rays": DIMS, "unknown": st.integers()}


def _tensor_swaps(draw):
    """The weights with one tensor replaced, removed or added, or not tensors at all."""
    weights = dict(CKPT["model"])
    key = draw(st.sampled_from(sorted(weights)))
    t = weights[key]
    value = draw(st.sampled_from(["remove", "transpose", "grow", "double", "int", "scalar", "list", "expanded",
                                  "extra", "nan"]))
    if value == "remove":
        del weights[key]
    elif value == "extra":
        weights["extra.weight"] = t
    else:
        weights[key] = {"transpose": lambda: t.reshape(-1).flip(0).reshape(t.shape[::-1]),
                        "grow": lambda: torch.zeros(t.numel() + 1), "double": t.double, "int": t.int,
                        "scalar": lambda: 1.0, "list": t.tolist, "expanded": lambda: torch.zeros(1).expand(t.shape),
                        "nan": lambda: torch.full_like(t, float("nan"))}[value]()
    return weights


@st.composite
def hostile_checkpoints(draw):
    """The valid checkpoint's dict with hostile fields: model_config values, weights, step, config, data."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from([None, [], "x", {"model": {}}]))
    ckpt = dict(CKPT)
    for field in draw(st.lists(st.sampled_from(["model_config", "model", "step", "config", "data"]), min_size=1,
                               max_size=2, unique=True)):
        if field == "model_config":
            ckpt[field] = {**CKPT[field], **draw(st.fixed_dictionaries({}, optional=CONFIG))}
        elif field == "model":
            ckpt[field] = _tensor_swaps(draw)
        elif field == "step":
            ckpt[field] = draw(st.sampled_from([-1, "7", 2**70, 7.5, None, torch.tensor(7)]))
        else:
            ckpt[field] = draw(st.sampled_from([[], "x", None, {"seed": "x"}, {"seed": -5}, {"seed": 2**70},
                                                {"image_size": "x"}, {"image_size": 0}, {"max_context": -1},
                                                {"image_size": 2 * SIZE}]))
    return ckpt


@share(0.5)
@given(hostile_checkpoints())
def test_hostile_checkpoints_load_or_are_refused(ckpt):
    result, error = load(saved(ckpt))
    assert error is None or isinstance(error, CheckpointError)
    if error is None:
        check(result)


@pytest.mark.parametrize("field,value", [("model_config", {**CKPT["model_config"], "h_dim": 10**5}),
                                         ("model_config", {**CKPT["model_config"], "L": 10**9}),
                                         ("config", ["x"]), ("data", {"image_size": "x"})])
def test_regressions_are_refused_in_one_line(field, value):
    """Found by the fuzzing above: a model_config claiming a huge model was built before the weights were compared
    (h_dim 10^5, L 10^9: allocations of terabytes tried; in the fuzzing, a config that built 2 GB of weights from a
    600 KB file), and fields of other types crashed the commands after loading ('config' a list: AttributeError in
    run_seed; data's image_size a string: ValueError in input_size)."""
    _, error = load(saved({**CKPT, field: value}))
    assert error is not None


def test_a_file_that_is_not_a_zip_is_refused_before_torch_reads_it():
    """Regression, found by the long profile: a checkpoint whose first bytes became a pickle opcode (BINUNICODE of
    134 MB) was read by torch.load as a legacy pickle stream, whose unpickler allocates the stated length first."""
    _, error = load(b"X\xff\xff\xff\x7f" + VALID[5:])
    assert "not torch.save's zip format" in str(error)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("field", ["L", "h_dim", "z_dim", "u_dim", "r_dim", "image_size", "depth_samples",
                                   "cell_rays"])
def test_a_size_beyond_the_machines_memory_is_refused_before_anything_is_allocated(field, shared):
    """Each size a model_config declares, with shared and unshared cores: one that would make a single scene's
    forward pass hold more than this machine's memory is refused in one line naming it, allocating nothing (a shared
    core's L is not bounded by the weights the file holds: L 10**9 once loaded, and its first render asked 128 GB)."""
    from checkpoint import MEMORY, scene_bytes

    config = {**CKPT["model_config"], "shared_core": shared}
    if field in ("depth_samples", "cell_rays"):  # only the volume casts rays
        config.update(representation="volume", depth_samples=16, cell_rays=2)
    while scene_bytes(config) <= MEMORY:  # doubled until one scene needs more than the machine holds
        config[field] *= 2
    result, error = load(saved({**CKPT, "model_config": config}))
    assert result is None and f"{field} {config[field]}: one scene's forward pass would hold" in str(error)
