"""What a training run shows while it trains: the progress bar, a log line and TensorBoard's scalars and images every
--log_interval steps, the fixed test batch they are measured on, and the clock that fits the run to its budget.

The log line and TensorBoard report the interval's means over all scenes of all ranks (train/elbo, kl, nll, the
objective, each generation step's KL), the ELBO of the fixed test batch (spread over the ranks), the schedules, the
gradient's norm, the speed; the images show the first test scenes: context, truth, reconstruction and draws of z.
The clock (budget.py) times the steps, fixes the run's length when --train_minutes asks for it and refits it at
each log; every change of the run's state is written to config.json.
"""
import math
import textwrap
import time

import numpy as np
import torch

from budget import StepBudget, fix_length, refit
from metrics import bits_per_dim, nll_floor, object_sums
from model import resize, to_model
from pictures import save_samples, test_views_grid
from progress import progress_bar
from sampling import FixedViews, Unreadable

TEST_SCENES = 32      # the fixed test batch: test ELBO (spread over ranks), and the first IMAGE_SCENES as images
IMAGE_SCENES = 8
PRIOR_SAMPLES = 4     # generations per test scene in TensorBoard: where they differ, the model is unsure
TEST_CONTEXT = 3      # context views per test scene, as torch-gqn's test batch


class TestViews:
    """The fixed test batch: for TEST_SCENES scenes spread over the split, TEST_CONTEXT fixed context views and one
    query view (FixedViews), the same for every run with this seed; scenes that cannot be read are left out and
    named. `eps`: the posterior's noise for each scene kept; `empty`, `masks`: what the objects change in the query
    views, for data that records it (GQNDataset.has_objects), else None."""

    def __init__(self, ds, seed, max_context, noise_shape, say=print):
        t = min(TEST_SCENES, len(ds))
        ids = np.linspace(0, len(ds) - 1, t).round().astype(int).tolist()
        views = FixedViews(ds, min(TEST_CONTEXT, max_context), seed, ids, objects=ds.has_objects)
        items = [views[k] for k in range(len(ids))]
        for u in items:
            if isinstance(u, Unreadable):
                say(f"warning: test scene {u.scene} cannot be read ({u.why}); the fixed test batch goes without it")
        items = [t for t in items if not isinstance(t, Unreadable)]
        if not items:
            from gqn_format import DatasetError

            raise DatasetError(f"--test_data_dir {ds.root}: none of the fixed test batch's {len(ids)} scenes can be "
                               f"read")
        x, v, x_q, v_q = (torch.stack(a) for a in list(zip(*items))[:4])
        self.x, self.v, self.x_q, self.v_q = x, v, x_q, v_q  # (T, K, 3, H, W) uint8, (T, K, 7), (T, 3, H, W), (T, 7)
        self.empty = self.masks = None
        if ds.has_objects:
            self.empty, self.masks = (torch.stack(a) for a in list(zip(*items))[5:])  # (T, 3, H, W), (T, H, W)
        self.eps = torch.randn((t, *noise_shape), generator=torch.Generator().manual_seed(seed))[:len(items)]

    def __len__(self):
        return len(self.x)

    def first(self, n, size, device, idx=None):
        """The first n scenes (or scenes `idx`) as the model takes them: x, v, v_q, x_q on device at `size`."""
        idx = torch.arange(n) if idx is None else idx
        return (to_model(self.x[idx], size, device), self.v[idx].to(device), self.v_q[idx].to(device),
                to_model(self.x_q[idx], size, device))


