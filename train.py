"""Train a Generative Query Network: the procedure of Eslami et al. 2018, supplementary section "Training".

Each step takes B scenes; per scene M context views (x, v), M uniform in 1..K, and one other view as the query
(x_q, v_q) (sampling.TrainBatches). The loss is the negative ELBO, KL(posterior || prior) + NLL of x_q under
a Gaussian of pixel std sigma, in nats per image. Adam (0.9, 0.999, 1e-8), batch 36, 2M steps; the learning rate
anneals 5e-4 -> 5e-5 over 1.6M steps and sigma 2.0 -> 0.7 over 200K (scheduler.py). All randomness (scenes, views,
the posterior's noise eps) is a pure function of (seed, step, scene): a resumed run, or a run over several
processes, computes exactly what one uninterrupted process computes.

This file reads top to bottom: setup (the run resolved once: resolve.py; the model, its optimiser, the run folder),
the loop (schedules, forward/backward, clip/step, log, checkpoint, the run's length, stop), the end (samples.png and
the end-of-run score). Flags and presets: config.py; what the run shows: monitor.py; signals: stops.py; torchrun:
distributed.py; the checkpoint's schema: checkpoint.py; the scores: evaluate.py.

    python train.py                                            # default job: built-in data, 'cpu' preset
    python train.py --train_data_dir D/train --test_data_dir D/test            # the paper's configuration
    python train.py --train_data_dir D/train --test_data_dir D/test --device_ids 0 1 2 3    # nn.DataParallel
    torchrun --nproc_per_node 4 train.py --train_data_dir D/train --test_data_dir D/test    # DDP, one node
    python train.py ... --resume                               # continue <root_log_dir>/<log_dir>

Run folder <root_log_dir>/<log_dir>/: config.json (the config and the run's state), TensorBoard events,
checkpoints/ (latest.pt, step_*.pt), samples.png (context views, ground truth and draws per test scene, at the end).
"""
import os

# OpenMP threads that spin while waiting made CPU training 5x slower whenever another process shared the cores
# (2.2 s instead of 0.43 s a step of the cpu preset on 2 busy cores); sleeping waits cost little when idle.
# Read when torch loads OpenMP, so set before importing it; an OMP_WAIT_POLICY of the user's own wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import time  # noqa: E402
from collections import namedtuple  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

import cli  # noqa: E402
import config  # noqa: E402
from bad_scenes import BadScenes, DataStop  # noqa: E402
from batch_threads import BatchThreads  # noqa: E402
from checkpoint import (checkpoint_paths, keep_newest, restore, save_checkpoint, set_rng_state,  # noqa: E402
                        training_checkpoint)
from files import atomic_write  # noqa: E402
from distributed import Dist, wrap  # noqa: E402
from model import objective, to_model  # noqa: E402
from monitor import TEST_CONTEXT, Monitor, TestViews, describe, draw_samples, report_end  # noqa: E402
from resolve import resolve  # noqa: E402
from sampling import TrainBatches  # noqa: E402
from scheduler import kl_weight, learning_rate, pixel_sigma  # noqa: E402
from stops import NonFiniteLoss, Stop, pause_for_test, worker_ignores_signals  # noqa: E402

SAMPLE_DRAWS = 4  # draws of z per scene in samples.png
SAMPLE_SCENES = 8


def main(argv=None):
    cli.main(lambda argv: train(*config.parse_args(argv)), argv)


def train(cfg, given):
    """One run; SIGINT/SIGTERM stop it in a state the same command with --resume continues exactly."""
    latest = checkpoint_paths(os.path.join(cfg.root_log_dir, cfg.log_dir))[1]
    with Dist() as dist, Stop(latest, dist.rank, at_once=dist.started) as stop:
        run = setup(resolve(cfg, given, dist), dist, stop)
        if run.start >= run.state.steps:
            dist.log(f"{run.latest} is at step {run.start}, the run's last ({run.state.steps}): nothing to do")
            return
        done = loop(run)
        end(run, done)


# ------------------------------------------------------------------------------------------------ setup

