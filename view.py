"""Look around a scene in the browser: a viewer that renders, with a trained GQN, each camera you orbit to.

The model sees context views of one test scene (Eslami et al. 2018, figure 1: a representation r of the context,
then the generation core, figure S2, with z from the prior) and draws the scene from the browser's camera; the
context cameras stand in the page as frustums showing their images, in the data's world frame (z up), so one sees
where the model was shown the scene. Built on viser (the web viewer under nerfstudio): the model's view is the
scene's background image, drawn at the model's size and enlarged by whole pixels (crisp), centred in the viewport
with the browser's vertical field of view set to the model's.

    python view.py                         # after the default job: runs/default's model and test split
    python view.py --checkpoint C --data_dir D/test --port 8080 --host 0.0.0.0
    # from Python, any GQN (torch.hub's included): view.serve(model, GQNDataset("D/test")).sleep_forever()

The browser's camera becomes the data's 7-d pose (DeepMind's convention, cameras.py): its position, yaw and pitch;
a 7-d pose has no roll, so a rolled browser camera is drawn unrolled, and the page says so once. Each browser tab has
its own controls and state (view_tab.py); view_gate.py says who may open one. A camera moved while a view is being
rendered replaces the tab's request waiting for the renderer: nothing queues behind a slow model. The scene's
context is encoded once (GQN.encode_context) and only the query camera's part runs per view.
"""
import math
import signal
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

import cli
import pictures
import view_gate
from browser_camera import camera_pose, distance_and_pitch
from cameras import ring
from checkpoint import input_size, load_model, recorded_folder, run_seed
from cli import UserError, one_line
from gqn_dataset import DatasetError, MAX_CONTEXT, open_split, resize
from view_tab import RANGE_MARGIN, SHOW, Tab, trained_range

BACKDROP = (32, 32, 32)  # the viewport outside the model's square view
# The background image's height at most: its PNG takes 8 ms to encode at 384 px against 30 ms at the 672 px of a
# 700 px viewport (2-core EPYC); the browser stretches it the rest of the way, softening only the blocks' edges.
MAX_HEIGHT = 400
SAVE_SCALE = 2  # saved pictures: each pixel of the model's view drawn 2x2, as render.py's --scale 2


