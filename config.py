"""A training run's configuration: the Config dataclass (frozen), the run's state beside it, the presets, the flags.

The `paper` preset is Eslami et al. 2018's configuration (supplementary "Training": pool representation,
L = 12 unshared cores, batch 36, Adam, learning rate 5e-4 -> 5e-5 over 1.6M steps, pixel σ 2.0 -> 0.7 over
200K, 2M steps); the `cpu` preset is the default job's, a GQN small enough for a 2-core CPU. `python train.py`
without data folders takes `cpu`, with them `paper`; `--preset` picks either and any flag overrides it.
torch-gqn's flags keep their names and meanings. `python train.py --help` shows both presets' defaults.

The command line gives a Config (parse_args); resolve.py completes it once, from the checkpoint, the data and the
processes, and from then on it cannot change. What does change during a run is its RunState: the length a
--train_minutes budget fixes and the schedules' step counts. Checkpoints and config.json hold both.
"""
import argparse
import dataclasses
import json
import math
from dataclasses import dataclass

from batch_threads import usable_cpus
from cli import ArgumentParser, UserError, nonneg_float, nonneg_int, positive_float, positive_int, str2bool, unit_float
from scheduler import anneal_steps

WHOLE_RUN = 0  # --lr_n / --sigma_n 0: anneal over --gradient_steps, whatever the run's length
AUTO = -1      # --workers: as many as the machine gives this process, at most 4


@dataclass(frozen=True)
class Config:
    """One run's configuration, as the flags and the preset give it and resolve.py completes it; frozen. The defaults
    are the paper's configuration (the 'paper' preset)."""
    # Data (torch-gqn's flags)
    train_data_dir: str = ""
    test_data_dir: str = ""
    dataset: str = ""                    # "" = the name the data records; sets K, the maximum context size
    builtin: str = "shepard_metzler_5_parts"  # without data folders: the built-in world rendered and trained on
    min_context: int = 1                 # context views per training scene: uniform in min_context..max_context
    max_context: int = 0                 # 0 = K, the data set's (the paper draws 1..K)
    # Model: GQN(representation, L, shared_core, ...) (model.py)
    representation: str = "pool"
    layers: int = 12                     # L, generation steps
    shared_core: bool = False
    r_dim: int = 256
    h_dim: int = 128
    z_dim: int = 3
    z_grid: int = 0                      # z on a z_grid x z_grid map; 0: on the cores' grid (image_size/4), the paper's
    u_dim: int = 128
    kernel_size: int = 5                 # the cores' gate convolutions and the prior/posterior heads: k x k
    image_from_r: bool = False           # η_r: a path from r straight to the image (model.py; not the paper's)
    image_size: int = 64                 # the model's; stored images of another size are resized (area)
    fov: float = 20.0                    # representation "volume" only: the cameras' field of view in degrees,
    near: float = 2.7                    # and the depths along the query rays that it samples (the defaults fit
    far: float = 3.97                    # Shepard-Metzler: cameras 10/3 from the object's centre)
    depth_samples: int = 16              # and how many depths along each ray, evenly spaced in [near, far]
    cell_rays: int = 2                   # and how many rays a side through each of r's cells (2: 2x2 a cell)
    # Optimisation (supplementary "Training"; scheduler.py)
    gradient_steps: int = 2_000_000     # with train_minutes: the most steps; the run's length is RunState.steps
    train_minutes: float = 0.0           # 0 = off; else time the first steps and fix the length to fit (budget.py)
    batch_size: int = 36                 # global: split across DDP ranks / DataParallel devices
    lr_i: float = 5e-4
    lr_f: float = 5e-5
    lr_n: float = 1.6e6                  # WHOLE_RUN: the whole run; under 1: a share of it (RunState.lr_n)
    sigma_i: float = 2.0
    sigma_f: float = 0.7
    sigma_n: float = 2e5                 # WHOLE_RUN: the whole run; under 1: a share of it (RunState.sigma_n)
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 0.0               # max gradient norm; 0 = off (the paper does not clip)
    kl_warmup: int = 0                   # KL warm-up: beta 0 -> 1 over this many steps; 0 = off (the paper's ELBO)
    free_bits: float = 0.0               # nats per generation step and scene of KL left unpenalised; 0 = off
    kl_balance: float = 0.5              # the KL's gradient: 2x this to the prior, the rest to the posterior; 0.5: ELBO
    # Run
    seed: int = -1                       # -1 = draw one (recorded in config.json and the checkpoints)
    root_log_dir: str = "runs"
    log_dir: str = "default"
    log_interval: int = 100
    save_interval: int = 10_000
    keep_checkpoints: int = -1           # numbered checkpoints kept besides latest.pt, the newest; -1 = all
    max_bad_scenes: float = 0.01         # unreadable scene reads skipped: < 1 a fraction (bad_scenes.py), else a count
    workers: int = AUTO                  # AUTO: 4, or fewer when this process may use fewer CPUs
    batch_threads: int = 1               # CPU: threads that split each step's batch (batch_threads.py); 0 = a core each
    device_ids: tuple = (0,)
    amp: str = "none"                    # "bf16" / "fp16": autocast (loss in float32); fp16 with GradScaler
    compile: bool = False
    checkpoint_activations: bool = False
    channels_last: bool = False          # NHWC activations and weights (GPUs' fast convolution layout)
    preset: str = "paper"
    resume: object = False               # True: continue the run; "auto": continue it if there is one, else start

    @classmethod
    def from_dict(cls, saved):
        """A config as checkpoints and config.json hold it (plain types; keys of older versions ignored)."""
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        for k in ("adam_betas", "device_ids"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def to_dict(self):
        """Plain types, as checkpoints and config.json hold it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class RunState:
    """What changes during a run, saved beside its Config: the run's length (--gradient_steps, or what the
    --train_minutes budget fixed and refitted) and the schedules' step counts: --lr_n / --sigma_n resolved against
    the length once it is fixed (None until then: the whole run, or that share of it, as long as it is now). A
    refit moves the end, not the schedules."""
    steps: int
    lr_n: float = None
    sigma_n: float = None
    timed_ms: float = 0.0  # what a step cost when the budget fixed the length (0: not timed, or not yet)

    @classmethod
    def start(cls, cfg):
        """A fresh run: --gradient_steps long; without a budget that is its length, and the schedules follow it."""
        state = cls(int(cfg.gradient_steps))
        if not cfg.train_minutes:
            state.resolve(cfg)
        return state

    def resolve(self, cfg):
        """The length is fixed: schedules over the whole run or a share of it become counts (once)."""
        if self.lr_n is None:
            self.lr_n = anneal_steps(cfg.lr_n, self.steps)
        if self.sigma_n is None:
            self.sigma_n = anneal_steps(cfg.sigma_n, self.steps)

    def fix(self, cfg, steps, timed_ms):
        """The budget fixed the run's length after timing its first steps."""
        self.steps, self.timed_ms = int(steps), timed_ms
        self.resolve(cfg)

    def schedules(self, cfg):
        """(lr_n, sigma_n) as step counts now."""
        return (anneal_steps(cfg.lr_n, self.steps) if self.lr_n is None else self.lr_n,
                anneal_steps(cfg.sigma_n, self.steps) if self.sigma_n is None else self.sigma_n)

    def to_dict(self):
        return dataclasses.asdict(self)


