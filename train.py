"""Train a Generative Query Network: the procedure of Eslami et al. 2018, supplementary section "Training".

Each step takes B scenes; per scene M context views (x, v), M uniform in 1..K, and one other view as the query
(x_q, v_q) (gqn_dataset.TrainBatches). The loss is the negative ELBO, KL(posterior || prior) + NLL of x_q under
a Gaussian of pixel std sigma, in nats per image. Adam (0.9, 0.999, 1e-8), batch 36, 2M steps; the learning rate
anneals 5e-4 -> 5e-5 over 1.6M steps and sigma 2.0 -> 0.7 over 200K (scheduler.py). All randomness (scenes, views,
the posterior's noise eps) is a pure function of (seed, step, scene): a resumed run, or a run over several
processes, computes exactly what one uninterrupted process computes. Flags and presets: config.py; torchrun:
distributed.py; pictures: pictures.py; the end-of-run scores: evaluate.py.

    python train.py                                            # default job: built-in data, 'cpu' preset
    python train.py --train_data_dir D/train --test_data_dir D/test            # the paper's configuration
    python train.py --train_data_dir D/train --test_data_dir D/test --device_ids 0 1 2 3    # nn.DataParallel
    torchrun --nproc_per_node 4 train.py --train_data_dir D/train --test_data_dir D/test    # DDP, one node
    python train.py ... --resume                               # continue <root_log_dir>/<log_dir>

Run folder <root_log_dir>/<log_dir>/: config.json, TensorBoard events, checkpoints/ (latest.pt, step_*.pt),
samples.png (context views, ground truth and generated view per test scene, written at the end).
"""
import dataclasses
import json
from collections import namedtuple
import os
import secrets
import signal
import sys
import textwrap
import time
from contextlib import nullcontext

# OpenMP threads that spin while waiting made CPU training 5x slower whenever another process shared the cores
# (2.2 s instead of 0.43 s a step of the cpu preset on 2 busy cores); sleeping waits cost little when idle.
# Read when torch loads OpenMP, so set before importing it; an OMP_WAIT_POLICY of the user's own wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import config  # noqa: E402
from bad_scenes import BadScenes, DataStop  # noqa: E402
from batch_threads import BatchThreads, usable_cpus  # noqa: E402
from budget import StepBudget, fix_length, refit  # noqa: E402
from checkpoint import (atomic_write, checkpoint_paths, keep_newest, rng_state, run_to_resume,  # noqa: E402
                        save_checkpoint, set_rng_state)
from cli import UserError  # noqa: E402
from distributed import Dist, Stop, check_amp, pause_for_test, pick_device, worker_ignores_signals  # noqa: E402
from gqn_dataset import DatasetError, FixedViews, TrainBatches, Unreadable, open_split, to_model  # noqa: E402
from metrics import bits_per_dim, nll_floor  # noqa: E402
from model import objective  # noqa: E402
from pictures import save_samples, test_views_grid  # noqa: E402
from progress import progress_bar  # noqa: E402
from scheduler import anneal_steps, kl_weight, learning_rate, pixel_sigma  # noqa: E402

TEST_SCENES = 32      # the fixed test batch: test ELBO (spread over ranks), and the first IMAGE_SCENES as images
IMAGE_SCENES = 8
PRIOR_SAMPLES = 4     # generations per test scene in TensorBoard: where they differ, the model is unsure
SAMPLE_DRAWS = 4      # draws of z per scene in samples.png
TEST_CONTEXT = 3      # context views per test scene, as torch-gqn's test batch


class NonFiniteLoss(Exception):
    """The loss stopped being a number; the weights were not updated with it."""


class TestViews:
    """A fixed test batch: for scenes `ids`, TEST_CONTEXT fixed context views and one query view (FixedViews); scenes
    that cannot be read are left out, and named with `say`."""

    def __init__(self, ds, ids, seed, max_context, say=print):
        views = FixedViews(ds, min(TEST_CONTEXT, max_context), seed, ids)
        items = [views[k] for k in range(len(ids))]
        for u in items:
            if isinstance(u, Unreadable):
                say(f"warning: test scene {u.scene} cannot be read ({u.why}); the fixed test batch goes without it")
        items = [t for t in items if not isinstance(t, Unreadable)]
        if not items:
            raise DatasetError(f"--test_data_dir {ds.root}: none of the fixed test batch's {len(ids)} scenes can be "
                               f"read")
        x, v, x_q, v_q, _ = zip(*items)
        self.x, self.v = torch.stack(x), torch.stack(v)          # (T, K, 3, H, W) uint8, (T, K, 7)
        self.x_q, self.v_q = torch.stack(x_q), torch.stack(v_q)  # (T, 3, H, W) uint8, (T, 7)

    def first(self, n, size, device):
        """The first n scenes as the model takes them: x, v, v_q, x_q on device, images at `size`."""
        return (to_model(self.x[:n], size, device), self.v[:n].to(device), self.v_q[:n].to(device),
                to_model(self.x_q[:n], size, device))