@dataclass
class Run:
    """What a run's steps share, as setup() builds it. Only `state` changes while it runs."""
    cfg: config.Config
    state: config.RunState
    dist: Dist
    stop: Stop
    run_dir: str
    resolved: object      # resolve.Resolved: the data, the checkpoint resumed from, K, the device
    model: torch.nn.Module    # the raw module: its state_dict is what checkpoints hold
    net: torch.nn.Module      # what a step calls: DDP, DataParallel or torch.compile around model, or model itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start: int
    threads: BatchThreads
    average: object       # None, or the mean of the batch threads' gradients over the ranks (no DDP wrapper then)
    autocast: object      # bf16 or fp16 autocast, or nothing, built once; the loss itself is taken in float32
    test: TestViews = None
    writer: object = None
    bad: BadScenes = None     # the unreadable scenes met so far (bad_scenes.py)
    first_save_s: float = 0.0

    def __getattr__(self, name):  # the resolved run's fields: train_ds, test_ds, ckpt, device, max_context, ...
        return getattr(self.__dict__["resolved"], name)

    @property
    def latest(self):
        return checkpoint_paths(self.run_dir)[1]

    def save(self, step, numbered):
        """latest.pt (and step_N.pt) on rank 0, in checkpoint.py's schema."""
        if self.dist.master:
            ckpt = training_checkpoint(step, self.model, self.optimizer, self.scaler, self.cfg, self.state,
                                       self.resolved, self.bad.count if self.bad else 0)
            save_checkpoint(ckpt, [self.latest] + ([checkpoint_paths(self.run_dir, step)[2]] if numbered else []))
            keep_newest(checkpoint_paths(self.run_dir)[0], self.cfg.keep_checkpoints)
        self.stop.saved = step

    def write_config(self):
        """config.json on rank 0: the config and the run's state, as the checkpoints hold them (written atomically)."""
        if self.dist.master:
            text = json.dumps({**self.cfg.to_dict(), "state": self.state.to_dict()}, indent=2) + "\n"
            atomic_write(os.path.join(self.run_dir, "config.json"), text.encode())


def setup(res, dist, stop):
    """The run folder with its config printed and written, the model and its optimiser (restored when resuming), the
    fixed test batch, TensorBoard's writer and latest.pt at the start -> Run."""
    cfg, run_dir = res.cfg, os.path.join(res.cfg.root_log_dir, res.cfg.log_dir)
    # Subnormal floats (below 1.2e-38) take the CPU's slow path: a tower step of the rooms job took 600 ms at its
    # step 1000, 160 ms with them flushed to zero (one core; the volume's step, the same either way).
    torch.set_flush_denormal(True)
    model, net, optimizer, scaler, average, start = build(cfg, res, dist)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    autocast = torch.autocast(res.device.type, dtype=half) if half else nullcontext()
    run = Run(cfg, res.state, dist, stop, run_dir, res, model, net, optimizer, scaler, start,
              BatchThreads(res.threads), average, autocast)
    stop.saved = None if res.ckpt is None else start
    if dist.master:
        os.makedirs(checkpoint_paths(run_dir)[0], exist_ok=True)
        run.write_config()
    describe(run)
    t = time.perf_counter()
    if res.ckpt is None:
        run.save(0, False)  # from here on a loadable latest.pt exists, whenever the run is killed
    run.first_save_s = time.perf_counter() - t
    if start >= res.state.steps:  # nothing to do
        return run
    run.test = TestViews(res.test_ds, cfg.seed, res.max_context, model.noise_shape, dist.log)
    if dist.master:
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard drops what an interrupted run logged after the checkpoint it starts from.
        run.writer = SummaryWriter(logdir=run_dir, purge_step=start + 1)
    run.bad = BadScenes(cfg.max_bad_scenes, len(res.train_ds), cfg.batch_size, dist,
                        res.ckpt.get("bad_scenes", 0) if res.ckpt else 0, res.device)
    return run


