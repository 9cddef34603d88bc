"""One browser tab of view.py: its controls, its state (scene, context, draws, camera) and what its page shows.

Each tab is its own: one tab changing scene while another drags disturbs neither. The controls: the test scene, how
many context views (a slider, 1..K) or which (a list, applied once typing pauses, so that `99` is never rendered as
view 9 on the way), the number of draws of z, a new set of draws, what to show (one draw, the draws' mean, their
spread), the scene's cameras as frustums (context and held-out; a click on one, or the list, jumps there), back to
the start, and downloads of the view (PNG) or of an orbit from it (GIF), drawn by render.py's code. At a held-out
camera the panel shows the truth, the error of the draws' mean and, with draws, their spread, beside the model's
view (Eslami et al. 2018 compare the model with the truth at held-out views, figure 2). Outside the distances and
pitches of the data's cameras (the range the model was trained on), the page says so. A number typed past a
control's range is set in range, in words; nothing typed can stop the page.
"""
import math
import threading

import numpy as np
import torch

import pictures
from browser_camera import camera_pose, distance_and_pitch, pose_wxyz
from cameras import camera_frames
from cli import one_line
from gqn_dataset import DatasetError, fixed_views

SHOW = ("one draw", "mean of draws", "spread")
ROLL_NOTE = 1.0      # degrees of browser-camera roll past which the page says once that it is dropped
TYPING_PAUSE = 0.8   # seconds without a keystroke after which a typed list of context views applies
AT_CAMERA = 1e-3     # how near (7-d pose, any component) the browser's camera must be to a stored one to compare
RANGE_MARGIN = 0.1   # a camera within 10% beyond the trained distances (or 5 degrees of pitch) is still inside
NO_JUMP = "-"
ORBIT = 24           # cameras in a saved orbit (15 degrees apart)
FRUSTUM = 0.12       # a camera's frustum, as a share of the cameras' distance from the centre: seen from the others
CONTEXT_COLOUR, HELD_COLOUR = (255, 160, 40), (70, 150, 255)


PANEL_PX = 128       # the panel's pictures are enlarged by whole pixels to about this size