def builtin_data(dist):
    """The default job's data: the built-in Shepard-Metzler set, rendered once into data/builtin/, a folder of its
    own (DeepMind's converted data of the same name goes to data/<name>); its split folders."""
    from dataset.shepard_metzler import dataset_name, render_once

    d = config.BUILTIN_DATA
    out = os.path.join("data", "builtin", dataset_name(d["parts"]))
    if dist.local_rank == 0:
        render_once(out, d["train_scenes"], d["test_scenes"], d["parts"], d["seed"], d["workers"])
    dist.barrier()
    return os.path.join(out, "train"), os.path.join(out, "test")


def open_run(cfg, given, dist):
    """A fresh run folder, or the run to resume (rank 0 reads latest.pt and sends it to every rank) -> cfg, ckpt."""
    run_dir = os.path.join(cfg.root_log_dir, cfg.log_dir)
    ckpt = dist.broadcast(dist.agreed((lambda: run_to_resume(run_dir, cfg.resume)) if dist.master else lambda: None))
    return (cfg, None) if ckpt is None else (config.resumed(cfg, given, ckpt["config"]), ckpt)


def model_and_optimizer(cfg, ckpt, device, dist, threads=1):
    """The GQN and Adam, restored from ckpt if given -> (model, the module to call, optimizer, start step).

    `model` stays the raw module (its state_dict is what checkpoints hold) whatever wraps it: DDP, DataParallel,
    torch.compile. A batch split over several threads averages its gradients over the ranks itself (no DDP).
    """
    from model import GQN

    torch.manual_seed(cfg.seed)
    model = GQN(**{kw: getattr(cfg, flag) for flag, kw in config.MODEL_FLAGS.items()},
                checkpoint_activations=cfg.checkpoint_activations, fov=cfg.fov, near=cfg.near, far=cfg.far)
    # fused: one kernel for all parameters instead of a loop of small ops (the paper model's step: 390 -> 50 ms on CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr_i, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                 fused=True)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # in place (param.data): the optimiser keeps its parameters
    # Adam's state follows its parameter's device and memory format (it was loaded on the CPU, contiguous).
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = torch.empty_like(p).copy_(v) if v.shape == p.shape else v.to(device)
    wrapped = model
    if dist.started and threads == 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif device.type == "cuda" and len(cfg.device_ids) > 1:
        if cfg.compile:
            raise UserError("--compile works on one device or under torchrun (DDP), not with nn.DataParallel "
                            "(--device_ids with several ids)")
        wrapped = torch.nn.DataParallel(model, device_ids=cfg.device_ids)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return model, wrapped, optimizer, start


def train(cfg, given):
    """One run; SIGINT/SIGTERM stop it in a state the same command with --resume continues exactly."""
    run_dir = os.path.join(cfg.root_log_dir, cfg.log_dir)
    latest = checkpoint_paths(run_dir)[1]
    saved, step_s = [None], [1.0]  # the step latest.pt holds (None: nothing saved yet); seconds a step takes
    with Dist() as dist:
        def continue_with():
            if saved[0] is None:
                return "nothing was saved: run the same command again"
            return f"{latest} holds step {saved[0]}: continue with the same command and --resume (or --resume auto)"

        def scored_later(name):  # training is over: only the end-of-run score was lost
            return (f"training finished at step {saved[0]} ({latest} holds it); {name} interrupted the end-of-run "
                    f"score: for the score, python evaluate.py --checkpoint {latest} --test_data_dir "
                    f"{stop.test_data_dir} --train_data_dir {stop.train_data_dir}")

        def give_up(name, why):  # the last word of a process that cannot stop at a step's end
            if stop.phase == "score":
                return scored_later(name) if dist.master else ""
            return f"error: rank {dist.rank} stopped by {name} ({why}; blocked in a collective?); {continue_with()}"

        with Stop(lambda: 10 + 3 * step_s[0], give_up, at_once=dist.started) as stop:
            try:
                run(cfg, given, dist, stop, saved, step_s)
            except KeyboardInterrupt as e:
                name = str(e) if str(e) in ("SIGINT", "SIGTERM") else "SIGINT"  # Stop names the signal
                code = 128 + signal.Signals[name].value
                if stop.phase == "score":
                    raise cli.Interrupted(scored_later(name), code) from None
                raise cli.Interrupted(f"interrupted by {name} {'before' if saved[0] is None else 'at'} "
                                      f"{'the first checkpoint' if saved[0] is None else f'step {saved[0]}'}: "
                                      f"{continue_with()}", code) from None