def picture(view, height, width):
    """The model's view (3, S, S) in [0, 1] -> the background image (H, W, 3) uint8 of a viewport of this shape:
    enlarged by the largest whole factor that fits the viewport and MAX_HEIGHT (nearest neighbour: crisp pixels),
    centred on BACKDROP."""
    s = view.shape[-1]
    k = max(1, min(height, width, MAX_HEIGHT) // s)
    tile = (view.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy().repeat(k, 0).repeat(k, 1)
    h, w = k * s, max(k * s, round(k * s * width / max(1, height)))  # the viewport's aspect, at the view's scale
    out = np.empty((h, w, 3), np.uint8)
    out[:] = BACKDROP
    left = (w - k * s) // 2
    out[:, left:left + k * s] = tile
    return out


class Renderer:
    """A scene's context encoded once, and the model's views of it from any camera: draws of z, their mean, spread."""

    def __init__(self, model, ds, size, seed=0):
        self.model, self.ds, self.size, self.seed = model, ds, size, seed
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def context(self, scene, views):
        """Context views of a scene -> Context, r's part encoded (GQN.encode_context)."""
        frames, cams = self.ds.load(scene, views)
        x = (resize(frames, self.size) / 255).to(self.device)  # (K, 3, S, S)
        every = torch.as_tensor(np.array(self.ds.encoded(scene)[1], np.float32))  # the scene's every camera
        encoded = self.model.encode_context(x[None], cams[None].to(self.device))
        return Context(scene, list(views), frames, cams, every, encoded)

    def truth(self, scene, view):
        """A stored view of the scene at the model's size -> (3, S, S) in [0, 1]."""
        return resize(self.ds.load(scene, [view])[0], self.size)[0] / 255

    @torch.no_grad()
    def render(self, v_q, samples, show, draw_set, context):
        """The view from v_q (7,) -> ((3, S, S) in [0, 1]: draw 0 of `samples` (the same draw whatever their number),
        their mean or their spread; the draws (n, 3, S, S)). Draw k of set `draw_set` comes from its own generator
        (seed, set, k): the same camera and set give the same picture."""
        n = 1 if show == SHOW[0] else samples
        draws = torch.cat([self.model.generate_from(context.encoded, v_q[None].to(self.device),
                                                    torch.Generator(self.device).manual_seed(
                                                        draw_seed(self.seed, draw_set, k)))
                           for k in range(n)]).float().cpu()  # (n, 3, S, S)
        return (pictures.spread(draws[:, None])[0] if show == SHOW[2] else draws.mean(0)), draws

    def saved(self, context, v_q, samples, held=None, orbit=0):
        """What the tab sees, as render.py draws it (pictures.novel_views, z from render.py's seeds): from a held-out
        view's camera `held`, the context, the truth, the draws, their spread and the error of their mean; from any
        other camera v_q (7,), the context and the draws -> PNG bytes; with orbit=n, n cameras around the scene from
        v_q (its distance and pitch) -> GIF bytes."""
        frames, cams = self.ds[context.scene]
        queries = ring(v_q[None], orbit) if orbit else None if held is not None else v_q[None]
        panels = pictures.novel_views(self.model, frames, cams, context.views, 0, self.seed, self.size,
                                      samples=1 if orbit else samples, queries=queries,
                                      held=None if held is None else [held])
        return pictures.panels_bytes(panels, SAVE_SCALE, gif=bool(orbit))


@dataclass(frozen=True)
class Context:
    scene: int
    views: list
    images: torch.Tensor   # uint8 (K, 3, H, W), as stored
    cameras: torch.Tensor  # (K, 7)
    all_cameras: object    # the scene's every camera (S, 7): where a tab can jump, and the held-out ones
    encoded: object        # GQN.encode_context's


def draw_seed(seed, draw_set, k):
    return (seed * 1_000_003 + draw_set) * 1_000_003 + k


class Viewer:
    """The viser server, a Tab of controls and state for each browser tab, and a renderer thread that always takes
    the latest camera of each tab."""

    def __init__(self, model, ds, host="localhost", port=8080, scene=0, context=None, samples=8, seed=0, size=None,
                 fov=None, max_context=None, token=None):
        import viser

        self.model, self.ds, self.seed = model, ds, seed
        self.size = size or model.config["image_size"]
        self.max_context = min(ds.views - 1, max_context or MAX_CONTEXT.get(ds.dataset or "", ds.views - 1))
        self.fov = fov or model.config.get("fov") or ds.fov or 20.0  # the model's camera, degrees
        self.renderer = Renderer(model, ds, self.size, seed)
        self.trained = trained_range(ds)  # the data's camera distances and pitches: the range the model knows
        self.start = (scene, context, samples)  # what a new tab opens on
        self.lock = threading.Condition()
        self.pending, self.tabs, self.closed = {}, {}, False
        with view_gate.gated(view_gate.Gate(token)):  # other sites, and other machines without the token, refused
            self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.scene.set_up_direction("+z")  # the data's world: z up
        self.server.on_client_connect(self.open_tab)
        self.server.on_client_disconnect(self._close_tab)
        self.thread = threading.Thread(target=self._work, name="gqn-render", daemon=True)
        self.thread.start()

    def open_tab(self, client):
        """A browser tab connected: its own controls, on the scene the viewer was started with, from a held-out
        camera of it."""
        tab = Tab(self, client, *self.start)
        with self.lock:
            self.tabs[client.client_id] = tab
        tab.show_scene()
        if tab.context is None:
            return
        client.camera.fov = math.radians(self.fov)  # the browser sees what the model's camera would
        client.camera.on_update(lambda camera: self.request(camera.client))
        tab.go_to(tab.start_view())

    def outside_range(self, v_q):
        """A camera (7,) -> "" inside the distances and pitches of the data's cameras (with RANGE_MARGIN), else a
        line for the page saying where it is and what the model was trained on."""
        if self.trained is None:
            return ""
        d_lo, d_hi, p_lo, p_hi = self.trained
        d, p = (float(t) for t in distance_and_pitch(v_q))
        if d_lo * (1 - RANGE_MARGIN) <= d <= d_hi * (1 + RANGE_MARGIN) and p_lo - 5 <= p <= p_hi + 5:
            return ""
        return (f"**Outside the trained range**: this camera is {d:.2f} from the centre at pitch {p:.0f}°; the model "
                f"was trained on cameras {d_lo:.2f} to {d_hi:.2f} away at pitches {p_lo:.0f}° to {p_hi:.0f}°, so "
                f"what it draws here is a guess")

    def _close_tab(self, client):
        with self.lock:
            self.tabs.pop(client.client_id, None)
            self.pending.pop(client.client_id, None)

    # ------------------------------------------------------------------------------------------------ rendering

    def request(self, client):
        """The tab's current camera replaces whatever of its requests is still waiting."""
        with self.lock:
            self.pending[client.client_id] = client
            self.lock.notify()

    def _work(self):
        while True:
            with self.lock:
                while not self.pending and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                # The tab that has waited longest first (a dict keeps a waiting tab's place when its camera moves
                # again): with several tabs dragging, each gets every n-th render, none starves.
                client_id = next(iter(self.pending))
                client = self.pending.pop(client_id)
                tab = self.tabs.get(client_id)
                if tab is None or tab.context is None:
                    continue
                context, draw_set = tab.context, tab.draw_set
            camera = client.camera
            try:
                v_q, roll = camera_pose(camera.position, camera.wxyz)
                height, width = camera.image_height, camera.image_width
            except (AssertionError, ValueError):  # a camera the browser has not reported yet
                continue
            t = time.perf_counter()
            # Anything that fails here is said on the page, and this thread goes on: were it to end, no tab would
            # render again (the renderer, the picture and the page's notes alike).
            try:
                view, draws = self.renderer.render(v_q, int(tab.samples_in.value), tab.show_in.value, draw_set,
                                                   context)
                ms = 1000 * (time.perf_counter() - t)
                client.scene.set_background_image(picture(view, height or 512, width or 512), format="png")
                tab.show(v_q, roll, draws, context, ms)
            except Exception as e:  # noqa: BLE001 - shown on the page; the next camera renders again
                tab.note.content = f"This view could not be drawn: {one_line(e)}"

    def sleep_forever(self):
        while True:
            time.sleep(3600)

    def stop(self):
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        # a view still being drawn is finished before stop returns: nothing of a stopped viewer then touches its tabs
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)
        self.server.stop()


def serve(model, ds, host="localhost", port=8080, token=None, **kwargs):
    """Serve the viewer for `model` (a GQN in eval mode, e.g. torch.hub's) on the scenes of `ds` (a GQNDataset) ->
    Viewer, whose `url` opens it (with the token a --host other than localhost needs: view_gate.py); view.py's
    command line does this for a checkpoint."""
    check_port(host, port)
    token = token or view_gate.new_token(host)
    viewer = Viewer(model.eval(), ds, host, port, token=token, **kwargs)
    viewer.url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    return viewer


def check_port(host, port):
    """One line naming the port when it cannot be served on (viser would only warn and pick another)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"--port {port}: cannot serve on {host}:{port} ({e.strerror or e}); pass another "
                            f"--port") from None


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--checkpoint", default="runs/default/checkpoints/latest.pt",
      help="a train.py checkpoint (default: the default job's, runs/default/checkpoints/latest.pt)")
    a("--data_dir", default=None, help="split folder of the scenes to look at (default: the run's test split)")
    a("--scene", type=cli.nonneg_int, default=0, help="the test scene shown first (default 0)")
    a("--port", type=cli.port_number, default=8080, help="port to serve on, 1 to 65535 (default 8080)")
    a("--host", default="localhost",
      help="address to serve on (default localhost: this machine only, and no other web page may connect). Any "
           "other address (0.0.0.0: every interface) lets whoever reaches it on the network drive the viewer and "
           "see the scenes, with the token printed at start in the address to open")
    a("--seed", type=cli.nonneg_int, default=None, help="chooses the first context views and the draws "
                                                        "(default: the run's --seed)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu, cuda or cuda:N (default: cuda when present)")
    return p.parse_args(argv)


def run(args):
    device = cli.open_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    data_dir = args.data_dir or (ckpt.get("config") or {}).get("test_data_dir")
    if not data_dir:
        raise UserError(f"--data_dir: {args.checkpoint} records no test split; give --data_dir")
    if not args.data_dir:
        data_dir = recorded_folder(data_dir, args.checkpoint, "--data_dir")
    ds = open_split(data_dir, "--data_dir")
    size = input_size(ckpt, ds, data_dir, "--data_dir")
    if args.scene >= len(ds):
        raise UserError(f"--scene {args.scene}: {data_dir} has scenes 0..{len(ds) - 1}")
    try:
        ds.load(args.scene, [0])
    except DatasetError as e:
        raise UserError(f"--data_dir {e}") from None
    seed = run_seed(ckpt) if args.seed is None else args.seed
    # Ctrl-C and a service manager's SIGTERM stop it, even when started from a script that ignores SIGINT (a shell's
    # background job): Python keeps an ignored SIGINT ignored, and the server would never stop. Before the server
    # starts, so that a signal sent as soon as it says it serves is not lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    viewer = serve(model, ds, args.host, args.port, scene=args.scene, seed=seed, size=size,
                   max_context=(ckpt.get("data") or {}).get("max_context"))
    try:
        print(f"Serving the GQN viewer on {viewer.url} ({args.checkpoint}, {len(ds)} scenes of {data_dir}); "
              f"Ctrl-C stops it.", flush=True)
        viewer.sleep_forever()
    finally:
        viewer.stop()


def main(argv=None):
    cli.main(lambda argv: run(parse_args(argv)), argv, interrupted="stopped the viewer")


if __name__ == "__main__":
    main()
