"""view.py in a real browser: headless Chromium (Debian's package, driven by playwright; nothing downloaded) opens the
page, the first view arrives, a drag moves the camera, and the view shown is model.generate's for the camera the page
reports, pixel for pixel within JPEG-free rounding; bad input gets one line."""
import functools
import http.server
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, SIZE, free_port, make_checkpoint, make_data, run_script, script_error, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def start(argv, port, preexec_fn=None):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "view.py"), "--port", str(port), "--device", "cpu",
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "Serving" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "Serving the GQN viewer" in line, proc.stdout.read()[-2000:]
    return proc


def camera(page):
    """The camera of the view shown, as the page reports it: x y z yaw pitch (radians)."""
    values = page.locator("input").evaluate_all("els => els.map(e => e.value)")
    found = [v for v in values if len(v.split()) == 5 and all(p.replace(".", "").replace("-", "").isdigit()
                                                             for p in v.split())]
    return [float(p) for p in found[0].split()] if found else None


def view_pixels(page, size):
    """The model's view as shown: the canvas's screenshot sampled at the centre of each of the view's pixels (the view
    spans the canvas's height, centred) -> (size, size, 3) uint8."""
    from PIL import Image
    import io

    canvas = page.locator("canvas").first
    shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"))
    h, w = shot.shape[:2]
    cell = h / size
    ys = ((np.arange(size) + 0.5) * cell).astype(int)
    xs = (w / 2 + (np.arange(size) + 0.5 - size / 2) * cell).astype(int)
    return shot[ys][:, xs], shot


def shows_the_model(page, expected):
    """Whether the canvas shows model.generate's view for the camera the page reports (within JPEG-free rounding)."""
    raw = camera(page)
    return raw is not None and np.abs(view_pixels(page, SIZE)[0] - expected(raw)).mean() < 2.5


def vivid_checkpoint(path):
    """A tiny untrained GQN whose views differ from camera to camera and scene to scene (an untrained GQN draws
    nearly one grey from every camera)."""
    ckpt = make_checkpoint(path, representation="volume")
    state = torch.load(ckpt, weights_only=True)
    state["model"]["observation.weight"] *= 30
    torch.save(state, ckpt)
    return ckpt


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_the_page_shows_model_generate_for_the_camera_it_reports_and_a_drag_moves_it(tmp_path):
    from playwright.sync_api import sync_playwright

    import cameras
    from checkpoint import load_model
    from gqn_dataset import GQNDataset, fixed_views
    from view import draw_seed

    proc, port, ckpt, data = serving(tmp_path, scenes=3, vivid=True)
    model, _ = load_model(str(ckpt))
    ds = GQNDataset(data)
    context = fixed_views(0, 0, ds.views, 3)[0].tolist()
    frames, cams = ds.load(0, context)
    x = frames[None].float() / 255

    def expected(raw):
        v_q = cameras.pose7(torch.tensor(raw, dtype=torch.float32))[None]
        img = model.generate(x, cams[None], v_q, generator=torch.Generator().manual_seed(draw_seed(0, 0, 0)))
        return (img[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy().astype(int)

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 600})
            page.goto(f"http://localhost:{port}")
            page.get_by_label("cameras", exact=True).uncheck()  # frustums drawn over the view would hide its pixels
            wait_until(lambda: camera(page) is not None, "the first view")
            first = camera(page)
            # the background image reaches the canvas after the page's text: until then the view is not the model's
            wait_until(lambda: shows_the_model(page, expected), "the model's view from the camera the page reports")
            shown, _ = view_pixels(page, SIZE)
            page.screenshot(path=str(tmp_path / "viewer.png"))
            drag(page)
            wait_until(lambda: camera(page) != first, "a new camera after the drag")
            # the last request of the drag rendered and drawn: the view shown is the model's from the camera reported
            wait_until(lambda: shows_the_model(page, expected), "the model's view after the drag")
            moved = camera(page)
            assert moved != first and math.dist(moved[:3], first[:3]) > 0.1
            shown2, _ = view_pixels(page, SIZE)
            assert np.abs(shown2.astype(int) - shown).mean() > 1  # the view changed with the camera
            page.screenshot(path=str(tmp_path / "viewer_moved.png"))
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()  # never outlive the test (its own session would keep it running)
    assert proc.returncode == 130 and "Traceback" not in out  # Ctrl-C stops it cleanly
    shutil.copy(tmp_path / "viewer_moved.png", os.environ.get("GQN_VIEWER_SCREENSHOT", tmp_path / "kept.png"))