@dataclasses.dataclass
class Run:
    """What a run's steps share, as setup() builds it."""
    cfg: config.Config
    dist: Dist
    run_dir: str
    ckpt: dict            # the checkpoint resumed from, or None
    train_ds: object
    test_ds: object
    dataset: str
    max_context: int
    device: torch.device
    model: torch.nn.Module    # the raw module: its state_dict is what checkpoints hold
    wrapped: torch.nn.Module  # what a step calls: DDP, DataParallel or torch.compile around model, or model itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start: int
    saved: list           # [the step latest.pt holds, or None]
    threads: BatchThreads = None
    autocast: object = None
    test: TestViews = None
    test_eps: torch.Tensor = None
    writer: object = None
    bad: BadScenes = None     # the unreadable scenes met so far (bad_scenes.py)
    default_job: bool = False  # the cpu preset as it is, on the built-in data: budget.DEFAULT_JOB_SCORES applies

    @property
    def latest(self):
        return checkpoint_paths(self.run_dir)[1]

    def save(self, step, numbered):
        """latest.pt (and step_N.pt) on rank 0: weights, optimiser, scaler, config and RNG states at `step`."""
        if self.dist.master:
            ckpt = {"model": self.model.state_dict(), "model_config": dict(self.model.config),
                    "optimizer": self.optimizer.state_dict(), "step": int(step),
                    "scaler": self.scaler.state_dict(),  # {} without fp16
                    "config": json.loads(json.dumps(dataclasses.asdict(self.cfg))),
                    "data": {"dataset": self.dataset, "image_size": int(self.train_ds.image_size),
                             "max_context": int(self.max_context), "train_layout": self.train_ds.layout,
                             "test_layout": self.test_ds.layout},
                    "rng": rng_state(), "bad_scenes": self.bad.count if self.bad else 0}
            save_checkpoint(ckpt, [self.latest] + ([checkpoint_paths(self.run_dir, step)[2]] if numbered else []))
            keep_newest(checkpoint_paths(self.run_dir)[0], self.cfg.keep_checkpoints)
        self.saved[0] = step