# >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>> CPU PRESET (the default job) >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>
# `python train.py` without data folders: a GQN small enough for a 2-core CPU, trained on the built-in
# Shepard-Metzler set. The schedules anneal over the whole run, whatever --gradient_steps says.
# BUILTIN_DATA is rendered once into data/builtin/<name>; delete that folder after changing it.
# Tuned on held-out scores (docs/default-run.md): the paper's representations (pool, tower, pyramid) must learn 3D
# geometry from scratch and were still at 0.93x the mean image's RMSE after this budget; the volume representation
# reads the context along the query rays with the cameras' geometry and gets under 0.8x. Small batches buy more
# steps. The latent: at 32x32 the likelihood prices what z could say about the query view at 1/(2 sigma^2) nats a
# unit of squared error, and with the paper's sigma (2.0 -> 0.7) that is less than z's KL costs, so z carried
# nothing (KL 0.02 nats); it is used once sigma falls below about 0.45, hence sigma 2.0 -> 0.4 over the first 0.8
# of the run and 0.4 for the last fifth (the high start learns the geometry first; at 0.4 z says what one view
# cannot tell and three views leave it nearly unused, where 0.1 made every draw a noisier guess). The learning rate
# 2e-3 -> 2e-4 learns faster than 1e-3 -> 1e-4 (3e-3 collapsed the latent). image_from_r (model.py's η_r) shows
# the volume's rendering in the image from the first steps: after 3000 steps 0.655x at 3 views instead of 0.845x,
# after 6000 0.615x instead of 0.740x (docs/default-run.md). Training with 1-3 context views (as the test's 1 and 3)
# puts the ambiguity of one view in training and helped the 3-view score too (0.857 against 0.870 after 2500 steps).
# z on a 2x2 grid (z_grid; 6 channels for the 3 of the cores' 8x8 grid) with KL balancing at 0.65: on the full grid a
# draw differs from another by many small local changes and the best of 8 draws was 0.950-0.952x their mean; with
# a few changes that span the image, 0.943-0.945x, `imagines` (3000-step screens, seeds 0 and 1; docs/default-run.md).
CPU_PRESET = dict(
    representation="volume", layers=4, r_dim=64, h_dim=32, z_dim=6, z_grid=2, kl_balance=0.65, u_dim=32, image_size=32,
    min_context=1, max_context=3,
    image_from_r=True, gradient_steps=6000, batch_size=8, lr_i=2e-3, lr_f=2e-4, lr_n=WHOLE_RUN, sigma_i=2.0,
    sigma_f=0.4, sigma_n=0.8, log_interval=100, save_interval=500, workers=0, seed=0, kernel_size=3,
    train_minutes=8.5, batch_threads=0,
)
BUILTIN_DATA = dict(parts=5, train_scenes=5000, test_scenes=500, seed=0, workers=2)
# `python train.py --builtin rooms_ring_camera`: the rooms world (dataset/rooms.py), into runs/rooms by default.
ROOMS_DATA = dict(train_scenes=5000, test_scenes=500, seed=0, workers=2)
# The cpu preset unchanged: its z on a 2x2 grid made the rooms' draws at 1 view differ where it counts too (best of
# 8 0.918-0.923x their mean, `imagines`, in three 3000-step screens, against 0.955-0.961x on the full grid), at the
# cost of a wider spread at 3 views (one draw 0.68-0.73x against 0.66; the draws' mean unchanged, docs/default-run.md).
BUILTIN_WORLDS = ("shepard_metzler_5_parts", "rooms_ring_camera")
# <<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<< end of CPU PRESET <<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<

