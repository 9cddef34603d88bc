"""Viewer benchmark: the time from a browser camera to the image view.py sends, against GQN.generate per camera.

For the cpu preset's model and for the paper's networks, beside the same view computed from scratch by GQN.generate
(the reference) in the same run.

Camera to image is what view.py does for each camera the browser reports: the camera as a 7-d pose, the model's view
from the scene's context encoded once (GQN.encode_context, then generate_from: with `volume` only the query rays'
part runs), the picture enlarged for a 1400x700 viewport and encoded as PNG. The reference runs generate() on the
context views for every camera, as a renderer without the cache would. Untrained weights (speed does not depend
on them), 3 context views, one draw of z; cameras around a ring; the median over --cameras of them after a warm-up.

    python bench_view.py [--cameras 50] [--threads 2]
"""
import dataclasses
import math
import statistics
import time

import torch

import browser_camera
import cli
import config
import view
from cameras import look_at
from model import GQN

VIEWPORT = (700, 1400)


def preset_model(preset):
    """GQN kwargs of a train.py preset."""
    cfg = dataclasses.replace(config.Config(), **config.PRESETS[preset])
    return config.gqn_kwargs(cfg)


MODELS = {"cpu preset (volume, L=4, 32 px)": preset_model("cpu"),
          "paper's networks (pool, L=12, 64 px)": preset_model("paper")}


def ms(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def measure(kwargs, cameras, seed=0):
    torch.manual_seed(seed)
    model = GQN(**kwargs).eval()
    s = model.config["image_size"]
    x = torch.rand(1, 3, 3, s, s)
    v = look_at(10 / 3, torch.tensor([0.0, 2.1, 4.2]), torch.tensor(0.3))[None]
    ring = [look_at(10 / 3, torch.tensor([2 * math.pi * k / cameras]), torch.tensor(0.4))[0] for k in range(cameras)]
    context = model.encode_context(x, v)
    from viser._scene_api import _encode_image_binary

    def wxyz_of(pose):
        return browser_camera.pose_wxyz(pose)

    browser = [wxyz_of(p) for p in ring]  # cameras as the browser reports them: position and orientation
    state = {"k": 0}

    def camera_to_image(cached):
        position, wxyz = browser[state["k"] % cameras]
        state["k"] += 1
        v_q, _ = browser_camera.camera_pose(position, wxyz)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            img = model.generate_from(context, v_q[None], g) if cached else model.generate(x, v, v_q[None], generator=g)
        _encode_image_binary(view.picture(img[0], *VIEWPORT), "png")

    for cached in (True, False):  # warm-up: oneDNN builds its kernels
        for _ in range(3):
            camera_to_image(cached)
    return ms(lambda: camera_to_image(True), cameras), ms(lambda: camera_to_image(False), cameras)


def run(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cameras", type=cli.positive_int, default=50, help="cameras timed per model (default 50)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"camera to image, median over {args.cameras} cameras, {args.threads} threads, torch {torch.__version__}")
    print(f"| {'model':<38} | {'view.py':>9} | {'generate() per camera':>21} | {'speed-up':>8} |")
    print(f"|{'-' * 40}|{'-' * 10}:|{'-' * 22}:|{'-' * 9}:|")
    for name, kwargs in MODELS.items():
        ours, ref = measure(kwargs, args.cameras)
        print(f"| {name:<38} | {ours:>6.1f} ms | {ref:>18.1f} ms | {ref / ours:>7.2f}x |", flush=True)


def main(argv=None):
    cli.main(run, argv)


if __name__ == "__main__":
    main()