def describe(run):
    """What a run trains, printed at its start: the config (rank 0), where K and the camera came from, the model,
    the data, the device."""
    cfg, res, log = run.cfg, run.resolved, run.dist.log
    if run.dist.master:
        print(f"config ({'resumed from ' + run.latest if res.ckpt else run.run_dir}):")
        print(textwrap.fill("  ".join(f"{k}={v}" for k, v in cfg.to_dict().items()), 118, initial_indent="  ",
                            subsequent_indent="  ", break_on_hyphens=False))
        print("\n".join(f"  {note}" for note in res.notes))
    if res.ckpt is not None:
        log(f"Resuming {run.run_dir} at step {run.start} ({run.latest})")
    params = sum(p.numel() for p in run.model.parameters())
    if res.device.type == "cpu" and params > 20e6:  # torch-gqn's command on a laptop: say so before the first step
        log(f"note: training a {params / 1e6:.0f}M-parameter GQN at batch {cfg.batch_size} on the CPU: a step may take "
            f"minutes. For a run sized for a CPU, the same command with --preset cpu")
    for line in res.said:
        log(line)
    train_ds = res.train_ds
    log(f"GQN: {params / 1e6:.2f}M parameters, representation {cfg.representation}, L={cfg.layers}; data "
        f"{cfg.dataset} ({len(train_ds)} train / {len(res.test_ds)} test scenes, {train_ds.image_size}px"
        f"{'' if train_ds.image_size == cfg.image_size else f' resized to {cfg.image_size}px'}, K={res.max_context}, "
        f"{cfg.min_context}-{min(cfg.max_context or res.max_context, train_ds.views - 1)} context views a scene); "
        f"device {res.device}{f' x {run.dist.world_size} processes' if run.dist.started else ''}"
        f"{f', batch split over {res.threads} threads' if res.threads > 1 else ''}")


class Monitor:
    """The progress bar, the interval's sums and timers, the log, and the run's clock (`run`: train.Run)."""

    def __init__(self, run):
        self.run, cfg, state = run, run.cfg, run.state
        self.clock = StepBudget(cfg.train_minutes if not state.timed_ms else 0, run.start, state.steps,
                                cfg.log_interval, cfg.save_interval)
        self.clock.saved(run.first_save_s)
        # no time left shown while the run's length is not known; then the time left from the average over the run
        # so far, its pauses for logging included
        self.bar = progress_bar(total=None if self.clock.seconds else state.steps, initial=run.start,
                                desc="train (timing)" if self.clock.seconds else "train", unit="step",
                                disable=not run.dist.master, smoothing=0)
        # the interval's sums over all scenes of all ranks: ELBO, KL, NLL, the objective, each step's KL
        self.sums = torch.zeros(4 + cfg.layers, dtype=torch.float64)
        self.scenes, self.skipped = 0, 0  # skipped: fp16 steps the scaler skipped
        self.since, self.last = time.perf_counter(), run.start  # the interval's start: time and step
        self.began = self.since

    def logs_at(self, done):
        return done % self.run.cfg.log_interval == 0 or done == self.run.state.steps

    def stepped(self, step, s, seconds):
        """Step `step` trained (train.Step `s`) in `seconds`."""
        self.clock.step(step, seconds)
        self.sums += s.values
        self.scenes += self.run.cfg.batch_size
        self.skipped += s.skipped
        self.bar.update(1)
        if self.run.dist.master:
            self.bar.set_postfix(loss=f"{-s.values[0].item() / self.run.cfg.batch_size:.1f}", refresh=False)

    def log(self, done, s):
        """The interval's log after step `done` (train.Step `s`: its schedules and gradient norm)."""
        elapsed = time.perf_counter() - self.since
        t = time.perf_counter()
        scaler = self.run.scaler
        log_metrics(self.run, self.bar.write, done, self.sums / self.scenes, elapsed / (done - self.last),
                    self.scenes / elapsed, s, (self.skipped, scaler.get_scale()) if scaler.is_enabled() else None)
        self.clock.logged(time.perf_counter() - t)
        self.sums.zero_()
        self.scenes, self.skipped, self.since, self.last = 0, 0, time.perf_counter(), done

    def saved(self, seconds):
        self.clock.saved(seconds)

    def fit_length(self, done):
        """After step `done`: the budget fixes the run's length after the first steps, then refits it at each log;
        config.json follows the state."""
        run, state = self.run, self.run.state
        say = self.bar.write if run.dist.master else (lambda text: None)  # under the progress bar, not into it
        elapsed = time.perf_counter() - self.began
        if self.clock.due(done) and done < state.steps:
            changed = fix_length(run.cfg, state, self.clock, run.dist, say, done, elapsed,
                                 run.device.type == "cpu", run.default_job)
        elif self.clock.fixed and done % run.cfg.log_interval == 0 and done < state.steps:
            changed = refit(run.cfg, state, self.clock, run.dist, say, done, elapsed)
        else:
            return
        if changed:
            self.bar.total, self.bar.desc = state.steps, "train"
            self.bar.refresh()
            run.write_config()

    def close(self):
        self.bar.close()