def run(cfg, given, dist, stop, saved, step_s):
    """setup(), the steps with their logs, checkpoints and clock, then end_of_run()."""
    r = setup(cfg, given, dist, saved)
    cfg = r.cfg
    t_save = time.perf_counter()
    if r.ckpt is None:
        r.save(0, False)  # from here on a loadable latest.pt exists, whenever the run is killed
    t_save = time.perf_counter() - t_save
    total = cfg.gradient_steps  # with --train_minutes the most it can be, until the clock fixes it
    if r.start >= total:
        dist.log(f"{r.latest} is at step {r.start}, --gradient_steps is {total}: nothing to do")
        return
    prepare_steps(r)
    batches = TrainBatches(r.train_ds, cfg.batch_size, cfg.max_context or r.max_context, cfg.seed,
                           noise=r.model.training_noise(), rank=dist.rank, world_size=dist.world_size,
                           min_context=cfg.min_context)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(r.start, total),
                                         num_workers=cfg.workers, pin_memory=r.device.type == "cuda",
                                         worker_init_fn=worker_ignores_signals)
    clock = StepBudget(cfg.train_minutes if not cfg.timed_ms else 0, r.start, total, cfg.log_interval,
                       cfg.save_interval)
    clock.saved(t_save)
    # no time left shown while the run's length is not known; then the time left from the average over the run so
    # far, its pauses for logging included
    bar = progress_bar(total=None if clock.seconds else total, initial=r.start, desc="train (timing)" if clock.seconds
                   else "train", unit="step", disable=not dist.master, smoothing=0)
    # interval sums over all scenes of all ranks: ELBO, KL, NLL, the objective, each step's KL (train_step's values)
    acc = torch.zeros(4 + cfg.layers, dtype=torch.float64)
    n_acc, t0, last_step, skipped = 0, time.perf_counter(), r.start, 0  # skipped: fp16 steps the scaler skipped
    t_start = t0
    r.model.train()
    stream = iter(loader)  # draws the loader's base seed from the global RNG, as at the start of a fresh run
    if r.ckpt is not None:  # and from here on the RNG continues where the interrupted run left it
        set_rng_state(r.ckpt["rng"])
    stop.phase, stopped, done = "training", False, r.start
    try:
        for step, batch in enumerate(stream, r.start):
            t_step = time.perf_counter()
            done = step + 1
            logs = done % cfg.log_interval == 0 or done == total
            r.bad.check(step, batch)  # DataStop when the data cannot serve this step
            s = train_step(r, step, batch, total, stop, logs)
            values, stopped, skipped = s.values, s.stopped, skipped + s.skipped
            clock.step(step, time.perf_counter() - t_step)
            acc += values
            n_acc += cfg.batch_size
            bar.update(1)
            if dist.master:
                bar.set_postfix(loss=f"{-values[0].item() / cfg.batch_size:.1f}", refresh=False)
            if logs:
                elapsed = time.perf_counter() - t0
                t_log = time.perf_counter()
                log_metrics(r, bar, done, acc / n_acc, elapsed / (done - last_step), n_acc / elapsed, s,
                            (skipped, r.scaler.get_scale()) if r.scaler.is_enabled() else None)
                clock.logged(time.perf_counter() - t_log)
                acc.zero_()
                n_acc, t0, last_step, skipped = 0, time.perf_counter(), done, 0
            if done % cfg.save_interval == 0 or done == total:
                t_save = time.perf_counter()
                r.save(done, done % cfg.save_interval == 0)
                clock.saved(time.perf_counter() - t_save)
            record = lambda: write_config(cfg, r.run_dir) if dist.master else None  # noqa: E731
            if clock.due(done) and done < total:
                total = fix_length(cfg, clock, dist, bar, done, time.perf_counter() - t_start, record,
                                   r.device.type == "cpu", r.default_job)
            elif clock.fixed and done % cfg.log_interval == 0 and done < total:
                total = refit(cfg, clock, dist, bar, done, time.perf_counter() - t_start, record)
            step_s[0] = time.perf_counter() - t_step
            pause_for_test(f"step {done}")
            if stopped or (stop.requested and not dist.started):  # one process: the step in flight is the last
                stop.acted.set()
                break
            if done == total:  # a --train_minutes run that fixed its length below the loader's upper bound
                break
    except DataStop as e:
        bar.close()
        stopped_by_data(r, step, e)
    except NonFiniteLoss as e:
        bar.close()
        raise UserError(f"{e}; stopped without updating the weights. The last good checkpoint is kept: {r.latest} "
                        f"(step {saved[0]})") from None
    except Exception as e:
        raise dist.lost_contact(e, r.latest) or e
    finally:
        stop.phase = "score" if done == total and not stop.acted.is_set() else "setup"
        r.threads.close()
    bar.close()
    if stop.acted.is_set():
        stopped_at(r, done, stop.requested or "SIGTERM")  # a peer's signal
    stop.train_data_dir, stop.test_data_dir = cfg.train_data_dir, cfg.test_data_dir
    pause_for_test("score")
    end_of_run(r, total)
    dist.finish()


