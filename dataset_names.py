"""Data-set names: what --dataset and the data's own name stand for, and K, the largest context, that follows.

DeepMind's seven data sets (gqn_format.MAX_CONTEXT: the paper's K for each), torch-gqn's --dataset names for them
(Room, Jaco, Labyrinth, Shepard-Metzler), the built-in renderer's Shepard-Metzler sizes, and any other name, a data
set of the user's own, whose K is --max_context or half the views of a scene.
"""
import os
import re

from cli import UserError
from gqn_format import MAX_CONTEXT

# torch-gqn's --dataset names and the DeepMind data sets they stand for (same K within a family).
TORCH_GQN_NAMES = {
    "room": ("rooms_ring_camera", "rooms_free_camera_no_object_rotations",
             "rooms_free_camera_with_object_rotations"),
    "jaco": ("jaco",),
    "labyrinth": ("mazes",),
    "shepard-metzler": ("shepard_metzler_5_parts", "shepard_metzler_7_parts"),
}


SHEPARD_METZLER = r"shepard_metzler_\d+_parts"  # DeepMind's two sizes and the renderer's others


def dataset_family(name):
    """The data-set names --dataset `name` stands for (torch-gqn's names stand for several DeepMind ones), or ()."""
    family = TORCH_GQN_NAMES.get(name.lower()) or ((name,) if name in MAX_CONTEXT else ())
    if not family and re.fullmatch(SHEPARD_METZLER, name):
        family = (name,)
    return family


def stands_for(name, dataset):
    """Whether --dataset `name` names the data set `dataset` (Shepard-Metzler: objects of any number of parts)."""
    return dataset in dataset_family(name) or (name.lower() == "shepard-metzler"
                                               and bool(re.fullmatch(SHEPARD_METZLER, dataset)))


def derived_k(views):
    """K for a data set that is not DeepMind's: half the views of a scene (rooms: 5 of 10), at least 1."""
    return max(1, min(views - 1, views // 2))


def resolve_dataset(name, train, test, cfg, preset_context=None):
    """--dataset and the data's own name -> (its name, K = the largest context size, where K comes from).

    DeepMind's data sets (or torch-gqn's names for them) have the paper's K; any other name is a data set of its
    own, whose K is --max_context when given, else derived_k of its views per scene."""
    if train.dataset and test.dataset and train.dataset != test.dataset:
        raise UserError(f"--test_data_dir {cfg.test_data_dir} holds {test.dataset} but --train_data_dir "
                        f"{cfg.train_data_dir} holds {train.dataset}")
    if train.image_size != test.image_size:
        raise UserError(f"--test_data_dir {cfg.test_data_dir} has {test.image_size}x{test.image_size} images but "
                        f"--train_data_dir {cfg.train_data_dir} has {train.image_size}x{train.image_size}")
    recorded = train.dataset or test.dataset
    if name and recorded and name != recorded and not stands_for(name, recorded):
        if dataset_family(recorded):  # DeepMind's data under another DeepMind name would train with the wrong K
            raise UserError(f"--dataset {name} does not match the data: {cfg.train_data_dir} holds {recorded}")
        recorded = ""  # a name of the user's own: --dataset relabels it (and sets K if it names a DeepMind set)
    name = recorded or name
    if not name:  # a torch-gqn folder records no name, nor was one given: its parent folder names it
        name = os.path.basename(os.path.dirname(os.path.abspath(cfg.train_data_dir))) or "scenes"
    family = dataset_family(name)
    if family:
        return name, MAX_CONTEXT.get(family[0], MAX_CONTEXT["shepard_metzler_5_parts"]), "the paper's for " + name
    if cfg.max_context:
        by_preset = cfg.max_context == preset_context
        return name, cfg.max_context, "--max_context" + (f" (the {cfg.preset} preset's)" if by_preset else "")
    k = derived_k(train.views)
    return name, k, f"half of its {train.views} views per scene (--max_context sets it)"
