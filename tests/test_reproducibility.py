"""The randomness contract: a step is a pure function of (seed, step, scenes), whatever the machine's shape.

The matrix {one process, 2 torchrun ranks} x {pool, volume} x {--batch_threads 1, 2, 3}: each configuration is run
whole; those with 3 threads (the batch split unevenly, the hardest case) are run again stopped half-way and resumed,
and the two end with the same weights, bit for bit (1 and 2 threads resume by the same code, and each resumed run
costs two more launches). Across the matrix
(the same function, with the gradients of the batch's shares and ranks added in another order) every step's losses
(ELBO, KL, NLL over the whole batch), gradient norm and test ELBO equal one process's to 1e-5 relative, and the
weights after 6 steps to 1e-5 (measured: 1e-6 and 1e-6). A rank or a thread that drew other noise for a scene (the
volume's depth jitter from a per-process RNG, say) moves weights by up to lr = 5e-4 in one step.
"""
import itertools
import os
import subprocess

import pytest
import torch

import train
from conftest import args, torchrun, weights

STEPS, HALF = 6, 3
RESUMED_THREADS = 3
MATRIX = list(itertools.product((1, 2), ("pool", "volume"), (1, 2, 3)))  # processes, representation, batch_threads


def launch(data, root, name, steps, procs, representation, threads, *extra):
    argv = args(data, root, name, steps, "--representation", representation, "--batch_threads", str(threads),
                "--log_interval", "1", *extra)
    if procs == 1:
        train.main(argv)
        return
    cmd, env = torchrun(argv, rdzv="--resume" in extra)  # resumed through c10d, the README's several-node launch
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Done:") == 1  # rank 0 alone reports


def curves(run):
    """Every step's scalars a run logged: train/elbo, kl, nll, grad_norm and test/elbo -> {tag: [values]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)]
            for tag in ("train/elbo", "train/kl", "train/nll", "train/grad_norm", "test/elbo")}


@pytest.mark.slow
def test_same_weights_whatever_the_processes_threads_and_resumes(data, tmp_path):
    runs = {}
    for procs, representation, threads in MATRIX:
        name = f"{procs}p-{representation}-{threads}t"
        config = (procs, representation, threads)
        launch(data, tmp_path, name + "-whole", STEPS, *config)
        runs[config] = weights(tmp_path / (name + "-whole")), curves(tmp_path / (name + "-whole"))
        if threads != RESUMED_THREADS:
            continue
        launch(data, tmp_path, name + "-resumed", HALF, *config)
        launch(data, tmp_path, name + "-resumed", STEPS, *config, "--resume")
        whole, resumed = runs[config][0], weights(tmp_path / (name + "-resumed"))
        assert whole["step"] == resumed["step"] == STEPS
        for k in whole["model"]:  # the same configuration: bit for bit, stopped and resumed or not
            assert torch.equal(whole["model"][k], resumed["model"][k]), (name, k)
        if procs == 2:  # rank 0 alone writes: one checkpoints folder, TensorBoard events only in the run folder
            run = tmp_path / (name + "-resumed")
            assert not any(k.startswith("module.") for k in resumed["model"])
            assert sorted(os.listdir(run / "checkpoints")) == ["latest.pt", "step_00000003.pt", "step_00000006.pt"]
            assert len([p for p in run.rglob("events.out.tfevents.*") if p.parent == run]) == 2  # one a launch
    for (procs, representation, threads), (ckpt, logged) in runs.items():
        ref_ckpt, ref_logged = runs[(1, representation, 1)]
        for tag, values in logged.items():  # another configuration: the same function, summed in another order
            assert len(values) == STEPS, tag
            assert values == pytest.approx(ref_logged[tag], rel=1e-5), (procs, representation, threads, tag)
        for k in ckpt["model"]:
            torch.testing.assert_close(ckpt["model"][k], ref_ckpt["model"][k], atol=1e-5, rtol=0)