def setup(cfg, given, dist, saved):
    """The run folder (fresh, or the run to resume), the data, the config printed and written, the model and its
    optimiser -> Run."""
    log = dist.log
    cfg, ckpt = open_run(cfg, given, dist)
    default_job = ckpt is None and not cfg.train_data_dir and not cfg.test_data_dir
    run_dir = os.path.join(cfg.root_log_dir, cfg.log_dir)
    dist.agreed(lambda: config.check_config(cfg, dist.world_size))
    if cfg.seed < 0:
        cfg.seed = dist.broadcast(secrets.randbelow(2**31))
    if default_job:
        steps = (f"as many steps of {cfg.batch_size} scenes as fit into {cfg.train_minutes:g} minutes on this CPU, "
                 f"at most {cfg.gradient_steps}" if cfg.train_minutes else
                 f"{cfg.gradient_steps} steps of {cfg.batch_size} scenes")
        log(f"No data folders given: the default job. It trains the '{cfg.preset}' preset, a small GQN for a 2-core "
            f"CPU (L={cfg.layers}, {cfg.image_size}x{cfg.image_size} images, {steps}), on the built-in "
            f"Shepard-Metzler set, into {run_dir}/. Pass --train_data_dir and --test_data_dir for the paper's "
            f"configuration.")
        cfg.train_data_dir, cfg.test_data_dir = builtin_data(dist)

    def open_data():  # a resumed run reads the files its run began with, damaged or not, as that run did
        layouts = (ckpt or {}).get("data", {})
        train_ds = open_split(cfg.train_data_dir, "--train_data_dir", layouts.get("train_layout"))
        test_ds = open_split(cfg.test_data_dir, "--test_data_dir", layouts.get("test_layout"))
        return train_ds, test_ds, config.resolve_dataset(cfg.dataset, train_ds, test_ds, cfg)

    train_ds, test_ds, (dataset, max_context, k_from) = dist.agreed(open_data)
    for _, why in train_ds.unreadable + test_ds.unreadable:
        log(f"warning: {why}; its scenes are skipped where met")
    cfg.dataset = dataset  # resolved, so config.json and the checkpoints say what was trained on
    from_data = config.camera_from_data(cfg, given, train_ds) if ckpt is None else {}
    dist.agreed(lambda: config.check_camera(cfg))  # the data's values beside any given by flag
    # absolute, so that --resume finds the data from any working directory
    cfg.train_data_dir, cfg.test_data_dir = os.path.abspath(cfg.train_data_dir), os.path.abspath(cfg.test_data_dir)
    device = dist.agreed(lambda: pick_device(cfg.device_ids, dist))
    dist.agreed(lambda: check_amp(cfg.amp, device))
    if dist.master:
        os.makedirs(checkpoint_paths(run_dir)[0], exist_ok=True)
        resolved = dataclasses.asdict(cfg)
        print(f"config ({'resumed from ' + checkpoint_paths(run_dir)[1] if ckpt else run_dir}):")
        print(textwrap.fill("  ".join(f"{k}={v}" for k, v in resolved.items()), 118, initial_indent="  ",
                            subsequent_indent="  ", break_on_hyphens=False))
        print(f"  K={max_context}: {k_from}" + (f"; from the data's camera model: "
                                               f"{'  '.join(f'{k}={v:g}' for k, v in from_data.items())}"
                                               if from_data else ""))
        write_config(cfg, run_dir)

    threads = share_threads(cfg, device, dist)
    model, wrapped, optimizer, start = model_and_optimizer(cfg, ckpt, device, dist, threads)
    saved[0] = None if ckpt is None else start
    if ckpt is not None:
        log(f"Resuming {run_dir} at step {start} ({checkpoint_paths(run_dir)[1]})")
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and params > 20e6:  # torch-gqn's command on a laptop: say so before the first step
        log(f"note: training a {params / 1e6:.0f}M-parameter GQN at batch {cfg.batch_size} on the CPU: a step may take "
            f"minutes. For a run sized for a CPU, the same command with --preset cpu")
    if device.type == "cpu" and not dist.on and len(cfg.device_ids) > 1 and "device_ids" in given:
        log("note: no CUDA device, so --device_ids is ignored and training runs on the CPU")
    log(f"GQN: {params / 1e6:.2f}M parameters, representation "
        f"{cfg.representation}, L={cfg.layers}; data {dataset} ({len(train_ds)} train / {len(test_ds)} test scenes, "
        f"{train_ds.image_size}px"
        f"{'' if train_ds.image_size == cfg.image_size else f' resized to {cfg.image_size}px'}, K={max_context}, "
        f"{cfg.min_context}-{min(cfg.max_context or max_context, train_ds.views - 1)} context views a scene); "
        f"device {device}{f' x {dist.world_size} processes' if dist.started else ''}"
        f"{f', batch split over {threads} threads' if threads > 1 else ''}")

    # fp16: the loss scaled so small gradients do not flush to zero; a step whose gradients overflow is skipped and
    # the scale halved. Its state goes into every checkpoint, so a resumed run scales (and skips) as this one would.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    if ckpt is not None and ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    return Run(cfg=cfg, dist=dist, run_dir=run_dir, ckpt=ckpt, train_ds=train_ds, test_ds=test_ds, dataset=dataset,
               max_context=max_context, device=device, model=model, wrapped=wrapped, optimizer=optimizer,
               scaler=scaler, start=start, saved=saved, threads=BatchThreads(threads),
               default_job=default_job and config.is_cpu_preset(cfg))


