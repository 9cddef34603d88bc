"""Every flag is honoured, refused in one `error:` line naming it, or noted in one line where it does nothing: none
is dropped silently (on a fresh run or on --resume)."""
import pytest
import torch

import budget
import config
import resolve
import train
from conftest import args, main_error, weights
from distributed import Dist

CPU = torch.device("cpu")


def notes(argv, capsys):
    """train.py's run of argv -> its `note:` lines."""
    capsys.readouterr()
    train.main(argv)
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]


def test_flags_that_do_nothing_here_are_noted(data, tmp_path, capsys):
    said = notes(args(data, tmp_path, "r", 1, "--device_ids", "0", "--representation", "pool", "--fov", "200",
                      "--near", "1", "--depth_samples", "32", "--cell_rays", "1"), capsys)
    assert "note: --device_ids 0 is ignored: no CUDA device here: training runs on the CPU" in said
    assert ("note: --fov --near --depth_samples --cell_rays ignored: only --representation volume reads a camera "
            "model, not pool") in said
    assert notes(args(data, tmp_path, "quiet", 1), capsys) == []  # nothing given that does nothing: no note


def test_batch_threads_under_compile_is_noted():
    """--compile makes a step one graph, so the batch is not split; resolve says so (compiling itself is tested in
    test_train.py)."""
    cfg, given = config.parse_args(["--batch_threads", "2", "--compile"])
    threads = resolve.share_threads(cfg, CPU, Dist())
    assert threads == 1
    assert resolve.flag_notes(cfg, given, Dist(), CPU, threads) == [
        "note: --batch_threads 2 is ignored: with --compile a step is one graph, so one thread takes it"]


def test_min_context_above_the_data_sets_k_is_refused(data, tmp_path, capsys):
    main_error(train.main, args(data, tmp_path, "r", 1, "--min_context", "16"), capsys, "--min_context 16",
               "15 context views")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_a_kl_balance_outside_0_to_1_is_refused(value, capsys):
    main_error(train.main, ["--kl_balance", value], capsys, "--kl_balance", "a number from 0 to 1")


def test_a_z_grid_that_does_not_divide_the_cores_grid_is_refused(capsys):
    main_error(train.main, ["--z_grid", "3"], capsys, "--z_grid 3", "z_grid must divide the cores' grid")


def test_the_rooms_job_trains_the_cpu_preset_into_its_own_folder():
    sm, rooms = config.parse_args([])[0], config.parse_args(["--builtin", "rooms_ring_camera"])[0]
    assert (sm.z_grid, sm.z_dim, sm.kl_balance, sm.log_dir) == (2, 6, 0.65, "default")
    assert (rooms.z_grid, rooms.z_dim, rooms.kl_balance, rooms.log_dir) == (2, 6, 0.65, "rooms")
    given = config.parse_args(["--builtin", "rooms_ring_camera", "--z_grid", "0", "--z_dim", "3", "--log_dir", "r"])[0]
    assert (given.z_grid, given.z_dim, given.kl_balance, given.log_dir) == (0, 3, 0.65, "r")


def test_the_paper_preset_without_data_is_described_as_the_paper_gqn():
    cfg, _ = config.parse_args(["--preset", "paper"])
    line = resolve.announce_default_job(cfg, "runs/default")
    assert "the paper's GQN (L=12" in line and "2-core" not in line
    assert "a small GQN for a 2-core CPU" in resolve.announce_default_job(config.parse_args([])[0], "runs/default")


@pytest.mark.parametrize("flags", [[], ["--sigma_n", "0.5"], ["--lr_n", "100"]])
def test_the_default_jobs_expected_scores_are_its_schedules_own(flags):
    assert config.is_cpu_preset(config.parse_args(flags)[0]) == (flags == [])


@pytest.fixture
def timed(data, tmp_path, monkeypatch):
    """A run whose --train_minutes budget fixed its length (at most 400 steps), timed over 20 steps, not 200."""
    monkeypatch.setattr(budget, "CALIBRATION", 20)
    train.main(args(data, tmp_path, "timed", 400, "--train_minutes", "0.01", "--save_interval", "100"))
    state = weights(tmp_path / "timed")["state"]
    assert state["timed_ms"] > 0 and state["steps"] <= 400
    return tmp_path, state["steps"]


def test_a_fixed_budget_is_not_changed_on_resume(data, timed, capsys):
    root, steps = timed
    main_error(train.main, args(data, root, "timed", 400, "--train_minutes", "5", "--resume"), capsys,
               "--train_minutes 5", f"fixed its length at {steps} steps", "--gradient_steps N alone")
    main_error(train.main, args(data, root, "timed", 900, "--train_minutes", "0.01", "--resume"), capsys,
               "--gradient_steps 900", f"fixed its length at {steps} steps")
    said = notes(args(data, root, "timed", steps + 2, "--resume"), capsys)  # a count alone: trained to
    assert weights(root / "timed")["step"] == steps + 2
    assert any(line.startswith(f"note: --gradient_steps {steps + 2} moves the run's end; its schedules keep")
               for line in said)


def test_a_schedule_share_that_differs_on_resume_is_refused(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "r", 3, "--sigma_n", "0.5"))  # --lr_n the paper's 1.6e6 steps
    main_error(train.main, args(data, tmp_path, "r", 6, "--lr_n", "0.5", "--resume"), capsys, "--lr_n 0.5",
               "differs from the run being resumed (1600000.0)")
    main_error(train.main, args(data, tmp_path, "r", 6, "--sigma_n", "0", "--resume"), capsys, "--sigma_n 0.0",
               "(0.5)")
    train.main(args(data, tmp_path, "r", 6, "--lr_n", "1.6e6", "--sigma_n", "0.5", "--resume"))  # the same
    assert weights(tmp_path / "r")["state"] == {"steps": 6, "lr_n": 1.6e6, "sigma_n": 2, "timed_ms": 0.0}