@pytest.mark.parametrize("case", ["missing checkpoint", "scene out of range", "port in use", "data of another size",
                                  "a moved run", "port out of range"])
def test_bad_input_gets_one_line(tmp_path, case):
    data = make_data(tmp_path / "test", scenes=3, views=6)
    ckpt = make_checkpoint(tmp_path / "c.pt")
    port = free_port()
    argv = {"missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pt"), "--data_dir", str(data)],
            "scene out of range": ["--checkpoint", str(ckpt), "--data_dir", str(data), "--scene", "3"],
            "port in use": ["--checkpoint", str(ckpt), "--data_dir", str(data)],
            "data of another size": ["--checkpoint", str(make_checkpoint(tmp_path / "c32.pt", image_size=2 * SIZE)),
                                     "--data_dir", str(data)],
            "a moved run": ["--checkpoint", str(moved_checkpoint(tmp_path))],
            "port out of range": ["--checkpoint", str(ckpt), "--data_dir", str(data), "--port", "80800"]}[case]
    import socket

    with socket.socket() as s:
        s.bind(("localhost", port))
        s.listen()
        r = run_script("view.py", "--port", port, "--device", "cpu", *argv)
    script_error(r, {"missing checkpoint": "no such checkpoint file", "scene out of range": "--scene 3: ",
                     "port in use": f"--port {port}: cannot serve", "data of another size": "--data_dir",
                     "a moved run": "--data_dir: the run's data folder /gone/sm/test is not there",
                     "port out of range": "--port: expected a port, 1 to 65535, got '80800'"}[case])


