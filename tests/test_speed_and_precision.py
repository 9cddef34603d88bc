"""train.py on any CPU and GPU: --train_minutes fits a run to a time budget, the batch split over the CPU's cores,
fp16 with loss scaling, bf16 refused where it would be emulated, and what a step costs said early."""
import json
import os
import re
import threading

import pytest
import torch

import config
import train
from batch_threads import BatchThreads, usable_cpus
from conftest import TINY_GQN, args, random_batch, run_script, script_error, weights
import distributed
from distributed import cpu_has_bf16


def read_config(run):
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ run length

def test_train_minutes_fixes_the_length_records_it_and_a_resume_keeps_it(data, tmp_path, capsys):
    # A budget spent long before the timing ends: the run takes one more step after it and stops there.
    budget = args(data, tmp_path, "budget", 400, "--train_minutes", "0.001", "--lr_n", "0", "--sigma_n", "0",
                  "--log_interval", "100", "--save_interval", "100")
    train.main(budget)
    out = capsys.readouterr().out
    assert "Timed the first 200 steps" in out and "so the run takes 201 steps" in out
    assert "for a run this short, give --gradient_steps instead of --train_minutes" in out
    cfg, ckpt = read_config(tmp_path / "budget"), weights(tmp_path / "budget")
    # config.json and the checkpoint: the flags as given, and the run's state as the budget fixed it
    assert ckpt["step"] == 201 and ckpt["state"] == cfg["state"] and cfg["state"]["steps"] == 201
    assert cfg["gradient_steps"] == 400 and cfg["train_minutes"] == 0.001 and cfg["state"]["timed_ms"] > 0
    # the cpu-style "whole run" schedules resolved to the fixed length
    assert cfg["lr_n"] == cfg["sigma_n"] == 0 and cfg["state"]["lr_n"] == cfg["state"]["sigma_n"] == 201
    # The same command with --resume: --gradient_steps 400 is the bound the budget already used, not a new length.
    train.main(budget + ["--resume"])
    assert "nothing to do" in capsys.readouterr().out
    # A count asked for without a budget is a count: the run continues to it.
    train.main(args(data, tmp_path, "budget", 204, "--resume"))
    assert weights(tmp_path / "budget")["step"] == 204


def test_gradient_steps_alone_turns_the_budget_off_and_the_cpu_preset_has_one():
    cpu, _ = config.parse_args([])
    assert cpu.train_minutes > 0 and cpu.lr_n == config.WHOLE_RUN  # resolved when the clock fixes the length
    exact, _ = config.parse_args(["--gradient_steps", "300"])
    assert exact.train_minutes == 0 and config.RunState.start(exact) == config.RunState(300, 300, 240)
    both, _ = config.parse_args(["--gradient_steps", "300", "--train_minutes", "5"])
    assert both.train_minutes == 5 and both.gradient_steps == 300  # the most it may take


def test_a_run_says_what_a_step_costs_after_its_first_steps(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "note", 6))
    out = capsys.readouterr().out
    assert re.search(r"note: a step takes \d+ ms here \(with logging and checkpoints\): the 3 steps left take "
                     r"about \d+ s", out)


def test_workers_default_to_what_the_machine_gives():
    paper, _ = config.parse_args(["--train_data_dir", "a", "--test_data_dir", "b"])
    assert paper.workers == min(4, usable_cpus())
    assert config.parse_args(["--train_data_dir", "a", "--test_data_dir", "b", "--workers", "3"])[0].workers == 3


# ------------------------------------------------------------------------------------------------ cores

def test_batch_threads_split_evenly_and_sum_gradients_in_share_order_whoever_finishes_first():
    threads = BatchThreads(3)
    assert threads.shares(8) == [slice(0, 2), slice(2, 5), slice(5, 8)]
    assert threads.shares(2) == [slice(0, 1), slice(1, 2)]
    # Gradients whose float32 sum depends on the order: (1e8 - 1e8) + 1 = 1, but (-1e8 + 1) + 1e8 = 0. The first
    # share finishes last; summed in share order the gradient is still 1.
    p = torch.nn.Parameter(torch.zeros(()))
    coefficient = [1e8, -1e8, 1.0]
    others_done = threading.Semaphore(0)  # released by shares 1 and 2 at the end of their backward

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.k = k
            return x * coefficient[k]

        @staticmethod
        def backward(ctx, grad):
            if ctx.k:
                others_done.release()
            else:  # share 0 finishes last
                others_done.acquire()
                others_done.acquire()
            return grad * coefficient[ctx.k], None

    def loss_of(share):
        return Scale.apply(p, share.start), torch.tensor(float(share.start))

    for _ in range(3):
        p.grad = None
        assert threads.step(loss_of, 3, [p]).item() == 0 + 1 + 2
        assert p.grad.item() == 1.0
    threads.close()


def test_kernel_size_reaches_the_cores_and_an_even_one_is_refused(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "k3", 1, "--kernel_size", "3"))
    ckpt = weights(tmp_path / "k3")
    assert ckpt["model_config"]["kernel_size"] == 3
    assert ckpt["model"]["generation_core.cells.0.gates.weight"].shape[-2:] == (3, 3)
    assert ckpt["model"]["prior.weight"].shape[-2:] == (3, 3)
    with pytest.raises(SystemExit) as e:
        train.main(args(data, tmp_path, "k4", 1, "--kernel_size", "4"))
    assert e.value.code == 1 and "--kernel_size 4: must be odd" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ precision