def build(cfg, res, dist):
    """The GQN and Adam (restored when resuming) on their device, fp16's loss scaler, and what a step calls ->
    (model, net, optimizer, scaler, average, the step to start from)."""
    torch.manual_seed(cfg.seed)
    model = config.new_gqn(cfg)
    # fused: one kernel for all parameters instead of a loop of small ops (the paper model's step: 390 -> 50 ms on CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr_i, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                 fused=True)
    # fp16: the loss scaled so small gradients do not flush to zero; a step whose gradients overflow is skipped and
    # the scale halved. Its state goes into every checkpoint, so a resumed run scales (and skips) as this one would.
    scaler = torch.amp.GradScaler(res.device.type, enabled=cfg.amp == "fp16")
    start = 0 if res.ckpt is None else restore(res.ckpt, model, optimizer, scaler)
    model.to(res.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # in place (param.data): the optimiser keeps its parameters
    # Adam's state follows its parameter's device and memory format (it was loaded on the CPU, contiguous).
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = torch.empty_like(p).copy_(v) if v.shape == p.shape else v.to(res.device)
    net, average = wrap(model, cfg, res.device, res.threads, dist)
    return model, net, optimizer, scaler, average, start


# ------------------------------------------------------------------------------------------------ the loop

def loop(run):
    """The steps from run.start to the run's length, each in nanoGPT's order: schedules, forward/backward,
    clip/step, log, checkpoint, the run's length, stop -> the steps done."""
    cfg, state, dist, stop = run.cfg, run.state, run.dist, run.stop
    batches = TrainBatches(run.train_ds, cfg.batch_size, cfg.max_context or run.max_context, cfg.seed,
                           noise=run.model.training_noise(), rank=dist.rank, world_size=dist.world_size,
                           min_context=cfg.min_context)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(run.start, state.steps),
                                         num_workers=cfg.workers, pin_memory=run.device.type == "cuda",
                                         worker_init_fn=worker_ignores_signals)
    monitor = Monitor(run)
    run.model.train()
    stream = iter(loader)  # draws the loader's base seed from the global RNG, as at the start of a fresh run
    if run.ckpt is not None:  # and from here on the RNG continues where the interrupted run left it
        set_rng_state(run.ckpt["rng"])
    stop.phase, done = "training", run.start
    try:
        for step, batch in enumerate(stream, run.start):
            t = time.perf_counter()
            done, logs = step + 1, monitor.logs_at(step + 1)
            run.bad.check(step, batch)  # DataStop when the data cannot serve this step
            s = train_step(run, step, batch, logs)
            monitor.stepped(step, s, time.perf_counter() - t)
            if logs:
                monitor.log(done, s)
            if done % cfg.save_interval == 0 or done == state.steps:
                t_save = time.perf_counter()
                run.save(done, done % cfg.save_interval == 0)
                monitor.saved(time.perf_counter() - t_save)
            monitor.fit_length(done)
            stop.step_seconds = time.perf_counter() - t
            pause_for_test(f"step {done}")
            if s.stopped or (stop.requested and not dist.started):  # one process: the step in flight is the last
                stop.acted.set()
                break
            if done == state.steps:  # a --train_minutes run that fixed its length below the loader's upper bound
                break
    except DataStop as e:
        stopped_at(run, step, monitor)
        raise stop.data_stop(e) from None
    except NonFiniteLoss as e:
        monitor.close()
        raise stop.not_finite(e) from None
    except Exception as e:
        raise dist.lost_contact(e, run.latest) or e
    finally:
        stop.phase = "setup"
        run.threads.close()
    stopped_at(run, done, monitor)
    if stop.acted.is_set():
        stop.stopped_at(done, stop.requested or "SIGTERM")  # or a peer's signal
    return done


def stopped_at(run, step, monitor):
    """The loop is over at `step`: the bar closed and, where it stopped early, latest.pt at that step (rank 0, from
    its own state: no collective, a peer may be gone)."""
    monitor.close()
    if run.dist.master and (run.stop.acted.is_set() or step < run.state.steps):
        if run.stop.saved != step:
            run.save(step, False)
        run.writer.close()


Step = namedtuple("Step", ["values", "stopped", "sigma", "lr", "beta", "skipped", "grad_norm"])