def as_image(view):
    """(3, S, S) in [0, 1] -> uint8 (kS, kS, 3) for the panel, enlarged k times (crisp pixels)."""
    k = max(1, PANEL_PX // view.shape[-1])
    return (view.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy().repeat(k, 0).repeat(k, 1)


class Tab:
    """One browser tab's controls and state; viewer: the Viewer (its renderer, lock and render queue)."""

    def __init__(self, viewer, client, scene, context, samples):
        self.viewer, self.client, self.ds = viewer, client, viewer.ds
        self.context, self.draw_set, self.roll_said, self.typed = None, 0, False, None
        self.chosen = bool(context)  # context views the user gave (kept for a new scene) or the scene's own
        self.frustums, self.hidden, self.frustum_scale = {}, set(), 0.0  # the scene's cameras drawn, and those hidden
        k = viewer.max_context
        count = len(context) if context else min(3, k)
        gui = client.gui
        gui.add_markdown(f"**GQN viewer**: {self.ds.dataset or 'scenes'}, {len(self.ds)} test scenes; drag to orbit.")
        self.scene_in = gui.add_slider("scene", 0, len(self.ds) - 1, 1, scene)
        self.count_in = gui.add_slider("number of context views", 1, k, 1, count)
        default = context or fixed_views(viewer.seed, scene, self.ds.views, count)[0].tolist()
        self.context_in = gui.add_text("context views", " ".join(str(int(i)) for i in default))
        self.samples_in = gui.add_slider("draws of z", 1, 16, 1, samples)
        self.show_in = gui.add_dropdown("show", SHOW, initial_value=SHOW[0])
        self.resample = gui.add_button("resample")
        self.frustums_in = gui.add_checkbox("cameras", True)
        self.jump_in = gui.add_dropdown("go to camera", (NO_JUMP,), initial_value=NO_JUMP)
        self.reset = gui.add_button("back to the start camera")
        self.save_view = gui.add_button("save this view (PNG)")
        self.save_orbit = gui.add_button("save an orbit from here (GIF)")
        self.time_out = gui.add_text("render time", "", disabled=True)
        self.pose_out = gui.add_text("camera (x y z yaw pitch)", "", disabled=True)
        self.range_note = gui.add_markdown("")
        self.note = gui.add_markdown("")
        blank = as_image(torch.zeros(3, viewer.size, viewer.size))
        self.truth_img, self.error_img, self.spread_img = (
            gui.add_image(blank, label=label, format="png", visible=False)
            for label in ("truth at this held-out camera", "error of the draws' mean", "spread of the draws"))
        self._callbacks()

    def _callbacks(self):
        self.scene_in.on_update(lambda _: self._within(self.scene_in, "scene", len(self.ds) - 1)
                                and self.show_scene(new_scene=True))
        self.count_in.on_update(lambda _: self._within(self.count_in, "number of context views",
                                                       self.viewer.max_context, low=1) and self._count())
        self.context_in.on_update(lambda _: self._typing())
        self.frustums_in.on_update(lambda _: self.show_scene())
        self.samples_in.on_update(lambda _: self._within(self.samples_in, "draws of z", 16, low=1) and self.rerender())
        self.show_in.on_update(lambda _: self.rerender())
        self.resample.on_click(lambda _: self.rerender(new_draws=True))
        self.jump_in.on_update(lambda _: self._jump())
        self.reset.on_click(lambda _: self.go_to(self.start_view()))
        self.save_view.on_click(lambda _: self.save())
        self.save_orbit.on_click(lambda _: self.save(orbit=ORBIT))

    # ------------------------------------------------------------------------------------------------ controls

    def _within(self, handle, what, high, low=0):
        """A number box's value -> True if it is a whole number in low..high; else it is set to the nearest that is
        (which calls back again) and the page says so -> False."""
        value = handle.value
        fixed = min(high, max(low, round(value))) if math.isfinite(value) else low
        if fixed == value:
            return True
        self.note.content = f"{what}: {low} to {high}, not {value:g}; set to {fixed}"
        handle.value = fixed
        return False

    def _count(self):
        """The slider: the scene's own fixed views, as many as it says (unless the list already has that many: the
        page itself sets the slider to the count of a typed list, and that must not replace the list)."""
        if self.context is not None and len(self.context.views) == int(self.count_in.value):
            return
        views = fixed_views(self.viewer.seed, int(self.scene_in.value), self.ds.views, int(self.count_in.value))[0]
        self._set_list(views.tolist())

    def _chose(self):
        """A list the user typed applies, and stays for the next scene (every scene has the same views)."""
        self.chosen = True
        self.show_scene()

    def _set_list(self, views):
        self.typed, self.chosen = None, False
        self.context_in.value = " ".join(str(int(i)) for i in views)
        self.show_scene()

    def _typing(self):
        """A keystroke in the list: it applies once typing pauses (each keystroke restarts the wait)."""
        text = self.context_in.value
        if self.context is not None and text == " ".join(map(str, self.context.views)):
            return  # set by the page itself
        self.typed = text
        timer = threading.Timer(TYPING_PAUSE, lambda: self.typed == text and self._chose())
        timer.daemon = True
        timer.start()

    def _context_views(self, new_scene):
        scene, k = int(self.scene_in.value), self.viewer.max_context
        if new_scene and not self.chosen:  # a new scene: its own fixed context views, as many as the tab had
            views = fixed_views(self.viewer.seed, scene, self.ds.views, int(self.count_in.value))[0]
            self.context_in.value = " ".join(str(int(i)) for i in views)
        try:
            views = [int(t) for t in self.context_in.value.replace(",", " ").split()]
        except ValueError:
            views = []
        if not (1 <= len(views) <= k and len(set(views)) == len(views) and all(0 <= j < self.ds.views for j in views)):
            n, m = self.ds.views, min(3, k)
            example = " ".join(str(j) for j in range(0, n, max(1, n // m))[:m])
            self.note.content = f"context views: give 1 to {k} distinct views of 0..{n - 1}, e.g. `{example}`"
            return None
        return scene, views

    def show_scene(self, new_scene=False):
        """The scene and context the controls say: encoded once, its cameras drawn, the view rendered again."""
        self.typed = None
        chosen = self._context_views(new_scene)
        if chosen is None:
            return
        try:
            context = self.viewer.renderer.context(*chosen)
        except DatasetError as e:  # a damaged scene: the one shown stays
            self.note.content = f"scene {chosen[0]} cannot be read: {e}"
            return
        with self.viewer.lock:
            self.context = context
        if self.count_in.value != len(context.views):
            self.count_in.value = len(context.views)
        held = [j for j in range(self.ds.views) if j not in context.views]
        self.jump_in.options = (NO_JUMP, *(f"context view {j}" for j in context.views),
                                *(f"held-out view {j}" for j in held))
        self._frustums(context)
        self.rerender()

    def _frustums(self, context):
        """The scene's cameras as frustums, sized to be seen from each other: the context views (orange, showing their
        images) and the held-out views (blue, empty: their pictures are what the model is asked for). Clicking one
        moves the view there."""
        with self.viewer.lock:  # the render thread hides some of them (_clear_view): one scene's set at a time
            self._add_frustums(context)

    def _add_frustums(self, context):
        scene = self.client.scene
        scene.reset()
        self.frustums, self.hidden = {}, set()
        if not self.frustums_in.value:
            return
        scale = self.frustum_scale = FRUSTUM * float(context.all_cameras[:, :3].norm(dim=-1).mean())
        for j, cam in enumerate(context.all_cameras):
            position, wxyz = pose_wxyz(cam)
            kind = "context" if j in context.views else "held_out"
            image = {} if kind == "held_out" else {
                "image": context.images[context.views.index(j)].permute(1, 2, 0).numpy(), "format": "png"}
            frustum = scene.add_camera_frustum(
                f"/{kind}/view_{j}", fov=math.radians(self.viewer.fov), aspect=1.0, scale=scale, wxyz=wxyz,
                position=position, color=CONTEXT_COLOUR if kind == "context" else HELD_COLOUR, **image)
            frustum.on_click(lambda _, j=j: self.go_to(j))
            self.frustums[j] = frustum

    def _clear_view(self, v_q):
        """Hide the frustums within two of their sizes of the camera v_q (7,): the one it stands in, and any so near
        that it would cover the model's view; show the others again."""
        with self.viewer.lock:  # a scene change (_frustums, another thread) may be replacing them
            cameras = self.context.all_cameras
            near = {j for j in self.frustums if float((cameras[j, :3] - v_q[:3]).norm()) < 2 * self.frustum_scale}
            for j in near ^ self.hidden:
                self.frustums[j].visible = j not in near
            self.hidden = near

    # ------------------------------------------------------------------------------------------------ the camera

    def start_view(self):
        """The camera a tab starts from: the scene's first held-out view."""
        return next(j for j in range(self.ds.views) if j not in self.context.views)

    def _jump(self):
        choice = self.jump_in.value
        if choice != NO_JUMP:
            self.go_to(int(choice.split()[-1]))

    def go_to(self, view):
        """Move the browser's camera to the scene's stored camera `view`."""
        v = self.context.all_cameras[view]
        camera = self.client.camera
        camera.position = tuple(float(a) for a in v[:3])
        o, d, _, _ = camera_frames(v)
        camera.look_at = tuple(float(a) for a in o + d * o.norm())  # the origin, for cameras that look at it
        camera.up_direction = (0.0, 0.0, 1.0)
        self.rerender()

    def rerender(self, new_draws=False):
        with self.viewer.lock:
            self.draw_set += int(new_draws)
        self.viewer.request(self.client)

    # ------------------------------------------------------------------------------------------------ the page

    def show(self, v_q, roll, draws, context, ms):
        """What the page shows beside a view rendered for this tab's camera v_q (7,): its time and camera, whether it
        lies in the trained range, and at a held-out camera the truth, the error of the draws' mean and their
        spread."""
        raw = [*v_q[:3].tolist(), math.atan2(v_q[3], v_q[4]), math.atan2(v_q[5], v_q[6])]
        self.time_out.value = f"{ms:.1f} ms ({self.show_in.value})"
        self.pose_out.value = " ".join(f"{a:.6f}" for a in raw)
        self.range_note.content = self.viewer.outside_range(v_q)
        self._clear_view(v_q)
        if abs(roll) > ROLL_NOTE and not self.roll_said:
            self.roll_said = True
            self.note.content = ("The browser's camera is rolled; a GQN pose (x, y, z, yaw, pitch) has no roll, so the "
                                 "view is drawn unrolled.")
        at = held_at(context, v_q)
        if at is not None:
            truth = self.viewer.renderer.truth(context.scene, at)
            self.truth_img.image = as_image(truth)
            self.error_img.image = as_image(pictures.error(draws.mean(0, keepdim=True), truth[None])[0])
            if len(draws) > 1:
                self.spread_img.image = as_image(pictures.spread(draws[:, None])[0])
        self.truth_img.visible = self.error_img.visible = at is not None
        self.spread_img.visible = at is not None and len(draws) > 1

    def save(self, orbit=0):
        """The view from the tab's camera as a PNG (at a held-out camera with the truth, the error and the spread),
        or an orbit from it as a GIF, drawn by render.py's code and sent to the browser as a download."""
        context, camera = self.context, self.client.camera
        if context is None:
            return
        v_q = camera_pose(camera.position, camera.wxyz)[0]
        held = held_at(context, v_q)
        name = (f"scene{context.scene}_orbit.gif" if orbit else f"scene{context.scene}_camera.png" if held is None
                else f"scene{context.scene}_view{held}.png")
        try:
            data = self.viewer.renderer.saved(context, v_q, int(self.samples_in.value), held, orbit)
        except Exception as e:  # noqa: BLE001 - said on the page; the viewer goes on
            self.note.content = f"{name} could not be drawn: {one_line(e)}"
            return
        self.client.send_file_download(name, data)
        self.note.content = f"saved {name} ({len(data) // 1024 + 1} kB): your browser's downloads"


def held_at(context, v_q):
    """The held-out view whose stored camera v_q (7,) is at (AT_CAMERA), or None."""
    return next((j for j in range(len(context.all_cameras)) if j not in context.views and
                 (context.all_cameras[j] - v_q).abs().max() < AT_CAMERA), None)


def trained_range(ds, scenes=100):
    """The distances from the origin and pitches (degrees) of the cameras of up to `scenes` scenes of ds ->
    (lowest distance, highest, lowest pitch, highest), or None where no scene can be read."""
    found = []
    for i in range(min(scenes, len(ds))):
        try:
            found.append(torch.as_tensor(np.array(ds.encoded(i)[1], np.float32)))
        except DatasetError:
            continue
    if not found:
        return None
    dist, pitch = distance_and_pitch(torch.cat(found))
    return float(dist.min()), float(dist.max()), float(pitch.min()), float(pitch.max())
