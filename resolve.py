"""A run resolved once: the flags, the checkpoint it resumes, its data and its processes -> a frozen Config, the
run's state and what setup needs (the data sets, the device, the batch's threads).

`resolve` is the one place where the configuration is completed: the resume rules (what a --resume may change),
the default job's built-in data, the data set's name and K, the volume's camera model from the data, the seed drawn
when none is given, the data folders made absolute. Afterwards the Config cannot change; only the RunState does.
Every rank resolves the same: rank 0 reads the checkpoint and sends it, errors are agreed on (distributed.agreed).
"""
import dataclasses
import os
import secrets
from dataclasses import dataclass

import config
from batch_threads import usable_cpus
from checkpoint import checkpoint_paths, recorded_folder, run_to_resume, saved_state
from cli import UserError
from config import RESUME_MAY_CHANGE, Config, RunState
from dataset_names import resolve_dataset, stands_for
from distributed import check_amp, pick_device
from gqn_dataset import open_split
from scheduler import anneal_steps


@dataclass
class Resolved:
    """What a run starts from."""
    cfg: Config
    state: RunState
    ckpt: dict            # the checkpoint resumed from, or None
    train_ds: object
    test_ds: object
    max_context: int      # K: the data set's largest context
    device: object
    threads: int          # threads a step's batch is split over (batch_threads.py)
    default_job: bool     # the cpu preset as it is, on the built-in data: budget.DEFAULT_JOB_SCORES applies
    notes: list           # lines for the printed config: where K and the camera model came from
    said: list            # one line for each flag given that has no effect here, or that a resume reads its own way


def resolve(cfg, given, dist):
    """parse_args's (cfg, given) -> Resolved, the same on every rank."""
    run_dir = os.path.join(cfg.root_log_dir, cfg.log_dir)
    ckpt = dist.broadcast(dist.agreed((lambda: run_to_resume(run_dir, cfg.resume)) if dist.master else lambda: None))
    cfg, state = (cfg, RunState.start(cfg)) if ckpt is None else resumed(cfg, given, ckpt)
    default_job = ckpt is None and not cfg.train_data_dir and not cfg.test_data_dir
    dist.agreed(lambda: config.check_config(cfg, dist.world_size, fresh=ckpt is None))
    if cfg.seed < 0:
        cfg = dataclasses.replace(cfg, seed=dist.broadcast(secrets.randbelow(2**31)))
    if default_job:
        dist.log(announce_default_job(cfg, run_dir))
        cfg = dataclasses.replace(cfg, **builtin_data(cfg.builtin, dist))

    def open_data():  # a resumed run reads the files its run began with, damaged or not, as that run did
        layouts = (ckpt or {}).get("data", {})
        train_ds = open_split(cfg.train_data_dir, "--train_data_dir", layouts.get("train_layout"))
        test_ds = open_split(cfg.test_data_dir, "--test_data_dir", layouts.get("test_layout"))
        preset_context = config.PRESETS[cfg.preset].get("max_context")
        return train_ds, test_ds, resolve_dataset(cfg.dataset, train_ds, test_ds, cfg, preset_context)

    train_ds, test_ds, (dataset, max_context, k_from) = dist.agreed(open_data)
    for _, why in train_ds.unreadable + test_ds.unreadable:
        dist.log(f"warning: {why}; its scenes are skipped where met")
    from_data = camera_from_data(cfg, given, train_ds) if ckpt is None else {}
    # the data set resolved, so config.json and the checkpoints say what was trained on; the folders absolute, so
    # that --resume finds the data from any working directory
    cfg = dataclasses.replace(cfg, dataset=dataset, **from_data, train_data_dir=os.path.abspath(cfg.train_data_dir),
                              test_data_dir=os.path.abspath(cfg.test_data_dir))
    dist.agreed(lambda: config.check_camera(cfg))  # the data's values beside any given by flag
    dist.agreed(lambda: check_camera_fits(cfg, given, train_ds))
    device = dist.agreed(lambda: pick_device(cfg.device_ids, dist))
    dist.agreed(lambda: check_amp(cfg.amp, device))
    if cfg.min_context > max_context and not cfg.max_context:
        raise UserError(f"--min_context {cfg.min_context}: more than the {max_context} context views ({k_from}) a "
                        f"scene of {dataset} may have")
    notes = [f"K={max_context}: {k_from}" + (f"; from the data's camera model: "
                                             f"{'  '.join(f'{k}={v:g}' for k, v in from_data.items())}"
                                             if from_data else "")]
    threads = share_threads(cfg, device, dist)
    said = flag_notes(cfg, given, dist, device, threads) + (resume_notes(cfg, given, state) if ckpt else [])
    return Resolved(cfg, state, ckpt, train_ds, test_ds, max_context, device, threads,
                    default_job and config.is_cpu_preset(cfg) and cfg.builtin == config.Config.builtin, notes, said)


