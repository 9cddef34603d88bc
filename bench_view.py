"""Viewer benchmark: the time from a browser camera to the image view.py sends, against GQN.generate per camera.

For the cpu preset's model and for the paper's networks, beside the same view computed from scratch by GQN.generate
(the reference) in the same run.

Camera to image is what view.py does for each camera the browser reports: the camera as a 7-d pose, the model's view
from the scene's context encoded once (GQN.encode_context, then generate_from: with `volume` only the query rays'
part runs), the picture enlarged for a 1400x700 viewport and encoded as PNG. The reference runs generate() on the
context views for every camera, as a renderer without the cache would. Untrained weights (speed does not depend
on them), 3 context views, one draw of z; cameras around a ring; the median over --cameras of them after a warm-up.

Several tabs (`--tabs 4`): view.py's own server and renderer thread with that many tabs dragging at once, each
moving its camera 10 times 16 ms apart (a browser reports a drag about 60 times a second), then waiting for the view
of where it stopped: that wait is what a user sees. One tab alone is the reference, in the same run. The tabs are
driven in this process (the page's websocket round trip on loopback is not in the numbers).

    python bench_view.py [--cameras 50] [--threads 2] [--tabs 4] [--drags 20]
"""
import dataclasses
import math
import socket
import statistics
import tempfile
import threading
import time
import types

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


DRAG_MOVES, DRAG_MS = 10, 16  # a drag: the camera moves 10 times, 16 ms apart; then the tab waits for its view


class DraggingTab:
    """A browser tab as view.py's server sees one (its id, GUI, camera and scene), whose user drags: `drags` times
    DRAG_MOVES camera moves, then the wait until the view of the last one arrives (ms, in .waits), then a pause."""

    def __init__(self, viewer, client_id, ring, drags, seed):
        self.viewer, self.client_id, self.gui, self.ring, self.drags = viewer, client_id, viewer.server.gui, ring, drags
        self.k, self.read, self.shown, self.waits, self.views = seed % len(ring), -1, -1, [], 0
        self.seen = threading.Condition()
        self.camera = self  # the viewer reads the camera's position, orientation and viewport from here
        self.image_height, self.image_width = VIEWPORT
        frustum = types.SimpleNamespace(on_click=lambda fn: fn)
        self.scene = types.SimpleNamespace(reset=lambda: None, set_background_image=self._shown,
                                           add_camera_frustum=lambda *a, **k: frustum)
        self.pause = [0.05 + 0.1 * ((seed * 7 + i * 3) % 10) / 10 for i in range(drags)]  # 50 to 150 ms, per tab

    position = property(lambda self: self._read(), lambda self, _: None)  # the bench, not the viewer, moves it
    wxyz = property(lambda self: self.ring[self.read][1])

    def _read(self):
        self.read = self.k  # the camera the renderer took: the view it sends shows this one
        return self.ring[self.k][0]

    def on_update(self, fn):
        pass

    def _shown(self, image, format):
        with self.seen:
            self.shown, self.views = self.read, self.views + 1
            self.seen.notify_all()

    def drag(self):
        for pause in self.pause:
            for _ in range(DRAG_MOVES):
                self.k = (self.k + 1) % len(self.ring)
                moved = time.perf_counter()
                self.viewer.request(self)
                time.sleep(DRAG_MS / 1000)
            k = self.k
            with self.seen:
                self.seen.wait_for(lambda: self.shown == k, timeout=30)
            self.waits.append(1000 * (time.perf_counter() - moved))
            time.sleep(pause)


def several_tabs(tabs, drags):
    """The cpu preset's model in view.py's Viewer on rendered Shepard-Metzler scenes; 1 and `tabs` tabs dragging at
    once -> [(number of tabs, median wait ms, 90th percentile, most, views sent per second)]."""
    from dataset import shepard_metzler
    from gqn_dataset import GQNDataset

    torch.manual_seed(0)
    model = GQN(**MODELS["cpu preset (volume, L=4, 32 px)"]).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        test = shepard_metzler.render_dataset(tmp, 0, 4, parts=5, progress=False)[-1]
        viewer = view.Viewer(model, GQNDataset(test), "127.0.0.1", port)
        ring = [browser_camera.pose_wxyz(p) for p in look_at(3.3, torch.linspace(0, 2 * math.pi, 73)[:-1],
                                                            torch.tensor(0.4))]
        try:
            for n in (1, tabs):
                users = [DraggingTab(viewer, 100 * n + i, ring, drags, seed=i) for i in range(n)]
                for u in users:
                    viewer.open_tab(u)
                threads = [threading.Thread(target=u.drag) for u in users]
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                seconds = time.perf_counter() - t
                waits = sorted(w for u in users for w in u.waits)
                rows.append((n, statistics.median(waits), waits[int(0.9 * (len(waits) - 1))], waits[-1],
                             sum(u.views for u in users) / seconds))
                for u in users:
                    viewer._close_tab(u)
        finally:
            viewer.stop()
    return rows


def run(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cameras", type=cli.positive_int, default=50, help="cameras timed per model (default 50)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--tabs", type=cli.positive_int, default=None,
                   help="instead: this many tabs dragging at once in view.py's server, against one tab alone")
    p.add_argument("--drags", type=cli.positive_int, default=20, help="drags per tab with --tabs (default 20)")
    args = p.parse_args(argv)
    if args.tabs:
        torch.set_num_threads(args.threads)
        print(f"view.py's server, tabs dragging at once: the wait from a drag's last move to its view; {args.drags} "
              f"drags a tab, {args.threads} threads, torch {torch.__version__}")
        print("| tabs | median wait | 90th percentile | longest | views sent per second |")
        print("|-----:|------------:|----------------:|--------:|----------------------:|")
        for n, med, p90, most, rate in several_tabs(args.tabs, args.drags):
            print(f"| {n:>4} | {med:>8.1f} ms | {p90:>12.1f} ms | {most:>4.0f} ms | {rate:>21.1f} |", flush=True)
        return
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