def test_fp16_scales_the_loss_counts_skipped_steps_and_resumes_exactly(data, tmp_path, capsys, monkeypatch):
    # Loss scaling is what this tests, and it is the same code on a GPU; on a CPU without float16 instructions the
    # run is refused (below), so the check is told this one has them: the tiny model's steps are slow, not wrong.
    monkeypatch.setattr(distributed, "cpu_has_fp16", lambda: True)
    train.main(args(data, tmp_path, "whole", 6, "--amp", "fp16"))
    out = capsys.readouterr().out
    # GradScaler starts at 2^16: the first steps' scaled gradients overflow float16, are skipped and counted, and
    # the run goes on (a skipped step is not a non-finite loss).
    skipped = [int(n) for n in re.findall(r"fp16: (\d+) skipped, scale", out)]
    assert len(skipped) == 2 and skipped[0] > 0
    a = weights(tmp_path / "whole")
    assert a["scaler"]["scale"] == 2.0 ** (16 - sum(skipped))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "whole"))
    acc.Reload()
    assert [int(e.value) for e in acc.Scalars("amp/skipped_steps")] == skipped
    assert [e.value for e in acc.Scalars("amp/loss_scale")][-1] == a["scaler"]["scale"]
    train.main(args(data, tmp_path, "parts", 3, "--amp", "fp16"))
    train.main(args(data, tmp_path, "parts", 6, "--amp", "fp16", "--resume"))
    b = weights(tmp_path / "parts")
    assert b["scaler"] == a["scaler"]
    assert all(torch.equal(b["model"][k], a["model"][k]) for k in a["model"])
    assert all(torch.equal(b["optimizer"]["state"][i]["exp_avg"], a["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])


def test_fp16_keeps_the_kl_and_the_likelihood_in_float32():
    from model import GQN

    torch.manual_seed(0)
    model = GQN(representation="tower", L=2, **TINY_GQN)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(*random_batch(), 1.0)
    assert out.elbo.dtype == out.kl.dtype == out.nll.dtype == torch.float32


# oneDNN held to AVX2 emulates both half precisions, whatever the CPU (avx512_bf16, avx512_fp16, AMX held back)
CPU_WITHOUT_HALF = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
REFUSED = {"bf16": ("--amp bf16: oneDNN has no bf16 instructions to use here", "21x slower than float32"),
           "fp16": ("--amp fp16: oneDNN has no float16 instructions to use here", "20-50x (the paper's")}


@pytest.mark.parametrize("command, amp", [("train", "bf16"), ("train", "fp16"), ("bench", "bf16")])  # bench: bf16
def test_half_precision_is_refused_on_a_cpu_that_would_emulate_it(data, tmp_path, command, amp):
    argv = (args(data, tmp_path, amp, 1, "--amp", amp) if command == "train" else
            ["--amp", amp, "--preset", "small", "--steps", "1", "--repeats", "1"])
    line = script_error(run_script(f"{command}.py", *argv, env=CPU_WITHOUT_HALF), *REFUSED[amp])
    assert line.endswith("use --amp none")
    assert not (tmp_path / amp / "checkpoints").exists()


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions: --amp bf16 is refused here")
def test_bf16_trains_where_the_cpu_has_it(data, tmp_path):
    train.main(args(data, tmp_path, "bf16", 2, "--amp", "bf16"))
    train.main(args(data, tmp_path, "fp32", 2))
    half, full = weights(tmp_path / "bf16"), weights(tmp_path / "fp32")
    # the same two steps computed in bf16: not float32's weights bit for bit, but near them
    assert half["config"]["amp"] == "bf16" and any(not torch.equal(half["model"][k], full["model"][k])
                                                   for k in full["model"])
    for k in full["model"]:
        torch.testing.assert_close(half["model"][k], full["model"][k], atol=2e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_fp16_on_cuda_resumes_with_its_loss_scale(data, tmp_path):
    train.main(args(data, tmp_path, "whole", 6, "--amp", "fp16"))
    train.main(args(data, tmp_path, "resumed", 3, "--amp", "fp16"))
    train.main(args(data, tmp_path, "resumed", 6, "--amp", "fp16", "--resume"))
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert whole["scaler"] == resumed["scaler"] and whole["scaler"]["scale"] <= 2.0 ** 16  # the loss was scaled
    for k in whole["model"]:
        torch.testing.assert_close(resumed["model"][k], whole["model"][k], atol=1e-4, rtol=0)


def test_bench_times_the_batch_split(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--preset", "small", "--batch_size", "4", "--image_size", "16", "--steps", "1",
                   "--warmup", "0", "--repeats", "1", "--batch_threads", "2", "--json", out, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batch over 2 threads" in r.stdout and "reference (float32)" in r.stdout
    assert out.stat().st_size > 0


def test_bench_times_a_cpu_preset_share_against_another_revision():
    argv = ["--preset", "cpu-share", "--image_size", "16", "--steps", "1", "--warmup", "0", "--repeats", "1",
            "--threads", "1"]
    r = run_script("bench.py", *argv, "--against", "HEAD", "--profile", "1", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| volume L=4 unshared B=4 M=3 16px | model.py at HEAD |" in r.stdout and "vs model.py at HEAD" in r.stdout
    assert "reference" not in r.stdout and "aten::convolution_backward" in r.stderr  # the profile
    assert script_error(run_script("bench.py", *argv, "--against", "no-such-revision")) == \
        "error: --against no-such-revision: not a git revision of this checkout with a model.py"


def test_bench_data_runs_on_a_fresh_clone_with_the_renderers_scenes(tmp_path):
    r = run_script("bench_data.py", "--scenes", "8", "--batch", "4", "--steps", "2", "--scenes_from", "renderer")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "two of the built-in renderer" in r.stdout and "| full scene (15 views), converted shards" in r.stdout
