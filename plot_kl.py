"""The KL of runs against the training step and against the pixel σ, from their TensorBoard logs, as one PNG; with
--object_score, beside them the object score of runs on the built-in rooms against the step.

Posterior collapse shows here first: a run whose latent is unused has a KL near zero, and whether it wakes up
depends on σ more than on the step (docs/default-run.md). An empty room shows in the object score (metrics.py): 1
while the model draws the room without its objects, falling as they appear. Each RUN is a run folder
(`runs/<log_dir>`), optionally followed by `=label`:

    python plot_kl.py --out docs/default_run_kl.png runs/old="σ 2.0→0.7, 3 views" runs/default="σ 2.0→0.1, 1-3 views"
    python plot_kl.py --object_score --out rooms.png runs/rooms_pool="pool" runs/rooms="volume + η_r"
"""
import io
import os

import cli
from files import write_out


def scalars(run, tags):
    """{tag: [(step, value), ...]} of a run folder's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    found = acc.Tags()["scalars"]
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in found}


def plot(out, runs, object_score=False):
    """runs: [(folder, label)] -> a PNG at out: the KL against the step, and against σ at that step (log scale); with
    object_score a third panel, the fixed test batch's object score against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18 if object_score else 12, 4.5), dpi=100, layout="constrained")
    by_step, by_sigma, *objects = fig.subplots(1, 3 if object_score else 2)
    for folder, label in runs:
        s = scalars(folder, ("train/kl", "schedule/sigma"))
        if len(s) < 2:
            raise cli.UserError(f"{folder}: no TensorBoard scalars train/kl and schedule/sigma (not a train.py run?)")
        kl = [max(v, 1e-3) for _, v in s["train/kl"]]  # log scale: a KL of 0 drawn at its floor
        line, = by_step.plot([st for st, _ in s["train/kl"]], kl, label=label)
        by_sigma.plot([v for _, v in s["schedule/sigma"]][:len(kl)], kl, color=line.get_color(), label=label)
        if object_score:
            plot_objects(objects[0], folder, label, line.get_color())
    for ax in (by_step, by_sigma):
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_ylabel("KL, nats per image (training batch)")
    by_step.set(xlabel="training step", title="KL(q || π) during training")
    by_sigma.set(xlabel="pixel σ at that step", title="the same against σ")
    by_sigma.invert_xaxis()  # σ falls as training goes on
    by_step.legend(fontsize=8)
    if object_score:
        objects[0].axhline(1, color="grey", ls="--", lw=1, label="the empty room")
        objects[0].set(xlabel="training step", ylabel="RMSE where the objects are / the empty room's", ylim=(0, 1.3),
                       title="object score (test batch; lower: the objects appear)")
        objects[0].grid(alpha=0.3)
        objects[0].legend(fontsize=8)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    write_out("--out", out, buf.getvalue())


def plot_objects(ax, folder, label, colour):
    s = scalars(folder, ("test/object_score",))
    if not s:
        raise cli.UserError(f"{folder}: no TensorBoard scalar test/object_score (not a run on the built-in rooms?)")
    ax.plot([st for st, _ in s["test/object_score"]], [v for _, v in s["test/object_score"]], color=colour,
            label=label)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN[=label]", help="run folders (runs/<log_dir>), each with a label")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--object_score", action="store_true", help="also the object score against the step (runs on the "
                                                               "built-in rooms)")
    args = p.parse_args(argv)
    args.runs = [tuple(r.split("=", 1)) if "=" in r else (r, os.path.basename(os.path.normpath(r))) for r in args.runs]
    for folder, _ in args.runs:
        if not os.path.isdir(folder):
            raise cli.UserError(f"{folder}: no such run folder")
    if not args.out.endswith(".png"):
        raise cli.UserError(f"--out {args.out}: must end in .png")
    return args


def main(argv=None):
    cli.main(lambda argv: (lambda a: plot(a.out, a.runs, a.object_score))(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
