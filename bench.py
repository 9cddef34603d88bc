"""Benchmark GQN training steps (Eslami et al. 2018; the paper's configuration: tower or pool, L=12 unshared, batch 36).

Times forward + backward + Adam steps of model.py's GQN against the plain, paper-faithful reference computation of
reference.py (`reference_elbo`) on the SAME weights, and prints a Markdown table with the ratio.
Each run is a fresh subprocess that alternates fast and reference training steps on the same model, so both
see the same machine load (the ratio per run is printed too); runs repeat, interleaved over the configurations.
Peak memory: on CUDA torch.cuda.max_memory_allocated per step (everything allocated: weights, Adam state,
activations); on the CPU a separate short process per path and the growth of its peak RSS (getrusage maxrss)
over the steps, i.e. activations, gradients and Adam state, not the weights and data that exist before.

    python bench.py                                  # CPU: --preset cpu-check; CUDA present: --preset paper-nets
    python bench.py --preset cpu-check               # tower, 5 views, batch 4, 64 px: unshared L=6, shared L=12
    python bench.py --preset cpu-check --amp bf16    # the same in bf16 (pays on CPUs with AVX-512 bf16 or AMX)
    python bench.py --preset small                   # a quick small configuration
    python bench.py --preset cpu-share --threads 1 --no_reference --against HEAD~3   # a cpu preset share, two revisions
    python bench.py --preset rooms-share --threads 1 --no_reference   # the rooms hour's share: 2x2 rays a cell, and 1
    python bench.py --preset paper-nets --device cuda --amp bf16 --compile --checkpoint_activations
    python bench.py --representation pool --layers 8 --shared_core False --batch_size 8 --context 3
"""
import argparse
import copy
import inspect
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import cli
from config import MODEL_FLAGS
from files import atomic_write
from cli import UserError, nonneg_int, positive_int, str2bool
from batch_threads import BatchThreads
from distributed import check_amp
from model import GQN
from reference import reference_elbo

PRESETS = {
    # a CPU check at the paper's image size: tower, 5 context views, batch 4, 64 px
    "cpu-check": [dict(representation="tower", L=6, shared_core=False, batch_size=4, context=5, image_size=64),
                  dict(representation="tower", L=12, shared_core=True, batch_size=4, context=5, image_size=64)],
    "small": [dict(representation="pool", L=4, shared_core=False, batch_size=4, context=3, image_size=32,
                   r_dim=64, h_dim=32, u_dim=32)],
    # one share of train.py's `cpu` preset step (batch 8 split over 2 threads): volume, L=4, 3x3 cores, 32 px, up to
    # 3 context views (a ragged mask, as the data draws them), the depth jitter drawn by the data
    "cpu-share": [dict(representation="volume", L=4, shared_core=False, batch_size=4, context=3, image_size=32,
                 r_dim=64, h_dim=32, u_dim=32, kernel_size=3, image_from_r=True)],
    # the same share as the rooms' hour trains it (up to 5 views, 32 depths a ray), with 2x2 rays a cell and with one
    "rooms-share": [dict(representation="volume", L=4, shared_core=False, batch_size=4, context=5, image_size=32,
                         r_dim=64, h_dim=32, u_dim=32, kernel_size=3, image_from_r=True, depth_samples=32,
                         cell_rays=cell_rays) for cell_rays in (2, 1)],
    # the paper's configuration (context: up to 5 views for rooms/jaco-like data; 5 here)
    "paper-nets": [dict(representation="tower", L=12, shared_core=False, batch_size=36, context=5, image_size=64),
              dict(representation="pool", L=12, shared_core=False, batch_size=36, context=5, image_size=64)],
}
MODEL_KEYS = tuple(MODEL_FLAGS.values())  # GQN's keywords, which a spec may set
MODEL_MODULES = ("model", "core", "conv_lstm", "representation", "volume", "cameras")


# ----------------------------------------------------------------------------------------- measuring