PRESETS = {"paper": {}, "cpu": CPU_PRESET}

# What may differ from the checkpoint's config on --resume: where the data is and how the run is carried out, not
# the model, the data set or the optimisation.
RESUME_MAY_CHANGE = {"train_data_dir", "test_data_dir", "gradient_steps", "train_minutes", "log_interval",
                     "save_interval", "keep_checkpoints", "max_bad_scenes", "workers", "batch_threads", "device_ids",
                     "amp", "compile", "checkpoint_activations", "channels_last", "resume"}

# ------------------------------------------------------------------------------------------------ flags

def count_or_all(s):
    """--keep_checkpoints: a non-negative number, or `all` (-1)."""
    return -1 if str(s).strip().lower() == "all" else nonneg_int(s)


def resume_mode(s):
    """--resume: True/False/1/0, or `auto` (continue the run if the folder holds one, else start it)."""
    if str(s).strip().lower() == "auto":
        return "auto"
    try:
        return str2bool(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected True/False/1/0 or auto, got {s!r}") from None


# flag: (type, meaning). Every argparse default is None: the preset fills what is not given, and --resume can tell
# what was given. The help adds each preset's default.
FLAGS = {
    "train_data_dir": (str, "training split folder (converted shards or torch-gqn N.pt[.gz] files); omit both "
                            "data folders for the default job on the built-in data set"),
    "test_data_dir": (str, "test split folder (fixed test batch: test ELBO and image grids)"),
    "dataset": (str, "Room, Jaco, Labyrinth, Shepard-Metzler or a DeepMind name, which set K, the largest context "
                     "(the paper's); any other name is a data set of its own: K from --max_context, else half the "
                     "views per scene"),
    "builtin": (list(BUILTIN_WORLDS), "without data folders: the built-in world rendered once into data/builtin/ "
                                      "and trained on, Shepard-Metzler objects or rooms like DeepMind's "
                                      "rooms_ring_camera (run folder runs/rooms unless --log_dir)"),
    "min_context": (positive_int, "fewest context views per training scene"),
    "max_context": (positive_int, "most context views per training scene"),
    "gradient_steps": (positive_int, "number of gradient steps (with --train_minutes: the most)"),
    "train_minutes": (nonneg_float, "fit the training into this many minutes: time the first 200 steps here, then fix "
                                    "--gradient_steps to what fits (0: off; --gradient_steps alone turns it off)"),
    "batch_size": (positive_int, "scenes per step, global over all devices and ranks"),
    "lr_i": (positive_float, "initial learning rate"),
    "lr_f": (positive_float, "final learning rate"),
    "lr_n": (float, "steps over which the learning rate anneals (0: the whole run; under 1: that share of it)"),
    "sigma_i": (positive_float, "initial pixel sigma"),
    "sigma_f": (positive_float, "final pixel sigma"),
    "sigma_n": (float, "steps over which sigma anneals (0: the whole run; under 1: that share of it)"),
    "root_log_dir": (str, "root of run folders"),
    "log_dir": (str, "run folder name under --root_log_dir"),
    "log_interval": (positive_int, "steps between logs (TensorBoard, log line)"),
    "save_interval": (positive_int, "steps between checkpoints (latest.pt and step_N.pt)"),
    "keep_checkpoints": (count_or_all, "numbered checkpoints (step_N.pt) to keep besides latest.pt, the newest: a "
                                       "number or all"),
    "max_bad_scenes": (nonneg_float, "scenes that cannot be read are skipped, their places filled from other scenes; "
                                     "the run stops (latest.pt at that step) when more reads than this failed: a "
                                     "count, or below 1 that fraction of the scenes read so far (at least of one "
                                     "epoch); 0: stop at the first"),
    "workers": (nonneg_int, "data loading processes (0 = in the training process)"),
    "batch_threads": (nonneg_int, "CPU, one process: split each step's batch over this many threads, a core each "
                                  "(0: one per CPU this process may use; 1: PyTorch's own threads)"),
    "device_ids": (nonneg_int, "CUDA devices; more than one: nn.DataParallel"),
    "representation": (["pool", "tower", "pyramid", "volume"],
                       "the paper's pool, tower or pyramid, or volume (volume.py: the context read along the "
                       "query camera's rays)"),
    "layers": (positive_int, "L, the number of generation steps"),
    "shared_core": (str2bool, "share the cores' weights across the L steps: True/False/1/0"),
    "r_dim": (positive_int, "channels of r"),
    "h_dim": (positive_int, "channels of the cores' hidden state h"),
    "z_dim": (positive_int, "channels of the latent z"),
    "z_grid": (nonneg_int, "z on a coarser map than the cores' state, N x N (N divides image_size/4; 0: the cores' "
                           "own, the paper's): a draw changes a few things across the image instead of many in small "
                           "patches (model.py; docs/default-run.md)"),
    "u_dim": (positive_int, "channels of the canvas u"),
    "kernel_size": (positive_int, "size of the cores' and the prior/posterior heads' convolutions (odd)"),
    "image_size": (positive_int, "the model's image size (stored images are resized to it, area)"),
    "image_from_r": (str2bool, "a path from r straight to the image (model.py: η_r, zero at the start; not in the "
                               "paper): the representation's view shows before the cores learn to carry it"),
    "fov": (float, "volume: the cameras' field of view in degrees (taken from the data when it records it)"),
    "near": (float, "volume: nearest depth sampled along the query rays (taken from the data when it records it)"),
    "far": (float, "volume: farthest depth sampled along the query rays (taken from the data when it records it)"),
    "depth_samples": (positive_int, "volume: depths sampled along each query ray, evenly spaced from --near to --far "
                                    "(16: 0.08 apart on Shepard-Metzler's cameras, 0.48 in the rooms, where 32 drew "
                                    "a better mean in the hour: docs/default-run.md)"),
    "cell_rays": (positive_int, "volume: query rays a side through each of r's cells (2: 2x2 rays, silhouettes at "
                                "half the image's resolution; 1 reads a quarter of the points: faster steps, the "
                                "objects a little worse per step: docs/default-run.md)"),
    "seed": (nonneg_int, "random seed"),
    "grad_clip": (float, "clip the gradient norm to this (0 = off)"),
    "kl_warmup": (nonneg_int, "KL warm-up against posterior collapse (Sønderby et al. 2016): the KL's weight beta rises "
                              "from 0 to 1 over this many steps (0: off, the paper's ELBO); TensorBoard "
                              "schedule/kl_weight"),
    "free_bits": (nonneg_float, "free bits against posterior collapse (Kingma et al. 2016): each generation step's KL "
                                "below this many nats per scene is not penalised (0: off); TensorBoard "
                                "train/objective is the loss trained, train/elbo and train/kl_step_N the true ones"),
    "kl_balance": (unit_float, "KL balancing (Hafner et al. 2021): the KL's gradient trains the prior with 2x this "
                               "share and the posterior with the rest; 0.5 is the paper's ELBO (the default), 0.65 "
                               "the cpu preset's (with --z_grid 2); more learns the prior faster and z is used sooner "
                               "(docs/default-run.md); the loss's value is the ELBO either way"),
    "amp": (["none", "bf16", "fp16"], "mixed precision, the loss in float32: bf16 autocast (GPUs from A100 on, CPUs "
                                      "with avx512_bf16 or AMX), or fp16 autocast with loss scaling (V100, T4, RTX "
                                      "20xx, CPUs with avx512_fp16); refused where emulated"),
    "compile": (str2bool, "torch.compile the model"),
    "checkpoint_activations": (str2bool, "recompute activations in the backward pass to save memory"),
    "channels_last": (str2bool, "NHWC weights and activations; the same function, meant for GPUs (no faster on "
                                "the CPU)"),
}


METAVARS = {positive_int: "N", nonneg_int: "N", str2bool: "BOOL", str: "NAME", count_or_all: "N", nonneg_float: "M",
            unit_float: "A"}


def _shown(name, value):
    """How a default reads in --help (sentinels in words)."""
    words = {("lr_n", WHOLE_RUN): "the whole run", ("sigma_n", WHOLE_RUN): "the whole run", ("max_context", 0): "K",
             ("dataset", ""): "what the data records", ("train_data_dir", ""): "none", ("test_data_dir", ""): "none",
             ("seed", -1): "drawn and recorded", ("keep_checkpoints", -1): "all",
             ("workers", AUTO): "4, or the CPUs this process may use if fewer", ("train_minutes", 0.0): "off",
             ("batch_threads", 0): "one per CPU"}
    if isinstance(value, list):
        return " ".join(map(str, value))
    if (name, value) in words:
        return words[(name, value)]
    if name in ("lr_n", "sigma_n") and 0 < value < 1:
        return f"{value:g} of the run"
    return f"{value:g}" if isinstance(value, float) else value


def default_help(name):
    """'(default: X)' or '(paper: X; cpu: Y)' with the values each preset gives `name`."""
    values = {p: getattr(dataclasses.replace(Config(), **PRESETS[p]), name) for p in PRESETS}
    if len(set(map(repr, values.values()))) == 1:
        return f"(default: {_shown(name, values['paper'])})"
    return "(" + "; ".join(f"{p}: {_shown(name, v)}" for p, v in values.items()) + ")"


def build_parser():
    p = ArgumentParser(description="Train a Generative Query Network (Eslami et al. 2018). Presets: 'cpu' when no "
                                   "data folders are given (the default job on the built-in data), 'paper' when "
                                   "they are; any flag overrides the preset. Defaults below are per preset.")
    for name, (kind, meaning) in FLAGS.items():
        extra = dict(choices=kind) if isinstance(kind, list) else \
            dict(type=kind, metavar=METAVARS.get(kind, "X") if not name.endswith("_dir") else "DIR")
        if kind is str2bool and name != "shared_core":
            extra["nargs"], extra["const"] = "?", True  # --compile alone means True
        if name == "device_ids":
            extra["nargs"] = "+"
        p.add_argument(f"--{name}", help=f"{meaning} {default_help(name)}", **extra)
    p.add_argument("--resume", type=resume_mode, nargs="?", const=True, metavar="auto",
                   help="continue the run in <root_log_dir>/<log_dir> from its latest.pt (only the data folders "
                        "and how the run is carried out may change); auto: continue it if the folder holds one, "
                        "else start it (for jobs that are requeued or restarted with the same command)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper or cpu (default: cpu without data folders, "
                                                             "paper with them)")
    return p


def parse_args(argv=None):
    """Command line -> (Config with preset and flags applied, dict of the flags given explicitly)."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "device_ids" in given:
        given["device_ids"] = tuple(given["device_ids"])
    for flag in ("grad_clip", "lr_n", "sigma_n"):
        if flag in given and not (math.isfinite(given[flag]) and given[flag] >= 0):
            raise UserError(f"--{flag} must be a non-negative number, got {given[flag]}")
    has_data = bool(given.get("train_data_dir") or given.get("test_data_dir"))
    preset = given.get("preset", "paper" if has_data else "cpu")
    values = {**PRESETS[preset], "preset": preset, **given}
    if given.get("builtin") == "rooms_ring_camera" and "log_dir" not in given:
        values["log_dir"] = "rooms"  # beside the default job's runs/default
    if "gradient_steps" in given and "train_minutes" not in given:  # a step count asked for is the step count
        values["train_minutes"] = 0.0
    if values.get("workers", AUTO) == AUTO:  # more loading processes than CPUs only adds switching (and warnings)
        values["workers"] = min(4, usable_cpus())
    return Config(**values), given


def is_cpu_preset(cfg):
    """Whether cfg trains the cpu preset's model the preset's way (its length, and how the run is carried out, may
    differ)."""
    run = RESUME_MAY_CHANGE | {"seed", "root_log_dir", "log_dir"}
    return all(getattr(cfg, k) == v for k, v in CPU_PRESET.items() if k not in run)


def check_config(cfg, world_size, fresh=True):
    """The flags' combinations; fresh=False for a resumed run (its built-in world's folders are in its config)."""
    if cfg.batch_size % world_size:
        raise UserError(f"--batch_size {cfg.batch_size} does not split evenly over {world_size} processes")
    if cfg.kernel_size % 2 == 0:
        raise UserError(f"--kernel_size {cfg.kernel_size}: must be odd, so that the state keeps its size")
    if cfg.image_size % 4:
        raise UserError(f"--image_size {cfg.image_size}: must be a multiple of 4 (the canvas is 4x the state)")
    if cfg.max_context and cfg.min_context > cfg.max_context:
        raise UserError(f"--min_context {cfg.min_context} is more than --max_context {cfg.max_context}")
    if fresh and cfg.builtin != Config.builtin and cfg.train_data_dir:
        raise UserError(f"--builtin {cfg.builtin}: only for a run without data folders (it picks the built-in world)")
    if bool(cfg.train_data_dir) != bool(cfg.test_data_dir):
        missing = "--test_data_dir" if cfg.train_data_dir else "--train_data_dir"
        raise UserError(f"{missing} is missing: give both data folders, or neither for the default job")
    check_model(cfg)


# The flags that build the model (GQN's keyword for each). The volume's camera (fov, near, far) is checked on its
# own (check_camera), once the data has filled in what the flags did not give.
MODEL_FLAGS = {"representation": "representation", "layers": "L", "shared_core": "shared_core", "r_dim": "r_dim",
               "h_dim": "h_dim", "z_dim": "z_dim", "u_dim": "u_dim", "image_size": "image_size",
               "kernel_size": "kernel_size", "image_from_r": "image_from_r", "depth_samples": "depth_samples",
               "z_grid": "z_grid", "cell_rays": "cell_rays"}


def gqn_kwargs(cfg):
    """GQN's keyword arguments for the flags that decide the model's shapes and its depths along the rays."""
    return {kw: getattr(cfg, flag) for flag, kw in MODEL_FLAGS.items()}


def new_gqn(cfg):
    """The GQN the resolved config describes, freshly initialised (from torch's global RNG)."""
    from model import GQN

    return GQN(**gqn_kwargs(cfg), checkpoint_activations=cfg.checkpoint_activations, fov=cfg.fov, near=cfg.near,
               far=cfg.far)


def check_model(cfg):
    """Build the model the flags describe and run a forward and a generation on the meta device (shapes only, no
    memory, no arithmetic): any combination that would fail inside the model fails here, before anything is
    written, as one line naming the model's flags."""
    import warnings

    import torch

    from model import GQN

    s = cfg.image_size
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op": the error follows
            model = GQN(**gqn_kwargs(cfg))  # the camera (fov, near, far) comes later, maybe from the data
            x, v = torch.zeros(1, 1, 3, s, s), torch.zeros(1, 1, 7)
            model(x, v, torch.zeros(1, 7), torch.zeros(1, 3, s, s), cfg.sigma_f)
            model.generate(x, v, torch.zeros(1, 7))
    except (ValueError, RuntimeError) as e:
        flags = " ".join(f"--{f} {getattr(cfg, f)}" for f in ("representation", "image_size", "r_dim", "layers",
                                                               "kernel_size", "z_grid"))
        raise UserError(f"{flags}: the model cannot be built with these flags: "
                        f"{str(e).strip().splitlines()[0]}") from None


def check_camera(cfg):
    """The volume's camera model, once the data has filled in what the flags did not give (the other representations
    read no camera model)."""
    if cfg.representation != "volume":
        return
    if not (math.isfinite(cfg.fov) and 0 < cfg.fov < 180):
        raise UserError(f"--fov {cfg.fov}: must be between 0 and 180 degrees")
    if not (math.isfinite(cfg.far) and 0 < cfg.near < cfg.far):
        raise UserError(f"--near {cfg.near} and --far {cfg.far}: need 0 < near < far")