def moved_checkpoint(tmp_path):
    """A checkpoint whose run recorded its test split at a place that is gone, with nothing like it nearby."""
    path = make_checkpoint(tmp_path / "moved.pt")
    state = torch.load(path, weights_only=True)
    state["config"] = {"test_data_dir": "/gone/sm/test"}
    torch.save(state, path)
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_even_when_its_shell_ignored_sigint(tmp_path, sig):
    # a shell script's background job starts with SIGINT ignored, and Python keeps it so
    data = make_data(tmp_path / "test", scenes=2, views=6)
    ckpt = make_checkpoint(tmp_path / "c.pt", representation="volume")
    proc = start(["--checkpoint", str(ckpt), "--data_dir", str(data)], free_port(),
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        proc.send_signal(sig)  # at once: the server says it serves only once a signal stops it
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()  # never outlive the test (its own session would keep it running)
    assert proc.returncode == 130 and "Traceback" not in out
    assert out.strip().splitlines()[-1] == "stopped the viewer"


def handshake(url, **headers):
    """A websocket handshake with view.py -> the HTTP status it answered (101: accepted)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, additional_headers=headers, open_timeout=30):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def http_get(url, **headers):
    """-> (status, headers) of a GET of view.py's page."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def serving(tmp_path, scenes=2, vivid=False):
    """view.py serving a tiny model (vivid_checkpoint's with vivid) on localhost -> (process, port, checkpoint, its
    data)."""
    data = make_data(tmp_path / "test", scenes=scenes, views=6)
    ckpt = vivid_checkpoint(tmp_path / "c.pt") if vivid else make_checkpoint(tmp_path / "c.pt", representation="volume")
    port = free_port()
    return start(["--checkpoint", str(ckpt), "--data_dir", str(data)], port), port, ckpt, data


def stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    finally:
        proc.kill()


def test_a_web_page_of_another_site_cannot_drive_the_viewer(tmp_path):
    proc, port, _, _ = serving(tmp_path)
    try:
        here = f"ws://localhost:{port}"
        assert handshake(here, Origin=f"http://localhost:{port}") == 101  # the viewer's own page
        assert handshake(here) == 101  # a program (no Origin): this machine's own user
        assert handshake(here, Origin="http://evil.example") == 403  # another site open in the user's browser
        # a site whose name was pointed at 127.0.0.1 (DNS rebinding): its own origin, its own Host
        assert http_get(f"http://localhost:{port}/", Host=f"evil.example:{port}")[0] == 403
        assert http_get(f"http://localhost:{port}/")[0] == 200
    finally:
        stop(proc)


OPEN_SOCKET = """url => new Promise(done => {
    const ws = new WebSocket(url);
    ws.onopen = () => { ws.close(); done("open"); };
    ws.onerror = () => done("refused");
})"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_in_chromium_a_page_of_another_site_cannot_open_the_viewers_websocket(tmp_path):
    from playwright.sync_api import sync_playwright

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<p>another site</p>")
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site")))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    proc, port, _, _ = serving(tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{site.server_port}/")  # another site open in the user's browser
            assert page.evaluate(OPEN_SOCKET, f"ws://localhost:{port}") == "refused"
            page.goto(f"http://localhost:{port}")  # the viewer's own page: the same script opens it
            assert page.evaluate(OPEN_SOCKET, f"ws://localhost:{port}") == "open"
            browser.close()
    finally:
        stop(proc)
        site.shutdown()


def test_another_host_needs_the_token_it_prints(tmp_path):
    data = make_data(tmp_path / "test", scenes=2, views=6)
    ckpt = make_checkpoint(tmp_path / "c.pt", representation="volume")
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "view.py"), "--port", str(port), "--device", "cpu",
                             "--host", "127.0.0.2", "--checkpoint", str(ckpt), "--data_dir", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        while line and "Serving" not in line:
            line = proc.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        assert url.startswith(f"http://127.0.0.2:{port}/?token=") and len(url.split("token=")[1]) >= 20
        base = f"127.0.0.2:{port}"
        assert http_get(f"http://{base}/")[0] == 403  # no token
        assert http_get(f"http://{base}/?token=wrong")[0] == 403
        status, headers = http_get(url)
        assert status == 200
        cookie = headers["Set-Cookie"].split(";")[0]
        assert handshake(f"ws://{base}", Origin=f"http://{base}") == 403  # the page without the token's cookie
        assert handshake(f"ws://{base}", Origin=f"http://{base}", Cookie=cookie) == 101
        assert http_get(f"http://{base}/", Cookie=cookie)[0] == 200  # the page's own later requests
    finally:
        stop(proc)


class FakeClient:
    """What the viewer reads and writes of a browser tab, in this process: its id, camera, controls (the server's own
    GUI, as real as a tab's) and scene (the views drawn)."""

    def __init__(self, viewer, client_id=1):
        import types

        self.client_id, self.gui, self.shown = client_id, viewer.server.gui, []
        self.camera = types.SimpleNamespace(position=(3.0, 0.0, 1.0), wxyz=(1.0, 0.0, 0.0, 0.0), image_height=64,
                                            image_width=64, on_update=lambda fn: None)
        self.frustums, self.downloads = {}, {}
        self.scene = types.SimpleNamespace(reset=self.frustums.clear, add_camera_frustum=self._frustum,
                                           set_background_image=lambda image, format: self.shown.append(image))

    def _frustum(self, name, **kwargs):
        import types

        handle = types.SimpleNamespace(on_click=lambda fn: setattr(handle, "click", lambda: fn(None)), **kwargs)
        self.frustums[name] = handle
        return handle

    def send_file_download(self, name, data):
        self.downloads[name] = data


@pytest.fixture
def viewer(tmp_path):
    import view
    from checkpoint import load_model
    from gqn_dataset import GQNDataset

    ckpt, data = make_checkpoint(tmp_path / "c.pt", representation="volume"), make_data(tmp_path / "test", 3, 6)
    v = view.serve(load_model(str(ckpt))[0], GQNDataset(data), port=free_port(), samples=4)
    v.files = ckpt, data  # what render.py is given to draw the same
    yield v
    v.stop()


def test_out_of_range_controls_are_set_in_range_and_the_page_says_so(viewer):
    client = FakeClient(viewer)
    viewer.open_tab(client)
    wait_until(lambda: client.shown, "the first view")
    tab = viewer.tabs[client.client_id]
    for handle, bad, fixed, words in ((tab.samples_in, 0, 1, "draws of z: 1 to 16, not 0; set to 1"),
                                      (tab.samples_in, -5, 1, "not -5"), (tab.samples_in, 40, 16, "set to 16"),
                                      (tab.scene_in, 600, 2, "scene: 0 to 2, not 600; set to 2"),
                                      (tab.scene_in, -3, 0, "set to 0")):
        handle.value = bad
        assert handle.value == fixed and words in tab.note.content
    assert tab.context.scene == 0  # the scene set in range is the one shown
    tab.show_in.value = "spread"
    client.shown.clear()
    viewer.request(client)
    wait_until(lambda: client.shown, "a view of the draws' spread")


def test_bad_lists_of_context_views_are_refused_in_words_and_the_page_goes_on(viewer):
    client = FakeClient(viewer)
    viewer.open_tab(client)
    wait_until(lambda: client.shown, "the first view")
    tab = viewer.tabs[client.client_id]
    before = tab.context.views
    # empty, junk, a view past the scene's 6, a negative one, one twice, more than K = 5
    for text in ("", "foo", "9 1", "-1", "1 1", "0 1 2 3 4 5"):
        tab.context_in.value = text
        tab.show_scene()  # what the typing pause applies
        assert tab.context.views == before, text
        assert tab.note.content == "context views: give 1 to 5 distinct views of 0..5, e.g. `0 2 4`", text
    client.shown.clear()
    viewer.request(client)
    wait_until(lambda: client.shown, "a view after the bad lists")


@pytest.mark.parametrize("part", ["render", "show"])
def test_a_view_that_fails_is_said_on_the_page_and_the_next_one_renders(viewer, monkeypatch, part):
    """A failure in the model's render or in the page's notes drawn beside the view (Tab.show) is said on the page,
    and the render thread goes on: the next view renders."""
    import view_tab

    owner = viewer.renderer if part == "render" else view_tab.Tab
    original = getattr(owner, part)
    calls, read = [], threading.Event()

    def once_broken(*a, **k):
        if part == "show" and a[0].viewer is not viewer:  # the class is patched: only this viewer's tabs count
            return original(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory\nand more")
        read.wait(60)  # the tab's next view (its start camera) would write over the note before the test reads it
        return original(*a, **k)

    monkeypatch.setattr(owner, part, once_broken)
    client = FakeClient(viewer)
    viewer.open_tab(client)
    tab = viewer.tabs[client.client_id]
    wait_until(lambda: "could not be drawn: out of memory" in tab.note.content, "the failure said on the page")
    read.set()
    shown = len(client.shown)  # the tab's second request (its start camera) may have rendered already
    viewer.request(client)
    wait_until(lambda: len(client.shown) > shown, "the next view")
    assert client.shown[-1].shape[2] == 3


def test_each_tab_keeps_its_own_scene_context_and_draws(viewer):
    a, b = FakeClient(viewer, 1), FakeClient(viewer, 2)
    viewer.open_tab(a)
    viewer.open_tab(b)
    ta, tb = viewer.tabs[1], viewer.tabs[2]
    tb.scene_in.value = 2
    tb.resample.value = True  # a click: a new set of draws for this tab only
    assert (ta.context.scene, tb.context.scene) == (0, 2) and (ta.draw_set, tb.draw_set) == (0, 1)
    viewer._close_tab(b)
    assert list(viewer.tabs) == [1]


def model_view(model, ds, scene, count=3):
    """model.generate's view of `scene` (its fixed `count` context views, draw 0) from a camera the page reports ->
    the pixels a page should show."""
    import cameras
    from gqn_dataset import fixed_views
    from view import draw_seed

    frames, cams = ds.load(scene, fixed_views(0, scene, ds.views, count)[0].tolist())

    def expected(raw):
        v_q = cameras.pose7(torch.tensor(raw, dtype=torch.float32))[None]
        img = model.generate(frames[None].float() / 255, cams[None], v_q,
                             generator=torch.Generator().manual_seed(draw_seed(0, 0, 0)))
        return (img[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy().astype(int)
    return expected


def drag(page):
    """Drag across the middle of the page's 3D view, as a user orbits."""
    box = page.locator("canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 150, cy + 20, steps=10)
    page.mouse.up()


def number_box(page, label):
    """The box one types into of the control labelled `label` (a slider's number box follows its hidden input)."""
    return page.locator(f"xpath=//label[normalize-space()='{label}']/following::input[not(@type='hidden')][1]")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_two_tabs_one_changing_scene_and_one_dragging_do_not_disturb_each_other(tmp_path):
    from playwright.sync_api import sync_playwright

    from checkpoint import load_model
    from gqn_dataset import GQNDataset

    proc, port, ckpt, data = serving(tmp_path, scenes=3, vivid=True)
    model, ds = load_model(str(ckpt))[0], GQNDataset(data)
    scene0, scene2 = model_view(model, ds, 0), model_view(model, ds, 2)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            a, b = (browser.new_page(viewport={"width": 1400, "height": 600}) for _ in range(2))
            for page in (a, b):
                page.goto(f"http://localhost:{port}")
                page.get_by_label("cameras", exact=True).uncheck()
                wait_until(lambda: shows_the_model(page, scene0), "each tab's first view, of scene 0")
            number_box(b, "scene").fill("2")
            number_box(b, "scene").press("Enter")
            wait_until(lambda: shows_the_model(b, scene2), "scene 2 in the tab that chose it")
            before = camera(b)
            first = camera(a)
            drag(a)
            wait_until(lambda: camera(a) != first, "a new camera in the dragged tab")
            wait_until(lambda: shows_the_model(a, scene0), "scene 0 still, from the dragged tab's new camera")
            assert number_box(a, "scene").input_value() == "0"
            assert camera(b) == before and shows_the_model(b, scene2)  # the other tab: its camera, its scene
            browser.close()
    finally:
        stop(proc)


def test_a_typed_list_applies_once_typing_pauses_and_stays_and_the_slider_sets_the_count(viewer):
    import view_tab

    client = FakeClient(viewer)
    viewer.open_tab(client)
    tab = viewer.tabs[client.client_id]
    encoded = []
    context = viewer.renderer.context
    viewer.renderer.context = lambda scene, views: encoded.append(list(views)) or context(scene, views)
    for text in ("4", "4 ", "4 5"):  # keystrokes, as the page sends them
        tab.context_in.value = text
    assert encoded == []  # nothing yet: view 4 alone is never rendered on the way to "4 5"
    wait_until(lambda: tab.context.views == [4, 5] and tab.count_in.value == 2, "the list once typing paused",
               seconds=10 * view_tab.TYPING_PAUSE)
    assert encoded == [[4, 5]]
    tab.scene_in.value = 1  # a new scene keeps the user's own list
    assert tab.context.scene == 1 and tab.context.views == [4, 5]
    tab.count_in.value = 1  # the slider: the scene's own views, as many as it says
    assert tab.context.views == fixed_context(viewer.ds, 1, 1) and tab.context_in.value == str(tab.context.views[0])
    tab.scene_in.value = 2  # a new scene keeps the count
    assert tab.context.scene == 2 and tab.context.views == fixed_context(viewer.ds, 2, 1)


def test_the_cameras_can_be_clicked_and_a_saved_view_is_what_render_py_draws(viewer, tmp_path):
    import render
    import view_tab
    from browser_camera import pose_wxyz
    from PIL import Image

    client = FakeClient(viewer)
    viewer.open_tab(client)
    tab = viewer.tabs[client.client_id]
    views = tab.context.views
    held = [j for j in range(viewer.ds.views) if j not in views]
    assert sorted(client.frustums) == sorted([f"/context/view_{j}" for j in views] +
                                             [f"/held_out/view_{j}" for j in held])
    assert all("image" in client.frustums[f"/context/view_{j}"].__dict__ for j in views)
    assert not any("image" in client.frustums[f"/held_out/view_{j}"].__dict__ for j in held)  # no truth given away
    pose = tab.context.all_cameras[held[-1]]
    client.frustums[f"/held_out/view_{held[-1]}"].click()
    assert np.allclose(client.camera.position, pose[:3].numpy(), atol=1e-6)
    client.camera.wxyz = pose_wxyz(pose)[1]  # what the browser reports after the move
    viewer.request(client)
    wait_until(lambda: tab.truth_img.visible, "the truth at the held-out camera")
    # the frustum the camera stands in, and any within two of its sizes, are hidden (they would cover the model's
    # view); the others are seen
    cams = tab.context.all_cameras
    near = {j for j in range(len(cams)) if float((cams[j, :3] - pose[:3]).norm()) < 2 * tab.frustum_scale}
    hidden = {name for name, f in client.frustums.items() if not getattr(f, "visible", True)}
    assert held[-1] in near and len(near) < len(cams)
    assert hidden == {f"/{'context' if j in views else 'held_out'}/view_{j}" for j in near}

    tab.save()
    ckpt, data = viewer.files
    render.run(render.parse_args(["--checkpoint", str(ckpt), "--data_dir", str(data), "--out", str(tmp_path / "r.png"),
                                  "--context_views", *map(str, views), "--query_views", str(held[-1]),
                                  "--views", "0", "--samples", "4", "--seed", "0"]))
    assert client.downloads[f"scene0_view{held[-1]}.png"] == (tmp_path / "r.png").read_bytes()
    tab.save(orbit=view_tab.ORBIT)
    gif = Image.open(io.BytesIO(client.downloads["scene0_orbit.gif"]))
    assert gif.n_frames == view_tab.ORBIT
    client.camera.position = (2.0, 1.0, 0.5)  # no stored camera here
    tab.save()
    assert "scene0_camera.png" in client.downloads and tab.note.content.startswith("saved scene0_camera.png")


def test_a_camera_outside_the_trained_range_is_said(viewer):
    import cameras

    inside = viewer.renderer.context(0, [0]).all_cameras[1]
    far = cameras.pose7(torch.tensor([15.0, 0.0, 0.0, math.pi, 0.0]))
    assert viewer.outside_range(inside) == ""
    assert viewer.outside_range(far).startswith("**Outside the trained range**: this camera is 15.00 from the centre")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_a_jump_to_a_held_out_camera_shows_the_truth_beside_the_model_and_bad_values_leave_it_working(tmp_path):
    from playwright.sync_api import sync_playwright

    from checkpoint import load_model
    from gqn_dataset import GQNDataset

    proc, port, ckpt, data = serving(tmp_path, scenes=3)
    model, ds = load_model(str(ckpt))[0], GQNDataset(data)
    first, held = [j for j in range(ds.views) if j not in fixed_context(ds, 0, 3)][:2]  # a tab starts at the first
    raw = raw_pose(ds, 0, held)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 600})
            page.goto(f"http://localhost:{port}")
            page.get_by_label("cameras", exact=True).uncheck()
            wait_until(lambda: camera(page) is not None, "the first view")
            truth = page.get_by_text("truth at this held-out camera")
            page.get_by_label("go to camera").click()
            page.get_by_role("option", name=f"held-out view {held}").click()
            wait_until(lambda: np.allclose(camera(page), raw, atol=2e-3), f"the camera of held-out view {held}")
            wait_until(lambda: truth.is_visible(), "the truth beside the model's view")
            wait_until(lambda: shows_the_model(page, model_view(model, ds, 0)), "the model's view at that camera")
            page.screenshot(path=str(tmp_path / "held_out.png"))
            number_box(page, "draws of z").fill("0")  # bad values: set in range, said, and the page still renders
            number_box(page, "draws of z").press("Enter")
            wait_until(lambda: number_box(page, "draws of z").input_value() == "1", "draws of z set to 1")
            assert page.get_by_text("draws of z: 1 to 16, not 0; set to 1").is_visible()
            number_box(page, "number of context views").fill("1")
            number_box(page, "number of context views").press("Enter")
            one = fixed_context(ds, 0, 1)
            wait_until(lambda: number_box(page, "context views").input_value() == str(one[0]), "one context view")
            wait_until(lambda: shows_the_model(page, model_view(model, ds, 0, count=1)), "the view from one view")
            page.get_by_role("button", name="back to the start camera").click()
            wait_until(lambda: np.allclose(camera(page), raw_pose(ds, 0, first), atol=2e-3), "the start camera")
            browser.close()
    finally:
        stop(proc)


def raw_pose(ds, scene, view):
    """A stored camera as the page reports it: x y z yaw pitch."""
    pose = ds.load(scene, [view])[1][0]
    return [*pose[:3].tolist(), math.atan2(pose[3], pose[4]), math.atan2(pose[5], pose[6])]


def fixed_context(ds, scene, count):
    """The `count` context views the viewer (seed 0) shows first for a scene of ds."""
    from gqn_dataset import fixed_views

    return fixed_views(0, scene, ds.views, count)[0].tolist()


def test_inside_a_room_the_camera_is_on_the_ring_in_range_and_the_truth_is_beside_the_model(room_data, tmp_path):
    import view
    from browser_camera import pose_wxyz
    from checkpoint import load_model
    from dataset import rooms
    from gqn_dataset import GQNDataset

    ds = GQNDataset(room_data[1])  # 64 px rooms; the model draws at its own 32 px, as a run on them would
    model = load_model(str(make_checkpoint(tmp_path / "c.pt", representation="volume", **rooms.camera_model())))[0]
    viewer = view.serve(model, ds, port=free_port(), samples=2)
    try:
        client = FakeClient(viewer)
        viewer.open_tab(client)
        tab = viewer.tabs[client.client_id]
        pose = tab.context.all_cameras[tab.start_view()]
        assert float(pose[:3].norm()) < rooms.ROOM  # the tab starts inside the room, at a camera of the ring
        assert viewer.fov == rooms.camera_model()["fov"]
        client.camera.position, client.camera.wxyz = pose_wxyz(pose)  # where the browser went
        viewer.request(client)
        wait_until(lambda: tab.truth_img.visible, "the truth at the start camera")
        assert tab.range_note.content == "" and tab.note.content == ""
        client.camera.position = (3 * rooms.ROOM, 0.0, 1.0)  # out through the wall: past the ring the model knows
        viewer.request(client)
        wait_until(lambda: tab.range_note.content.startswith("**Outside the trained range**"), "the range note")
        assert not tab.truth_img.visible
    finally:
        viewer.stop()