@torch.no_grad()
def log_metrics(run, write, step, means, s_step, scenes_s, last, scaling=None):
    """Test ELBO on the fixed test batch (spread over ranks), then, on rank 0, TensorBoard and one log line."""
    cfg, model, test, dist, device = run.cfg, run.model, run.test, run.dist, run.device
    model.eval()
    mine = torch.arange(dist.rank, len(test), dist.world_size)  # this rank's share of the test batch
    test_sums = torch.zeros(3, dtype=torch.float64, device=device)
    if len(mine):
        with run.autocast:
            out = model(*test.first(0, cfg.image_size, device, mine), last.sigma, eps=test.eps[mine].to(device))
        test_sums = torch.stack([out.elbo.sum(), out.kl.sum(), out.nll.sum()]).double()
    test_means = (dist.all_reduce(test_sums) / len(test)).cpu()
    if run.writer is not None:
        dims = 3 * cfg.image_size * cfg.image_size
        elbo, kl, nll, _ = means[:4].tolist()
        floor = nll_floor(last.sigma, dims)
        score = object_score(run)
        tensorboard(run, step, means, test_means, last, s_step, scenes_s, scaling, score)
        write(f"step {step:>7d} | ELBO {elbo:9.1f} KL {kl:7.2f} NLL {nll:9.1f} (sigma floor {floor:7.1f}) | "
              f"test ELBO {test_means[0]:9.1f} | {bits_per_dim(-elbo, dims):.3f} bits/dim | sigma {last.sigma:.3f} "
              f"lr {last.lr:.2e} | {1000 * s_step:6.0f} ms/step {scenes_s:6.1f} scenes/s" +
              (f" | fp16: {scaling[0]} skipped, scale {scaling[1]:g}" if scaling is not None else "") +
              (f" | {run.bad.count} unreadable scene reads skipped" if run.bad.count else "") +
              (f" | object score {score:.3f}" if score is not None else ""))
    model.train()


def tensorboard(run, step, means, test_means, last, s_step, scenes_s, scaling, score):
    """Rank 0's TensorBoard record of a log interval: scalars, and the first test scenes' views."""
    cfg, writer, model, device = run.cfg, run.writer, run.model, run.device
    dims = 3 * cfg.image_size * cfg.image_size
    elbo, kl, nll, loss = means[:4].tolist()
    for split, (e, k, n) in (("train", (elbo, kl, nll)), ("test", test_means.tolist())):
        writer.add_scalar(f"{split}/elbo", e, step)
        writer.add_scalar(f"{split}/kl", k, step)
        writer.add_scalar(f"{split}/nll", n, step)
        writer.add_scalar(f"{split}/bits_per_dim", bits_per_dim(-e, dims), step)
        writer.add_scalar(f"{split}/nll_minus_sigma_floor", n - nll_floor(last.sigma, dims), step)
    writer.add_scalar("schedule/sigma", last.sigma, step)
    writer.add_scalar("schedule/lr", last.lr, step)
    writer.add_scalar("train/grad_norm", last.grad_norm, step)
    # the objective the gradient follows (-ELBO without KL warm-up and free bits), beta, and each step's true KL:
    # where the information about the query view goes, and whether the latent is used at all
    writer.add_scalar("train/objective", loss, step)
    writer.add_scalar("schedule/kl_weight", last.beta, step)
    for l, kl_l in enumerate(means[4:].tolist(), 1):
        writer.add_scalar(f"train/kl_step_{l}", kl_l, step)
    writer.add_scalar("speed/scenes_per_s", scenes_s, step)
    writer.add_scalar("data/skipped_scenes", run.bad.count, step)
    writer.add_scalar("speed/ms_per_step", 1000 * s_step, step)
    if scaling is not None:  # fp16: steps skipped in this interval (gradients overflowed), the loss scale now
        writer.add_scalar("amp/skipped_steps", scaling[0], step)
        writer.add_scalar("amp/loss_scale", scaling[1], step)
    if score is not None:  # where the objects are, the test batch's draws against the empty room
        writer.add_scalar("test/object_score", score, step)
    # Images: the first scenes of the test batch; noise from fixed seeds so the grids differ only by training.
    x, v, v_q, x_q = run.test.first(min(IMAGE_SCENES, len(run.test)), cfg.image_size, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), run.autocast:
        torch.manual_seed(cfg.seed)
        rec = model.reconstruct(x, v, v_q, x_q)
        gen = torch.stack([model.generate(x, v, v_q, generator=torch.Generator(device).manual_seed(cfg.seed + k))
                           for k in range(PRIOR_SAMPLES)])
    writer.add_image("test/views", test_views_grid(x, x_q, rec.float(), gen.float()), step, dataformats="HWC")
    writer.flush()