def flag_notes(cfg, given, dist, device, threads):
    """A line for each flag given that does nothing on this machine or with these flags (harmless: noted, not
    refused)."""
    out = []
    if "device_ids" in given and (dist.on or device.type == "cpu"):
        why = "under torchrun each process takes cuda:LOCAL_RANK" if dist.on and device.type == "cuda" else \
            "no CUDA device here: training runs on the CPU" if device.type == "cpu" else ""
        out.append(f"note: --device_ids {' '.join(map(str, cfg.device_ids))} is ignored: {why}")
    if given.get("batch_threads", 1) > 1 and threads == 1:
        out.append(f"note: --batch_threads {cfg.batch_threads} is ignored: " +
                   ("with --compile a step is one graph" if cfg.compile else "on a GPU the batch is not split") +
                   ", so one thread takes it")
    camera = [f"--{k}" for k in ("fov", "near", "far", "depth_samples", "cell_rays") if k in given]
    if camera and cfg.representation != "volume":
        out.append(f"note: {' '.join(camera)} ignored: only --representation volume reads a camera model, not "
                   f"{cfg.representation}")
    return out


def announce_default_job(cfg, run_dir):
    steps = (f"as many steps of {cfg.batch_size} scenes as fit into {cfg.train_minutes:g} minutes on this CPU, at "
             f"most {cfg.gradient_steps}" if cfg.train_minutes else
             f"{cfg.gradient_steps} steps of {cfg.batch_size} scenes")
    world = "rooms like DeepMind's rooms_ring_camera" if cfg.builtin == "rooms_ring_camera" else \
        "Shepard-Metzler set"
    model = "a small GQN for a 2-core CPU" if cfg.preset == "cpu" else "the paper's GQN"
    return (f"No data folders given: the default job. It trains the '{cfg.preset}' preset, {model} "
            f"(L={cfg.layers}, {cfg.image_size}x{cfg.image_size} images, {steps}), on the built-in {world}, "
            f"into {run_dir}/. Pass --train_data_dir and --test_data_dir for the paper's configuration.")


def builtin_data(name, dist):
    """A default job's data: the built-in world `name` (config.BUILTIN_WORLDS), rendered once into data/builtin/,
    a folder of its own (DeepMind's converted data of the same name goes to data/<name>) -> its split folders."""
    from dataset.builtin import render_once

    if name == "rooms_ring_camera":
        from dataset.rooms import Rooms

        world, d = Rooms(), config.ROOMS_DATA
    else:
        from dataset.shepard_metzler import ShepardMetzler

        d = config.BUILTIN_DATA
        world = ShepardMetzler(d["parts"])
    out = os.path.join("data", "builtin", world.name)
    if dist.local_rank == 0:
        render_once(out, world, d["train_scenes"], d["test_scenes"], d["seed"], d["workers"])
    dist.barrier()
    return dict(train_data_dir=os.path.join(out, "train"), test_data_dir=os.path.join(out, "test"))