def model_at(rev):
    """GQN as model.py and its modules define it at git revision `rev`, imported beside this checkout's own."""
    import importlib
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    folder = tempfile.mkdtemp(prefix="gqn-bench-")
    for name in MODEL_MODULES:
        try:
            text = subprocess.run(["git", "-C", here, "show", f"{rev}:{name}.py"], capture_output=True, check=True).stdout
        except subprocess.CalledProcessError as e:
            raise UserError(f"--against {rev}: git show {rev}:{name}.py failed: {e.stderr.decode().strip()}") from None
        with open(os.path.join(folder, f"{name}.py"), "wb") as f:
            f.write(text)
    current = {name: sys.modules.pop(name, None) for name in MODEL_MODULES}
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("model").GQN
    finally:
        sys.path.remove(folder)
        for name, module in current.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module


def _maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(spec):
    """Time spec's paths, alternating step by step in this process -> dict(ms={path: [ms]}, peak={path: bytes}).

    Alternating fast and reference steps in one process gives both the same machine load (the CPU may be
    shared), so their ratio holds even when the absolute times drift. Peak memory per path: on CUDA from the
    allocator, reset before each step; on the CPU only meaningful with one path (the process's peak RSS growth).
    """
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = spec["config"]
    model = GQN(**{k: cfg[k] for k in MODEL_KEYS if k in cfg},
                checkpoint_activations=spec["checkpoint_activations"]).to(device)
    # The reference is the plain float32 NCHW computation whatever the flags: with --channels_last it gets its own
    # contiguous copy of the weights (NHWC weights would make its convolutions NHWC too, and slower, which would
    # flatter the ratio) and its own optimiser.
    ref_model = model
    if spec["channels_last"]:
        ref_model = copy.deepcopy(model)
        model = model.to(memory_format=torch.channels_last)
    x, v, x_q, v_q, eps, extra = batch_of(cfg, model, device, spec["channels_last"])
    B, sigma = cfg["batch_size"], 2.0
    fns = {"fast": torch.compile(model, mode=spec["compile_mode"]) if spec["compile"] else model,
           "reference": lambda *a, **k: reference_elbo(ref_model, *a, **k)}
    # fused Adam: the same for both paths, and the cheapest (on the CPU ~8x faster than the foreach default)
    opts = {"fast": torch.optim.Adam(model.parameters(), lr=5e-4, fused=True)}
    opts["reference"] = opts["fast"] if ref_model is model else \
        torch.optim.Adam(ref_model.parameters(), lr=5e-4, fused=True)
    if spec.get("against"):  # the same step with the model code of another revision, on a copy of the same weights
        fns["against"], opts["against"] = against_model(spec, cfg, model, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    threads = BatchThreads(spec.get("batch_threads", 1))

    def loss_of(path, share):
        # the reference is float32 whatever the flags: it is the baseline
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["amp"] == "bf16" and path != "reference"):
            out = fns[path](x[share], v[share], v_q[share], x_q[share], sigma, eps=eps[share],
                            **{k: t[share] for k, t in extra.items()})
        return -out.elbo.float().sum() / B, None  # the batch's mean loss, share by share

    def step(path):
        if path != "reference":  # the batch split over threads, a core each, as train.py's --batch_threads
            threads.step(lambda share: loss_of(path, share), B, fns[path].parameters() if path == "against" else
                         model.parameters())
        else:
            loss_of(path, slice(0, B))[0].backward()
        opts[path].step()
        opts[path].zero_grad(set_to_none=True)

    result = time_paths(step, spec, device, sync)
    if spec.get("profile"):  # where the fast path's time goes, by operator's self time
        result["profile"] = profile_fast(step, spec["profile"], device, sync)
    return result