def share_threads(cfg, device, dist):
    """Threads a step's batch is split over (batch_threads.py): --batch_threads, 0 = a core each of this process's
    share of the CPUs (under torchrun the ranks on this machine share them); 1 on a GPU and with --compile."""
    if device.type != "cpu" or cfg.compile:
        return 1
    return cfg.batch_threads or max(1, usable_cpus() // dist.local_world_size)


def prepare_steps(r):
    """What the steps need besides the model: the fixed test batch, TensorBoard's writer (rank 0) and autocast."""
    cfg = r.cfg
    # The fixed test batch, the same for every run with this seed; ranks split its test ELBO between them.
    t = min(TEST_SCENES, len(r.test_ds))
    r.test = TestViews(r.test_ds, np.linspace(0, len(r.test_ds) - 1, t).round().astype(int).tolist(), cfg.seed,
                       r.max_context, r.dist.log)
    r.test_eps = torch.randn((t, *r.model.noise_shape), generator=torch.Generator().manual_seed(cfg.seed))
    r.test_eps = r.test_eps[:len(r.test.x)]  # one for each scene kept
    if r.dist.master:
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard drops what an interrupted run logged after the checkpoint it starts from.
        r.writer = SummaryWriter(logdir=r.run_dir, purge_step=r.start + 1)
    r.bad = BadScenes(cfg.max_bad_scenes, len(r.train_ds), cfg.batch_size, r.dist,
                      r.ckpt.get("bad_scenes", 0) if r.ckpt else 0, r.device)
    # bf16 or fp16 autocast (or nothing), built once; the loss itself is always taken in float32.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    r.autocast = torch.autocast(r.device.type, dtype=half) if half else nullcontext()


Step = namedtuple("Step", ["values", "stopped", "sigma", "lr", "beta", "skipped", "grad_norm"])


def train_step(r, step, batch, total, stop, logs=False):
    """One gradient step on `batch` -> Step: the batch's ELBO, KL, NLL sums over all ranks, whether every rank stops
    after it, sigma, lr, whether fp16's scaler skipped it, and with `logs` the gradient's norm (else None)."""
    cfg, device, model = r.cfg, r.device, r.model
    # lr_n/sigma_n are the whole run (0) or a share of it only until a --train_minutes run has fixed its length
    lr = learning_rate(step, cfg.lr_i, cfg.lr_f, anneal_steps(cfg.lr_n, total))
    sigma = pixel_sigma(step, cfg.sigma_i, cfg.sigma_f, anneal_steps(cfg.sigma_n, total))
    beta = kl_weight(step, cfg.kl_warmup)
    for group in r.optimizer.param_groups:
        group["lr"] = lr
    x = to_model(batch["x"], cfg.image_size, device)        # (b, K, 3, s, s)
    x_q = to_model(batch["x_q"], cfg.image_size, device)    # (b, 3, s, s)
    if cfg.channels_last:
        x_q = x_q.contiguous(memory_format=torch.channels_last)
    v, v_q, mask = batch["v"].to(device), batch["v_q"].to(device), batch["mask"].to(device)
    noise = {k: batch[k].to(device) for k in model.training_noise()}  # eps, and volume's depth jitter
    # A compiled graph would specialise on a Python float and recompile for every new sigma.
    sigma_in = torch.tensor(sigma, device=device) if cfg.compile else sigma
    b = x.shape[0]
    unit = r.scaler.scale(torch.ones((), device=device))  # the fp16 loss scale; 1 otherwise
    # several threads call the raw module and average over ranks themselves (batch_threads.py); one calls the wrapper
    net = model if r.threads.n > 1 else r.wrapped

    def loss_of(share):  # a share of the batch, or all of it
        with r.autocast:
            out = net(x[share], v[share], v_q[share], x_q[share], sigma_in, mask=mask[share],
                      **{k: n[share] for k, n in noise.items()})
        loss = objective(out, beta, cfg.free_bits)  # (share,): -ELBO, unless KL warm-up or free bits are asked for
        # The loss is the mean over this rank's b = B/W scenes: DDP averages gradients over the W ranks,
        # which makes the gradient of the mean over all B scenes, as one process computes it.
        values = torch.cat([torch.stack([out.elbo.float().sum(), out.kl.float().sum(), out.nll.float().sum(),
                                         loss.sum()]), out.kl_steps.float().sum(0)])
        return loss.sum() / b * unit, values.detach()

    average = r.dist.average if r.dist.started and r.threads.n > 1 else None
    sums = r.threads.step(loss_of, b, model.parameters(), average)
    # Summed over ranks with a stop flag, so that every rank stops after the same step.
    stats = r.dist.all_reduce(torch.cat([sums, sums.new_tensor([float(stop.requested is not None)])]).double())
    stats = stats.cpu()
    values, stopped = stats[:-1], bool(stats[-1] > 0)
    if not torch.isfinite(values[:4]).all():  # same verdict on every rank: all stop before the update
        raise NonFiniteLoss(f"step {step}: the loss is not finite (ELBO {values[0] / cfg.batch_size:.4g}, "
                            f"KL {values[1] / cfg.batch_size:.4g}, NLL {values[2] / cfg.batch_size:.4g})")
    if cfg.grad_clip > 0:
        r.scaler.unscale_(r.optimizer)  # clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scale = r.scaler.get_scale()
    grad_norm = None
    if logs:  # the whole batch's gradient (averaged over ranks, unscaled): a sum where a mean was meant shows here
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in
                                                          model.parameters() if p.grad is not None])).item()
        grad_norm /= scale if r.scaler.is_enabled() and not cfg.grad_clip > 0 else 1.0
    r.scaler.step(r.optimizer)  # skipped when the gradients hold inf/NaN (fp16 only), as on every DDP rank
    r.scaler.update()
    r.optimizer.zero_grad(set_to_none=True)
    # the scale only drops after a skipped step
    return Step(values, stopped, sigma, lr, beta, r.scaler.get_scale() < scale, grad_norm)