def share_threads(cfg, device, dist):
    """Threads a step's batch is split over (batch_threads.py): --batch_threads, 0 = a core each of this process's
    share of the CPUs (under torchrun the ranks on this machine share them); 1 on a GPU and with --compile."""
    if device.type != "cpu" or cfg.compile:
        return 1
    return cfg.batch_threads or max(1, usable_cpus() // dist.local_world_size)


def camera_from_data(cfg, given, ds):
    """--representation volume: the camera model the data records (fov, near, far) for each flag not given."""
    if cfg.representation != "volume":
        return {}
    return {k: float(getattr(ds, k)) for k in ("fov", "near", "far") if k not in given and getattr(ds, k, None)}


def check_camera_fits(cfg, given, ds):
    """--representation volume: a --fov, --near or --far given for data that records its camera model must fit it
    (the cameras' field of view is a fact of the data; the depths must overlap where its scenes lie)."""
    if cfg.representation != "volume" or "fov" not in given and "near" not in given and "far" not in given:
        return
    if "fov" in given and ds.fov and abs(cfg.fov - ds.fov) > 0.01:
        raise UserError(f"--fov {cfg.fov:g}: the data's cameras have a field of view of {ds.fov:g} degrees "
                        f"(recorded in {ds.root}); leave --fov out to take it")
    if ds.near and ds.far and (cfg.near >= ds.far or cfg.far <= ds.near):
        raise UserError(f"--near {cfg.near:g} --far {cfg.far:g}: the data's scenes lie between {ds.near:g} and "
                        f"{ds.far:g} from its cameras (recorded in {ds.root}); leave them out to take those")


# ------------------------------------------------------------------------------------------------ --resume

def resumed(cfg, given, ckpt):
    """The config and state a --resume continues with: the checkpoint's, with the flags that may change taken from
    the command line. A flag that would change the model, the data set or the optimisation is refused; one that
    names the saved value in another form (Room for rooms_ring_camera, 0 for 0.0) is the same flag."""
    old = Config.from_dict(ckpt["config"])
    for k, v in given.items():
        if k not in RESUME_MAY_CHANGE | {"root_log_dir", "log_dir"} and not same_value(k, v, old, "state" in ckpt):
            raise UserError(f"--{k} {v} differs from the run being resumed ({getattr(old, k)}); only "
                            f"{', '.join('--' + n for n in sorted(RESUME_MAY_CHANGE - {'resume'}))} may change")
    keep = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE - {"resume"}}
    if "gradient_steps" in given and "train_minutes" not in given:  # as on a fresh start: the count asked for
        keep["train_minutes"] = 0.0
    new = dataclasses.replace(old, **keep, root_log_dir=cfg.root_log_dir, log_dir=cfg.log_dir, resume=cfg.resume)
    latest = checkpoint_paths(os.path.join(cfg.root_log_dir, cfg.log_dir))[1]
    found = {k: recorded_folder(getattr(new, k), latest, f"--{k}") for k in ("train_data_dir", "test_data_dir")
             if k not in given and getattr(new, k)}
    new = dataclasses.replace(new, **found)
    state = saved_state(ckpt)
    if state.timed_ms and new.train_minutes:  # the length the budget fixed stands: it was timed once
        # (a checkpoint older than the run's state kept the length in gradient_steps, not the bound it was given)
        for flag in ("train_minutes", "gradient_steps") if "state" in ckpt else ("train_minutes",):
            if flag in given and given[flag] != getattr(old, flag):
                raise UserError(f"--{flag} {given[flag]:g}: this run's --train_minutes {old.train_minutes:g} budget "
                                f"fixed its length at {state.steps} steps; to train to step N, resume with "
                                f"--gradient_steps N alone (or --train_minutes 0)")
    elif "gradient_steps" in given:  # the count asked for (a budget not yet spent times it as its bound)
        state.steps = int(given["gradient_steps"])
    if not new.train_minutes or state.timed_ms:  # no budget, or one already spent: the length is the length
        state.resolve(new)
    return new, state


def resume_notes(cfg, given, state):
    """A line where a resumed run reads a flag its own way: a new length keeps the schedules it resolved."""
    if "gradient_steps" not in given or state.lr_n is None:
        return []
    return [f"note: --gradient_steps {state.steps} moves the run's end; its schedules keep the counts it resolved "
            f"(the learning rate over {state.lr_n:g} steps, σ over {state.sigma_n:g})"]


def same_value(flag, value, old, has_state=True):
    """Whether --flag value (already parsed: booleans and numbers in any spelling are values) means what `old` has.
    has_state: the checkpoint keeps the run's state apart from its config (an earlier version's config held the
    step counts --lr_n / --sigma_n resolved to in their place)."""
    saved = getattr(old, flag)
    if flag == "dataset":  # what the name stood for when the run started: a torch-gqn name or the DeepMind one
        return value == saved or stands_for(value, saved)
    if flag in ("lr_n", "sigma_n") and value < 1 <= saved and not has_state:  # the count that share resolved to
        return saved == anneal_steps(value, old.gradient_steps)
    return value == saved