def batch_of(cfg, model, device, channels_last):
    """A random batch of cfg's shape -> x, v, x_q, v_q, eps and, for volume, its mask and depth jitter (cameras
    around the object, 1 to M real views a scene)."""
    B, M, S = cfg["batch_size"], cfg["context"], cfg["image_size"]
    x, v = torch.rand(B, M, 3, S, S, device=device), torch.randn(B, M, 7, device=device)
    x_q, v_q = torch.rand(B, 3, S, S, device=device), torch.randn(B, 7, device=device)
    if channels_last:
        x_q = x_q.contiguous(memory_format=torch.channels_last)
    eps = torch.randn(B, *model.noise_shape, device=device)
    extra = {}
    if cfg["representation"] == "volume":
        from cameras import look_at
        yaw, pitch = 2 * math.pi * torch.rand(B, M + 1), 0.8 * torch.rand(B, M + 1) - 0.4
        cams = look_at(10 / 3, yaw, pitch).to(device)  # (B, M + 1, 7)
        v, v_q = cams[:, :M].contiguous(), cams[:, M].contiguous()
        extra = dict(mask=torch.arange(M, device=device) < torch.arange(B, device=device)[:, None] % M + 1,
                     depth_noise=torch.rand(B, model.training_noise()["depth_noise"][1][0], device=device))
    return x, v, x_q, v_q, eps, extra


def against_model(spec, cfg, model, device):
    """The model code of revision spec["against"] on a copy of model's weights -> (model, its optimiser)."""
    Old = model_at(spec["against"])
    known = inspect.signature(Old).parameters  # a revision before a model flag builds the model without it
    old = Old(**{k: cfg[k] for k in MODEL_KEYS if k in cfg and k in known},
              checkpoint_activations=spec["checkpoint_activations"]).to(device)
    weights = model.state_dict()
    old.load_state_dict({k: weights[k] for k in old.state_dict()})
    # eager, as the reference: with --compile, `--against HEAD` times what compiling gives
    return old, torch.optim.Adam(old.parameters(), lr=5e-4, fused=True)


def time_paths(step, spec, device, sync):
    """Warm-up steps, then spec["steps"] steps of each path in turn -> dict(ms={path: [ms]}, peak={path: bytes},
    first={path: ms of its first step})."""
    paths = spec["paths"]
    base = _maxrss_bytes()
    first = {}  # the first step of each path, with --compile its compilation
    for _ in range(spec["warmup"]):
        for path in paths:
            t0 = time.perf_counter()
            step(path)
            sync()
            first.setdefault(path, (time.perf_counter() - t0) * 1000)
    sync()
    ms, peak = {p: [] for p in paths}, {p: 0 for p in paths}
    for _ in range(spec["steps"]):
        for path in paths:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(path)
            sync()
            ms[path].append((time.perf_counter() - t0) * 1000)
            if device.type == "cuda":
                peak[path] = max(peak[path], torch.cuda.max_memory_allocated())
    if device.type == "cpu":
        peak = {p: _maxrss_bytes() - base for p in paths}
    return dict(ms=ms, peak=peak, first=first)