def end_of_run(r, total):
    """Rank 0: samples.png, the whole test split scored as evaluate.py scores it (TensorBoard's eval/*), the last
    lines."""
    if not r.dist.master:
        return
    cfg, model, device = r.cfg, r.model, r.device
    model.eval()
    n = min(IMAGE_SCENES, len(r.test_eps))
    x, v, v_q, x_q = r.test.first(n, cfg.image_size, device)
    g = torch.Generator(device).manual_seed(cfg.seed)
    with torch.no_grad(), r.autocast:
        draws = torch.stack([model.generate(x, v, v_q, generator=g).float() for _ in range(SAMPLE_DRAWS)])
    samples = os.path.join(r.run_dir, "samples.png")
    save_samples(samples, x, x_q, draws)
    import evaluate

    s = evaluate.end_of_training(r.writer, total, model, r.train_ds, r.test_ds, min(TEST_CONTEXT, r.max_context),
                                 cfg.seed, device, cfg.image_size)
    left_out = f", {len(s['unreadable'])} left out: they cannot be read" if s["unreadable"] else ""
    r.dist.log(f"Test split ({s['scenes']} scenes{left_out}, {s['context']} context views): RMSE {s['rmse']:.2f} vs "
               f"{s['mean_image_rmse']:.2f} for the mean training image (ratio {s['rmse_ratio']:.3f}), MAE "
               f"{s['mae']:.2f}")
    r.writer.close()
    if r.bad.count:
        r.dist.log(f"Skipped {r.bad.count} reads of unreadable training scenes (each named above), their places "
                   f"filled from other scenes")
    r.dist.log(f"Done: {total} step{'s' if total != 1 else ''}. Checkpoint {r.latest}; TensorBoard: tensorboard "
               f"--logdir {r.run_dir}; ground truth next to {SAMPLE_DRAWS} draws, their spread and error: {samples}")


def stopped_by_data(r, step, e):
    """The data cannot serve `step`: latest.pt at the step reached (rank 0, as after SIGTERM), then one line."""
    if r.dist.master:
        if r.saved[0] != step:
            r.save(step, False)
        r.writer.close()
    raise UserError(f"{e}. {r.latest} holds step {step}: repair or remove the damaged files (named above), or raise "
                    f"--max_bad_scenes, then continue with the same command and --resume") from None


def write_config(cfg, run_dir):
    """config.json: the run's resolved configuration, as the checkpoints hold it (written atomically)."""
    text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
    atomic_write(os.path.join(run_dir, "config.json"), text.encode())


def stopped_at(r, step, name):
    """After SIGINT/SIGTERM: rank 0 writes latest.pt from its own state (no collective: a peer may be gone), says
    where the run stopped, and every rank exits."""
    dist = r.dist
    if dist.master:
        if r.saved[0] != step:
            r.save(step, False)
        r.writer.close()
        print(f"stopped by {name} at step {step}: {r.latest} holds it; continue with the same command and --resume "
              f"(or --resume auto)", file=sys.stderr, flush=True)
    code = 128 + signal.Signals[name].value
    if dist.started:  # no teardown that could wait on a peer
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