@torch.no_grad()
def object_score(run):
    """The fixed test batch's object score (metrics.object_sums: one draw a scene, the same noise at every log), for
    data that records what its objects change; else None."""
    test, cfg, device = run.test, run.cfg, run.device
    if test.masks is None:
        return None
    x, v, v_q, x_q = test.first(len(test), cfg.image_size, device)
    with run.autocast:
        draw = run.model.generate(x, v, v_q, generator=torch.Generator(device).manual_seed(cfg.seed)).float()
    weight = resize(test.masks[:, None].float(), cfg.image_size)
    model_sq, room_sq, _ = object_sums(draw.clamp(0, 1).cpu(), x_q.cpu(), to_model(test.empty, cfg.image_size, "cpu"),
                                       weight)
    return math.sqrt(model_sq / room_sq) if room_sq > 0 else float("nan")


# ------------------------------------------------------------------------------------------------ the end

def draw_samples(run, path, scenes, draws):
    """samples.png: the first test scenes' context, truth, `draws` draws of z, their spread and error."""
    cfg, model, device = run.cfg, run.model, run.device
    model.eval()
    x, v, v_q, x_q = run.test.first(min(scenes, len(run.test)), cfg.image_size, device)
    g = torch.Generator(device).manual_seed(cfg.seed)
    with torch.no_grad(), run.autocast:
        drawn = torch.stack([model.generate(x, v, v_q, generator=g).float() for _ in range(draws)])
    save_samples(path, x, x_q, drawn)


def report_end(run, done, s, samples, draws):
    """The last lines of a run: the end-of-run score `s` (evaluate.end_of_training), skipped scenes, where to look."""
    left_out = f", {len(s['unreadable'])} left out: they cannot be read" if s["unreadable"] else ""
    objects = (f"; where the objects are, RMSE {s['object_rmse']:.2f} vs {s['empty_room_rmse']:.2f} for the empty room "
               f"(object score {s['object_score']:.3f})" if s["object_score"] is not None else "")
    print(f"Test split ({s['scenes']} scenes{left_out}, {s['context']} context views): RMSE {s['rmse']:.2f} vs "
          f"{s['mean_image_rmse']:.2f} for the mean training image (ratio {s['rmse_ratio']:.3f}), MAE {s['mae']:.2f}"
          f"{objects}")
    if run.bad.count:
        print(f"Skipped {run.bad.count} reads of unreadable training scenes (each named above), their places filled "
              f"from other scenes")
    print(f"Done: {done} step{'s' if done != 1 else ''}. Checkpoint {run.latest}; TensorBoard: tensorboard --logdir "
          f"{run.run_dir}; ground truth next to {draws} draws, their spread and error: {samples}")