def profile_fast(step, n, device, sync):
    """n more steps of the fast path under the profiler -> its table of operators by self time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step("fast")
        sync()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=40)


def run_isolated(spec):
    """measure(spec) in a fresh subprocess, so that peak memory and caches are its own."""
    env = dict(os.environ)
    if spec.get("batch_threads", 1) > 1:  # as train.py: idle OpenMP threads that spin would steal the other cores
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(cfg):
    return (f"{cfg['representation']} L={cfg['L']} {'shared' if cfg['shared_core'] else 'unshared'} "
            f"B={cfg['batch_size']} M={cfg['context']} {cfg['image_size']}px" +
            (f" {cfg['depth_samples']} depths, {cfg['cell_rays']}x{cfg['cell_rays']} rays a cell"
             if "cell_rays" in cfg else ""))


def fmt_bytes(n):
    return f"{n / 2 ** 20:.0f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="named configurations (default: cpu-check on the CPU, "
                   "paper-nets on CUDA); the flags below override or, with --representation, replace it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast the model (not the reference)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (not the reference, nor --against's)")
    p.add_argument("--compile_mode", choices=["default", "reduce-overhead", "max-autotune"], default=None,
                   help="torch.compile mode; reduce-overhead adds CUDA graphs (implies --compile)")
    p.add_argument("--checkpoint_activations", action="store_true", help="recompute generation steps in backward")
    p.add_argument("--channels_last", action="store_true",
                   help="channels_last (NHWC) weights and inputs, as train.py --channels_last")
    p.add_argument("--representation", choices=["pyramid", "tower", "pool"],
                   help="time one configuration of this representation instead of the preset's (the paper's sizes: "
                        "L=12 unshared, batch 36, 5 views, 64 px, unless the flags below say otherwise)")
    p.add_argument("--layers", type=positive_int, help="L, generation steps (overrides the preset's)")
    p.add_argument("--shared_core", type=str2bool, help="True/False/1/0: one core for all L steps (overrides)")
    p.add_argument("--batch_size", type=positive_int, help="scenes per step (overrides the preset's)")
    p.add_argument("--context", type=positive_int, help="context views per scene")
    p.add_argument("--image_size", type=positive_int, help="image size in pixels (overrides the preset's)")
    p.add_argument("--steps", type=positive_int, help="timed steps per run (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=nonneg_int,
                   help="untimed steps first (default 1 on CPU, 5 on CUDA; more with --compile)")
    p.add_argument("--repeats", type=positive_int, default=2, help="runs of each measurement, interleaved (default 2)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (default 2)")
    p.add_argument("--batch_threads", type=positive_int, default=1,
                   help="split the fast path's batch over this many threads, a core each, as train.py does (default 1)")
    p.add_argument("--no_reference", action="store_true", help="skip the reference (it is slow at batch 36; it has "
                   "no volume representation, so cpu-share always skips it)")
    p.add_argument("--against", metavar="REV", help="also time the model code (model.py and its modules) of this git "
                   "revision on the same weights, step by step alternating with this checkout's")
    p.add_argument("--profile", type=nonneg_int, default=0, metavar="N",
                   help="after timing, profile N more steps of this checkout's model and print the top operators")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configs_of(args, device):
    """The configurations to time: the preset's (or --representation's, the paper's sizes), with the flags' sizes."""
    configs = [dict(c) for c in PRESETS[args.preset or ("paper-nets" if device == "cuda" else "cpu-check")]]
    if args.representation:  # a custom single configuration, the paper's defaults for what is not given
        configs = [dict(representation=args.representation, L=12, shared_core=False, batch_size=36, context=5,
                        image_size=64)]
    for c in configs:
        for key, val in (("L", args.layers), ("shared_core", args.shared_core), ("batch_size", args.batch_size),
                         ("context", args.context), ("image_size", args.image_size)):
            if val is not None:
                c[key] = val
    return configs


def run(argv=None):
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(measure(json.loads(args._worker))))
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    check_amp(args.amp, torch.device(device))
    configs = configs_of(args, device)
    if args.compile_mode:
        args.compile = True
    cuda = device == "cuda"
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else ((10 if args.compile else 5) if cuda else 1)
    if args.against:  # one error line for a revision git does not know, before any worker starts
        here = os.path.dirname(os.path.abspath(__file__))
        if subprocess.run(["git", "-C", here, "cat-file", "-e", f"{args.against}:model.py"],
                          capture_output=True).returncode:
            raise UserError(f"--against {args.against}: not a git revision of this checkout with a model.py")
    volume = any(c["representation"] == "volume" for c in configs)
    paths = ["fast"] + (["against"] if args.against else []) + ([] if args.no_reference or volume else ["reference"])
    name = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()}-core CPU, {args.threads} threads"
    print(f"# GQN training step (forward, backward, fused Adam), {name}, torch {torch.__version__}; {warmup} "
          f"warm-up + {steps} timed steps of each path per run, {args.repeats} runs")
    base = dict(device=device, threads=args.threads, batch_threads=args.batch_threads, amp=args.amp,
                compile=args.compile, compile_mode=args.compile_mode,
                checkpoint_activations=args.checkpoint_activations, channels_last=args.channels_last,
                against=args.against)
    timing, memory = time_configs(args, configs, paths, dict(base, steps=steps, warmup=warmup), cuda)
    rows, out = table(args, configs, paths, timing, memory)
    print("\n".join(rows))
    if args.json:
        atomic_write(args.json, json.dumps(dict(device=name, torch=torch.__version__, results=out), indent=1).encode())


def time_configs(args, configs, paths, base, cuda):
    """--repeats runs of every configuration, each in its own process -> (timing {config: [ms of each run]},
    memory {(config, path): peak bytes})."""
    timing, memory = {}, {}
    for rep in range(args.repeats):
        for i, c in enumerate(configs):
            r = run_isolated(dict(base, config=c, paths=paths, profile=args.profile if rep == args.repeats - 1 else 0))
            if r.get("profile"):
                print(f"# profile of {args.profile} steps, {describe(c)}\n{r['profile']}", file=sys.stderr)
            timing.setdefault(i, []).append(r["ms"])
            if cuda:
                for path in paths:
                    memory[(i, path)] = max(memory.get((i, path), 0), r["peak"][path])
            print(f"  run {rep + 1}: {describe(c)}: " + ", ".join(
                f"{p} {statistics.median(r['ms'][p]):.0f} ms/step" for p in paths) + (
                f" (the first step {r['first']['fast'] / 1000:.1f} s)" if args.compile and r["first"] else ""),
                file=sys.stderr, flush=True)
    if not cuda:  # the CPU's peak RSS is per process: one short run per path
        for i, c in enumerate(configs):
            for path in paths:
                r = run_isolated(dict(base, config=c, paths=[path], steps=1, warmup=1))
                memory[(i, path)] = r["peak"][path]
    return timing, memory


def table(args, configs, paths, timing, memory):
    """The results -> (the markdown table's rows, the JSON's records)."""
    flags = [f for f, on in (("bf16", args.amp == "bf16"),
                             (f"compile {args.compile_mode or ''}".strip(), args.compile),
                             ("ckpt", args.checkpoint_activations), ("channels_last", args.channels_last),
                             (f"batch over {args.batch_threads} threads", args.batch_threads > 1)) if on]
    rows = ["| configuration | path | ms/step (median) | steps/s | peak memory | speed-up (per run) |",
            "|---|---|---:|---:|---:|---|"]
    names = {"reference": "reference (float32)", "against": f"model.py at {args.against}" + (
        " (eager)" if args.compile else "")}
    out = []
    for i, c in enumerate(configs):
        runs = timing[i]
        for path in paths:
            med = statistics.median([t for r in runs for t in r[path]])
            label = "model.py" + (f" ({', '.join(flags)})" if flags else "") if path == "fast" else names[path]
            speedup = []
            for base_path in ("reference", "against") if path == "fast" else ():
                if base_path in paths:
                    ref_med = statistics.median([t for r in runs for t in r[base_path]])
                    per = [statistics.median(r[base_path]) / statistics.median(r["fast"]) for r in runs]
                    speedup.append(f"**{ref_med / med:.2f}x** ({', '.join(f'{s:.2f}' for s in per)}) vs "
                                   f"{names[base_path].split(' (')[0]}")
            peak = memory[(i, path)]
            rows.append(f"| {describe(c)} | {label} | {med:.0f} | {1000 / med:.2f} | {fmt_bytes(peak)} | "
                        f"{'; '.join(speedup)} |")
            out.append(dict(config=c, path=path, flags=flags, ms_median=med, peak_bytes=peak,
                            ms=[r[path] for r in runs]))
    return rows, out


def main(argv=None):
    cli.main(run, argv)


if __name__ == "__main__":
    main()