@torch.no_grad()
def log_metrics(r, bar, step, means, ms_step, scenes_s, last, scaling=None):
    """Test ELBO on the fixed test batch (spread over ranks), then, on rank 0, TensorBoard and one log line."""
    cfg, writer, model, test, test_eps, dist, device, autocast = (r.cfg, r.writer, r.model, r.test, r.test_eps, r.dist,
                                                                  r.device, r.autocast)
    sigma, lr = last.sigma, last.lr
    model.eval()
    mine = list(range(dist.rank, len(test_eps), dist.world_size))  # this rank's share of the test batch
    test_sums = torch.zeros(3, dtype=torch.float64, device=device)
    if mine:
        idx = torch.tensor(mine)
        with autocast:
            out = model(to_model(test.x[idx], cfg.image_size, device), test.v[idx].to(device),
                        test.v_q[idx].to(device), to_model(test.x_q[idx], cfg.image_size, device), sigma,
                        eps=test_eps[idx].to(device))
        test_sums = torch.stack([out.elbo.sum(), out.kl.sum(), out.nll.sum()]).double()
    test_means = (dist.all_reduce(test_sums) / len(test_eps)).cpu()
    if writer is not None:
        dims = 3 * cfg.image_size * cfg.image_size
        elbo, kl, nll, loss = means[:4].tolist()
        floor = nll_floor(sigma, dims)
        for split, (e, k, n) in (("train", (elbo, kl, nll)), ("test", test_means.tolist())):
            writer.add_scalar(f"{split}/elbo", e, step)
            writer.add_scalar(f"{split}/kl", k, step)
            writer.add_scalar(f"{split}/nll", n, step)
            writer.add_scalar(f"{split}/bits_per_dim", bits_per_dim(-e, dims), step)
            writer.add_scalar(f"{split}/nll_minus_sigma_floor", n - floor, step)
        writer.add_scalar("schedule/sigma", sigma, step)
        writer.add_scalar("schedule/lr", lr, step)
        writer.add_scalar("train/grad_norm", last.grad_norm, step)
        # the objective the gradient follows (-ELBO without KL warm-up and free bits), beta, and each step's true KL:
        # where the information about the query view goes, and whether the latent is used at all
        writer.add_scalar("train/objective", loss, step)
        writer.add_scalar("schedule/kl_weight", last.beta, step)
        for l, kl_l in enumerate(means[4:].tolist(), 1):
            writer.add_scalar(f"train/kl_step_{l}", kl_l, step)
        writer.add_scalar("speed/scenes_per_s", scenes_s, step)
        writer.add_scalar("data/skipped_scenes", r.bad.count, step)
        writer.add_scalar("speed/ms_per_step", 1000 * ms_step, step)
        if scaling is not None:  # fp16: steps skipped in this interval (gradients overflowed), the loss scale now
            writer.add_scalar("amp/skipped_steps", scaling[0], step)
            writer.add_scalar("amp/loss_scale", scaling[1], step)
        # Images: the first scenes of the test batch; noise from fixed seeds so the grids differ only by training.
        x, v, v_q, x_q = test.first(min(IMAGE_SCENES, len(test_eps)), cfg.image_size, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
            torch.manual_seed(cfg.seed)
            rec = model.reconstruct(x, v, v_q, x_q)
            gen = torch.stack([model.generate(x, v, v_q, generator=torch.Generator(device).manual_seed(cfg.seed + k))
                               for k in range(PRIOR_SAMPLES)])
        writer.add_image("test/views", test_views_grid(x, x_q, rec.float(), gen.float()), step, dataformats="HWC")
        writer.flush()
        bar.write(f"step {step:>7d} | ELBO {elbo:9.1f} KL {kl:7.2f} NLL {nll:9.1f} (sigma floor {floor:7.1f}) | "
                  f"test ELBO {test_means[0]:9.1f} | {bits_per_dim(-elbo, dims):.3f} bits/dim | sigma {sigma:.3f} "
                  f"lr {lr:.2e} | {1000 * ms_step:6.0f} ms/step {scenes_s:6.1f} scenes/s" +
                  (f" | fp16: {scaling[0]} skipped, scale {scaling[1]:g}" if scaling is not None else "") +
                  (f" | {r.bad.count} unreadable scene reads skipped" if r.bad.count else ""))
    model.train()


def main(argv=None):
    cli.main(lambda argv: train(*config.parse_args(argv)), argv)


if __name__ == "__main__":
    main()