def train_step(run, step, batch, logs=False):
    """One gradient step on `batch` -> Step: the batch's ELBO, KL, NLL sums over all ranks, whether every rank stops
    after it, sigma, lr, beta, whether fp16's scaler skipped it, and with `logs` the gradient's norm (else None)."""
    cfg, device, model = run.cfg, run.device, run.model
    lr_n, sigma_n = run.state.schedules(cfg)
    lr = learning_rate(step, cfg.lr_i, cfg.lr_f, lr_n)
    sigma = pixel_sigma(step, cfg.sigma_i, cfg.sigma_f, sigma_n)
    beta = kl_weight(step, cfg.kl_warmup)
    for group in run.optimizer.param_groups:
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
    unit = run.scaler.scale(torch.ones((), device=device))  # the fp16 loss scale; 1 otherwise

    def loss_of(share):  # a share of the batch, or all of it
        with run.autocast:
            out = run.net(x[share], v[share], v_q[share], x_q[share], sigma_in, mask=mask[share],
                          kl_balance=cfg.kl_balance, **{k: n[share] for k, n in noise.items()})
        loss = objective(out, beta, cfg.free_bits)  # (share,): -ELBO, unless KL warm-up or free bits are asked for
        # The loss is the mean over this rank's b = B/W scenes: DDP averages gradients over the W ranks,
        # which makes the gradient of the mean over all B scenes, as one process computes it.
        values = torch.cat([torch.stack([out.elbo.float().sum(), out.kl.float().sum(), out.nll.float().sum(),
                                         loss.sum()]), out.kl_steps.float().sum(0)])
        return loss.sum() / b * unit, values.detach()

    sums = run.threads.step(loss_of, b, model.parameters(), run.average)
    # Summed over ranks with a stop flag, so that every rank stops after the same step.
    stats = run.dist.all_reduce(torch.cat([sums, sums.new_tensor([float(run.stop.requested is not None)])]).double())
    values, stopped = stats[:-1].cpu(), bool(stats[-1] > 0)
    if not torch.isfinite(values[:4]).all():  # same verdict on every rank: all stop before the update
        raise NonFiniteLoss(f"step {step}: the loss is not finite (ELBO {values[0] / cfg.batch_size:.4g}, "
                            f"KL {values[1] / cfg.batch_size:.4g}, NLL {values[2] / cfg.batch_size:.4g})")
    scale, grad_norm = clip_and_step(run, logs)
    # the scale only drops after a skipped step
    return Step(values, stopped, sigma, lr, beta, run.scaler.get_scale() < scale, grad_norm)


def clip_and_step(run, logs):
    """Clip (the true gradient, unscaled), Adam's step, zero the gradients -> (the loss scale before the step, the
    gradient's norm as clipped, averaged over the ranks and unscaled, when `logs`)."""
    cfg, model, scaler = run.cfg, run.model, run.scaler
    if cfg.grad_clip > 0:
        scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scale, grad_norm = scaler.get_scale(), None
    if logs:  # the whole batch's gradient: a sum where a mean was meant shows here
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in
                                                          model.parameters() if p.grad is not None])).item()
        grad_norm /= scale if scaler.is_enabled() and not cfg.grad_clip > 0 else 1.0
    scaler.step(run.optimizer)  # skipped when the gradients hold inf/NaN (fp16 only), as on every DDP rank
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return scale, grad_norm


# ------------------------------------------------------------------------------------------------ the end

def end(run, done):
    """Rank 0: samples.png and the whole test split scored as evaluate.py scores it (TensorBoard's eval/*), with the
    last lines; every rank waits for it."""
    cfg, stop = run.cfg, run.stop
    stop.phase = "score"
    stop.score_with = (f"python evaluate.py --checkpoint {run.latest} --test_data_dir {cfg.test_data_dir} "
                       f"--train_data_dir {cfg.train_data_dir}")
    pause_for_test("score")
    if run.dist.master:
        samples = os.path.join(run.run_dir, "samples.png")
        draw_samples(run, samples, SAMPLE_SCENES, SAMPLE_DRAWS)
        import evaluate

        scores = evaluate.end_of_training(run.writer, done, run.model, run.train_ds, run.test_ds,
                                          min(TEST_CONTEXT, run.max_context), cfg.seed, run.device, cfg.image_size,
                                          sigma=cfg.sigma_f)
        run.writer.close()
        report_end(run, done, scores, samples, SAMPLE_DRAWS)
    run.dist.finish()


if __name__ == "__main__":
    main()
