#!/usr/bin/env python
"""Train or fine-tune InternImage for image classification with the 🤗 `Trainer` and the official recipe.

With no arguments it trains `internimage_digits` (a small InternImage, see `ARCHITECTURES`) on scikit-learn's
handwritten digits (no download, CPU; time and top-1 in benchmarks/RESULTS.md), evaluates it and saves it to
`outputs/internimage-digits`:

    python train_classification.py
    python train_classification.py --data_path /data/imagenet --architecture internimage_t_1k_224   # official recipe
    torchrun --nproc_per_node 8 train_classification.py --dataset_name imagenet-1k --bf16 true
    python train_classification.py args.yaml          # every argument from a JSON or YAML file

`--recipe` picks the defaults ("auto": `digits` for the embedded data, `in1k` from scratch, `22kto1k` when
fine-tuning `--model_name_or_path`); any argument given explicitly wins over the recipe.
"""

from __future__ import annotations

import argparse
import codecs
import io
import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import datasets
import evaluate
import numpy as np
import torch
import transformers
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value
from PIL import Image as PILImage
from timm.data import Mixup, create_transform
from transformers import (
    AutoModelForImageClassification,
    CLIPImageProcessor,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import training_recipe
from configuration_internimage import AUTO_MAP, VARIANTS, InternImageConfig, evaluation_transform
from modeling_internimage import InternImageForImageClassification
from training_recipe import STEP_STRATEGIES, EMACallback, InternImageTrainer, RecipeArguments, UsageError

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
METRIC_PATH = os.path.join(HERE, "metrics", "top_k_accuracy.py")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TRAINER_STATE_NAME = "trainer_state.json"  # the last file `Trainer._save_checkpoint` writes
DATASET_ALIASES = {"imagenet-1k": "ILSVRC/imagenet-1k", "imagenet1k": "ILSVRC/imagenet-1k"}

# Small named architectures for quick runs; the released ones come from `configuration_internimage.VARIANTS`.
ARCHITECTURES = {
    # 32x32 inputs, 0.44M parameters: the default run on the embedded digits (time, top-1: benchmarks/RESULTS.md).
    "internimage_digits": {
        "channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8], "drop_path_rate": 0.0, "image_size": 32,
    },
}


@dataclass
class ModelArguments:
    """Which model to train."""

    architecture: str | None = field(
        default=None,
        metadata={"help": f"Named architecture trained from scratch: {sorted(ARCHITECTURES) + sorted(VARIANTS)}."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Converted InternImage folder or Hub id to fine-tune (overrides architecture)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Load --model_name_or_path with its own remote code instead of this repository's classes."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise the classifier when the checkpoint has another label count."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Training/eval resolution (default: the model's)."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth rate (default: model's)."})
    dcn_backend: str | None = field(default=None, metadata={"help": "DCNv3 backend: auto, triton, cuda, pytorch."})


@dataclass
class DataArguments:
    """Where the images come from. Neither `dataset_name` nor `data_path`: the embedded digits."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, e.g. imagenet-1k (= ILSVRC/imagenet-1k, gated)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder: ROOT/train/<class>/* and ROOT/val/<class>/* (optional ROOT/train_list.txt, "
            "ROOT/val_list.txt with '<class>/<file> <label>' lines), or ROOT/<class>/* (a held-out split is made)."
        },
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the Hub dataset (needs --max_steps)."})
    image_column_name: str = field(default="image", metadata={"help": "Image column of a Hub dataset."})
    label_column_name: str = field(default="label", metadata={"help": "Label column of a Hub dataset."})
    validation_split_percentage: float = field(
        default=20.0, metadata={"help": "Held-out share when the data has no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    check_images: bool = field(
        default=True, metadata={"help": "Open every local image once before training and skip unreadable ones."}
    )


class TrainingArgumentParser(HfArgumentParser):
    """`HfArgumentParser` that raises `UsageError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


# `TrainingArguments` the recipe replaces: given explicitly they are an error, not silently ignored.
_SCHEDULE = "the schedule is the recipe's warmup + cosine (--warmup_epochs or --warmup_steps, --warmup_lr, --min_lr)"
_OPTIMIZER = "the optimizer is the recipe's AdamW (--weight_decay, --adam_beta1, --adam_beta2, --adam_epsilon)"
REPLACED_ARGUMENTS = {
    "lr_scheduler_type": _SCHEDULE,
    "lr_scheduler_kwargs": _SCHEDULE,
    "optim": _OPTIMIZER,
    "optim_args": _OPTIMIZER,
    "remove_unused_columns": "the image transforms need every column",
}
# Values the script sets whatever the recipe says; giving the same value explicitly is harmless.
FIXED_VALUES = {"remove_unused_columns": False}

# Arguments that act only in the presence (or absence) of others: name -> (the names it depends on, whether it
# acts, when it acts). Giving one with a non-default value where it would not act is an error.
ACTS_ONLY_WITH = {
    "mixup_prob": (("mixup", "cutmix"), lambda v: v["mixup"] > 0 or v["cutmix"] > 0, "with --mixup or --cutmix > 0"),
    "mixup_switch_prob": (
        ("mixup", "cutmix"), lambda v: v["mixup"] > 0 and v["cutmix"] > 0, "with both --mixup and --cutmix > 0"
    ),
    "model_ema_warmup": (("model_ema_decay",), lambda v: v["model_ema_decay"] > 0, "with --model_ema_decay > 0"),
    "color_jitter": (
        ("auto_augment",), lambda v: str(v["auto_augment"]).lower() == "none",
        "with --auto_augment none (timm applies auto-augment or colour jitter, not both)",
    ),
    "architecture": (
        ("model_name_or_path",), lambda v: v["model_name_or_path"] is None,
        "without --model_name_or_path (a checkpoint brings its architecture)",
    ),
    **{
        name: (("model_name_or_path",), lambda v: v["model_name_or_path"] is not None, "with --model_name_or_path")
        for name in ("trust_remote_code", "ignore_mismatched_sizes")
    },
    "data_path": (("dataset_name",), lambda v: v["dataset_name"] is None, "without --dataset_name (one data source)"),
    "check_images": (("data_path",), lambda v: v["data_path"] is not None, "with --data_path"),
    **{
        name: (("dataset_name",), lambda v: v["dataset_name"] is not None, "with --dataset_name")
        for name in ("dataset_config_name", "streaming", "image_column_name", "label_column_name")
    },
    "warmup_epochs": (
        ("warmup_steps",), lambda v: not v["warmup_steps"], "without --warmup_steps (one warmup length)"
    ),
    "ignore_checkpoints": (
        ("resume_from_checkpoint",), lambda v: v["resume_from_checkpoint"] is None, "without --resume_from_checkpoint"
    ),
}

ARGUMENT_RULES = (
    "Rules: an argument given on the command line or in the file wins over the recipe's default (shown as the "
    "default here for the recipe these arguments select). --save_steps, --eval_steps and --logging_steps imply the "
    "'steps' strategy unless --save_strategy, --eval_strategy or --logging_strategy is given too. learning_rate, "
    "warmup_lr and min_lr are for a total batch of --lr_reference_batch_size (512) and are multiplied by total batch "
    "/ 512, total batch = per_device_train_batch_size x processes x gradient_accumulation_steps (as the official "
    "recipe does). An argument that would have no effect (e.g. --color_jitter with auto-augment on) or a "
    "contradictory combination is an error that says what to change."
)
_LR_RULE = " Multiplied by total batch / --lr_reference_batch_size (linear scaling)."


def _argument_file(argv: list[str]) -> str | None:
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return argv[0]
    return None


def build_parser(add_help: bool = True) -> TrainingArgumentParser:
    """The parser of every argument, with the rules that transform values in `--help`."""
    parser = TrainingArgumentParser(
        (ModelArguments, DataArguments, RecipeArguments, TrainingArguments),
        description="Train or fine-tune InternImage for image classification with the official recipe.",
        epilog=ARGUMENT_RULES, add_help=add_help,
    )
    for action in parser._actions:
        if action.dest in ("learning_rate", "warmup_lr", "min_lr"):
            action.help = (action.help or "") + _LR_RULE
        elif action.dest in STEP_STRATEGIES and action.option_strings[0] == f"--{action.dest}":
            action.help = (action.help or "") + f" Given alone, it implies --{STEP_STRATEGIES[action.dest]} steps."
        elif action.dest in REPLACED_ARGUMENTS:
            action.help = f"Not used by this script: {REPLACED_ARGUMENTS[action.dest]}."
    return parser


_UNSET = object()


def _explicit_arguments(parser: TrainingArgumentParser, argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The arguments `argv` gives (typed as the parser types them) and what the parser did not recognise."""
    namespace = argparse.Namespace(**{action.dest: _UNSET for action in parser._actions})
    namespace, unknown = parser.parse_known_args(argv, namespace=namespace)
    return {name: value for name, value in vars(namespace).items() if value is not _UNSET}, unknown


def _file_arguments(parser: TrainingArgumentParser, path: str) -> dict[str, Any]:
    """The arguments of a JSON or YAML file, typed and checked as the same arguments on the command line."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    except OSError as error:
        raise UsageError(f"cannot read the argument file {path}: {error.strerror or error}") from None
    except (ValueError, yaml.YAMLError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {error}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of argument names to values, not {type(values).__name__}")
    argv, nulls = [], {}
    for name, value in values.items():
        if value is None:
            nulls[str(name)] = None
        elif isinstance(value, bool):
            argv += [f"--{name}", str(value).lower()]
        elif isinstance(value, list) and value:
            argv += [f"--{name}", *(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)]
        else:
            argv += [f"--{name}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    try:
        explicit, unknown = _explicit_arguments(parser, argv)
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    dests = {action.dest for action in parser._actions}
    unknown_names = [name for name in values if name not in dests] or unknown
    if unknown_names:
        raise UsageError(f"{path}: unknown arguments {unknown_names}; see --help")
    return {**explicit, **nulls}


def check_arguments(values: dict[str, Any], sources: dict[str, str], defaults: dict[str, Any]) -> None:
    """Raise `UsageError` for an explicit argument that would have no effect or a contradictory combination."""

    def show(name: str) -> str:
        value = getattr(values[name], "value", values[name])
        return f"{name}={value!r} ({sources.get(name, 'default')})"

    for name, reason in REPLACED_ARGUMENTS.items():
        if sources.get(name) == "given" and values[name] != FIXED_VALUES.get(name, _UNSET):
            raise UsageError(f"--{name} is not used by this script: {reason}")
    for steps, strategy in STEP_STRATEGIES.items():
        chosen = str(getattr(values[strategy], "value", values[strategy]))
        if sources.get(steps) == "given" and sources.get(strategy) == "given" and chosen != "steps":
            raise UsageError(
                f"--{steps} has no effect with --{strategy} {chosen}: drop --{strategy} (--{steps} alone implies "
                f"'steps') or drop --{steps}"
            )
    for name, (dependencies, acts, when) in ACTS_ONLY_WITH.items():
        if sources.get(name) == "given" and values[name] != defaults[name] and not acts(values):
            raise UsageError(
                f"--{name} {values[name]} has no effect here: it acts only {when}; now "
                f"{', '.join(map(show, dependencies))}. Drop --{name} or change that"
            )
    save, evaluate_ = (str(getattr(values[n], "value", values[n])) for n in ("save_strategy", "eval_strategy"))
    if values["load_best_model_at_end"] and save not in ("best", evaluate_):
        fix = f"--eval_strategy {save}" + (" --eval_steps N (N divides save_steps)" if save == "steps" else "")
        raise UsageError(
            f"--load_best_model_at_end needs a checkpoint at every evaluation, but {show('save_strategy')} and "
            f"{show('eval_strategy')}: pass {fix}, or --save_strategy best"
        )
    if values["streaming"] and values["max_steps"] <= 0:
        raise UsageError("--streaming needs --max_steps: a stream has no length to count epochs in")


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, RecipeArguments, TrainingArguments]:
    """Command line or a single JSON/YAML file; the chosen recipe provides every default not given
    (`training_recipe.resolve_arguments`). `-h`/`--help` shows the defaults of the recipe the arguments select."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(add_help=False)
    path = _argument_file(argv)
    if path is not None:
        explicit, unknown = _file_arguments(parser, path), []
    else:
        explicit, unknown = _explicit_arguments(parser, argv)
    recipe = training_recipe.choose_recipe(
        explicit.get("recipe", "auto"), explicit.get("dataset_name"), explicit.get("data_path"),
        explicit.get("model_name_or_path"),
    )
    if "-h" in unknown or "--help" in unknown:
        helper = build_parser()
        helper.set_defaults(**training_recipe.RECIPES[recipe])
        helper.print_help()
        raise SystemExit(0)
    if unknown:
        raise UsageError(f"unknown arguments {unknown}; see --help")
    values, sources = training_recipe.resolve_arguments(recipe, explicit)
    defaults = {action.dest: action.default for action in reversed(parser._actions)}
    check_arguments({**defaults, **values}, sources, defaults)
    try:
        return parser.parse_dict(values)
    except (ValueError, TypeError) as error:  # TrainingArguments' own consistency checks
        raise UsageError(str(error)) from None


# ----------------------------------------------------------------------------------------------------- data


def load_digits_splits(seed: int = 0, validation_share: float = 0.2) -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8, grayscale) as images, split stratified into train/validation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_index, eval_index = train_test_split(
        np.arange(len(pixels)), test_size=validation_share, random_state=seed, stratify=digits.target
    )
    features = datasets.Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(indices: np.ndarray) -> Dataset:
        images = [PILImage.fromarray(pixels[i], mode="L") for i in indices]
        return Dataset.from_dict({"image": images, "label": digits.target[indices].tolist()}, features=features)

    return DatasetDict(train=split(train_index), validation=split(eval_index))


def _image_problem(path: str, decode: bool) -> str | None:
    """Why `path` cannot be used as an image (`decode`: also open and verify it), or `None`."""
    if not os.path.isfile(path):
        return "missing"
    if os.path.getsize(path) == 0:
        return "empty file"
    if decode:
        try:
            with PILImage.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for corrupt files
            return f"unreadable ({type(error).__name__}: {error})"
    return None


class ListEntry(NamedTuple):
    """One image of a split: its path relative to the split folder, its label, and where it was found."""

    relative: str
    label: int
    where: str  # "FILE:LINE" of a list file, or the relative path of a scanned folder

    @property
    def folder(self) -> str | None:
        """The class folder the image sits in (the first path component), `None` for a file at the top."""
        parts = self.relative.replace("\\", "/").split("/")
        return parts[0] if len(parts) > 1 else None


def read_list_file(path: str) -> list[ListEntry]:
    """The `<class>/<file> <label index>` lines of a list file (blank lines skipped).

    Any other line (not UTF-8, no label, a label that is not a non-negative integer) is a `UsageError` naming the
    file and line; so is a file that lists nothing.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    entries = []
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UsageError(f"{where}: not UTF-8 text") from None
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9]+", parts[1]):
            raise UsageError(f"{where}: expected '<class>/<file> <label index>', got {line[:200]!r}")
        if "\0" in parts[0]:
            raise UsageError(f"{where}: the file name contains a NUL character")
        digits = parts[1].lstrip("0") or "0"
        if len(digits) > 18:
            raise UsageError(f"{where}: label {digits[:20]}... is out of range")
        entries.append(ListEntry(parts[0].strip(), int(digits), where))
    if not entries:
        raise UsageError(f"{path} lists no images")
    return entries


def _class_folders(split_dir: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _list_class_names(list_path: str, entries: list[ListEntry], split_dir: str) -> list[str]:
    """Class names by label index from a training list: each label is named after the folder its images sit in.

    There are `max label + 1` classes. A label must be below the number of class folders in `split_dir` (or, for
    a list of files without folders, the number of listed images); one label for two folders or two labels for one
    folder is a `UsageError` naming the line.
    """
    folders = _class_folders(split_dir)
    limit, limit_reason = (
        (len(folders), f"{split_dir} has {len(folders)} class folders")
        if folders else (len(entries), f"{list_path} lists {len(entries)} images")
    )
    names: dict[int, str] = {}
    labels: dict[str, int] = {}
    for entry in entries:
        if entry.label >= limit:
            raise UsageError(
                f"{entry.where}: label {entry.label} is out of range: {limit_reason} (labels 0..{limit - 1})"
            )
        if entry.folder is None:
            continue
        if names.setdefault(entry.label, entry.folder) != entry.folder:
            raise UsageError(
                f"{entry.where}: label {entry.label} belongs to folder {names[entry.label]!r} on an earlier line, "
                f"not {entry.folder!r}"
            )
        if labels.setdefault(entry.folder, entry.label) != entry.label:
            raise UsageError(
                f"{entry.where}: folder {entry.folder!r} has label {labels[entry.folder]} on an earlier line, "
                f"not {entry.label}"
            )
    num_classes = max(entry.label for entry in entries) + 1
    unused = sorted(set(range(num_classes)) - {entry.label for entry in entries})
    if unused:
        logger.warning(f"{list_path}: {len(unused)} label(s) below the largest have no image: {unused[:10]}")
    return [names.get(index, str(index)) for index in range(num_classes)]


def _check_eval_labels(entries: list[ListEntry], class_names: list[str]) -> None:
    """A validation list must use the training classes: labels in range, and in the same folders."""
    for entry in entries:
        if entry.label >= len(class_names):
            raise UsageError(
                f"{entry.where}: label {entry.label} is out of range: the training split has {len(class_names)} "
                f"classes (labels 0..{len(class_names) - 1})"
            )
        name = class_names[entry.label]
        if entry.folder is not None and name != str(entry.label) and entry.folder != name:
            raise UsageError(
                f"{entry.where}: label {entry.label} is folder {name!r} in the training split, not {entry.folder!r}"
            )


def _scan_class_folders(split_dir: str, class_names: list[str] | None) -> tuple[list[ListEntry], list[str]]:
    """Every image under `split_dir/<class>/`, labelled in the order of `class_names` (default: sorted folders)."""
    found = _class_folders(split_dir)
    if class_names is None:
        class_names = found
        if not class_names:
            raise UsageError(f"{split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>)")
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise UsageError(f"{split_dir} has classes the training split lacks: {unknown[:5]}")
    entries, empty = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(split_dir, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)) if name in found else []
        if not files:
            empty.append(name)
        entries.extend(ListEntry(f"{name}/{file}", label, f"{name}/{file}") for file in files)
    if empty:
        logger.warning(f"{split_dir}: {len(empty)} class(es) have no images: {', '.join(map(repr, empty[:10]))}")
    return entries, class_names


def _build_split(split_dir: str, entries: list[ListEntry], check_images: bool, features) -> Dataset:
    """The usable images of `entries`: missing and empty files are always skipped, undecodable ones with
    `check_images`; the skips are counted in one warning that names them."""
    paths, labels, skipped = [], [], []
    for entry in entries:
        path = os.path.join(split_dir, entry.relative)
        problem = _image_problem(path, decode=check_images)
        if problem is None:
            paths.append(path)
            labels.append(entry.label)
        else:
            where = entry.where if entry.where == entry.relative else f"{entry.where}: {entry.relative}"
            skipped.append(f"{where} ({problem})")
    if skipped:
        logger.warning(f"{split_dir}: skipped {len(skipped)} image(s): " + "; ".join(skipped[:10]))
    if not paths:
        raise UsageError(f"no usable image in {split_dir}")
    logger.info(f"{split_dir}: {len(paths)} images")
    return Dataset.from_dict({"image": paths, "label": labels}, features=features)


def _held_out_split(train: Dataset, validation_share: float, seed: int, root: str) -> DatasetDict:
    """Hold out `validation_share` percent, stratified by label when every class allows it."""
    try:
        split = train.train_test_split(test_size=validation_share / 100, seed=seed, stratify_by_column="label")
    except ValueError as error:  # e.g. a class with a single image
        logger.warning(f"{root}: the held-out split is not stratified by class ({error})")
        try:
            split = train.train_test_split(test_size=validation_share / 100, seed=seed)
        except ValueError as error:
            raise UsageError(
                f"{root}: cannot hold out {validation_share:g}% of {len(train)} images ({error}); add images, change "
                "--validation_split_percentage or give a val/ folder"
            ) from None
    return DatasetDict(train=split["train"], validation=split["test"])


def load_image_folder(root: str, validation_share: float, check_images: bool, seed: int) -> DatasetDict:
    """An ImageNet-layout or imagefolder-style local folder as train/validation splits of image paths.

    With `ROOT/<split>_list.txt` the listed label indices are used and each index is named after the folder its
    images sit in (e.g. `n01440764`); otherwise classes are the sorted sub-folder names of the training split.
    Problems with the lists are `UsageError`s naming the file and line; missing or unreadable images are skipped
    and counted (see `_build_split`).
    """
    if not os.path.isdir(root):
        raise UsageError(f"--data_path {root} is not a folder")
    train_dir = os.path.join(root, "train")
    eval_dirs = [os.path.join(root, split) for split in ("val", "validation")]
    eval_dir = next((path for path in eval_dirs if os.path.isdir(path)), None)
    if not os.path.isdir(train_dir):
        train_dir, eval_dir = root, None
    list_files = {split: os.path.join(root, f"{split}_list.txt") for split in ("train", "val")}
    if os.path.isfile(list_files["train"]):
        train_entries = read_list_file(list_files["train"])
        class_names = _list_class_names(list_files["train"], train_entries, train_dir)
    else:
        train_entries, class_names = _scan_class_folders(train_dir, None)
    features = datasets.Features({"image": Value("string"), "label": ClassLabel(names=class_names)})
    train = _build_split(train_dir, train_entries, check_images, features)
    if eval_dir is None:
        return _held_out_split(train, validation_share, seed, root)
    if os.path.isfile(list_files["val"]):
        eval_entries = read_list_file(list_files["val"])
        _check_eval_labels(eval_entries, class_names)
    else:
        eval_entries, _ = _scan_class_folders(eval_dir, class_names)
    return DatasetDict(train=train, validation=_build_split(eval_dir, eval_entries, check_images, features))


def load_hub_dataset(data_args: DataArguments, seed: int) -> DatasetDict | datasets.IterableDatasetDict:
    """A Hub (or cached) dataset with train and validation splits; images stay encoded until the transform."""
    name = DATASET_ALIASES.get(data_args.dataset_name, data_args.dataset_name)
    loaded = datasets.load_dataset(name, data_args.dataset_config_name, streaming=data_args.streaming)
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in loaded["train"].column_names:
            raise UsageError(
                f"{name} has no column {column!r} (columns: {loaded['train'].column_names}); "
                "set --image_column_name / --label_column_name"
            )
    eval_split = next((s for s in ("validation", "val") if s in loaded), None)
    if eval_split is None:
        if data_args.streaming:
            raise UsageError(f"{name} has no validation split; streaming cannot hold one out")
        held_out = loaded["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        loaded = DatasetDict(train=held_out["train"], validation=held_out["test"])
        eval_split = "validation"
    splits = {"train": loaded["train"], "validation": loaded[eval_split]}
    renames = {data_args.image_column_name: "image", data_args.label_column_name: "label"}
    renames = {column: target for column, target in renames.items() if column != target}
    splits = {
        key: split.rename_columns(renames).cast_column("image", Image(decode=False)) for key, split in splits.items()
    }
    return (datasets.IterableDatasetDict if data_args.streaming else DatasetDict)(splits)


def load_data(data_args: DataArguments, seed: int) -> tuple[DatasetDict, list[str]]:
    """The train/validation splits (columns `image`, `label`) and the class names (index -> name)."""
    if data_args.data_path is not None:
        splits = load_image_folder(
            data_args.data_path, data_args.validation_split_percentage, data_args.check_images, seed
        )
    elif data_args.dataset_name is not None:
        splits = load_hub_dataset(data_args, seed)
    else:
        splits = load_digits_splits(seed)
    label_feature = splits["train"].features["label"]
    if not isinstance(label_feature, ClassLabel):
        raise UsageError(f"The label column must be a ClassLabel (class names), got {label_feature}")
    if not data_args.streaming:
        for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
            if limit is not None:
                splits[split] = splits[split].shuffle(seed=seed).select(range(min(limit, len(splits[split]))))
    return splits, list(label_feature.names)


def load_rgb(value: str | dict | PILImage.Image) -> PILImage.Image:
    """Decode a path, an encoded `{"bytes", "path"}` record or a PIL image to RGB (grayscale, CMYK, alpha, palette)."""
    if isinstance(value, dict):
        value = PILImage.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value["path"]
    image = PILImage.open(value) if isinstance(value, str) else value
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


class SeededAugmentation:
    """A random training transform whose randomness depends only on (seed, epoch, sample index).

    Python, NumPy and torch RNGs are seeded per sample and restored afterwards, so a sample is augmented the same way
    whatever the number of workers or processes, and a resumed run re-creates exactly the batches it had not trained
    on (the Trainer fetches the next batch before it restores the checkpoint's RNG state). `epoch` is advanced by
    `AugmentationEpochCallback`.
    """

    def __init__(self, transform: Callable[[PILImage.Image], torch.Tensor], seed: int) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __call__(self, image: PILImage.Image, index: int) -> torch.Tensor:
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.random.default_generator.manual_seed(sample_seed)  # CPU only: torch.manual_seed also seeds CUDA (slow)
        try:
            return self.transform(image)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class AugmentationEpochCallback(TrainerCallback):
    """Tells `SeededAugmentation` which epoch starts (before the epoch's data loader workers are created)."""

    def __init__(self, augmentation: SeededAugmentation) -> None:
        self.augmentation = augmentation

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.augmentation.epoch = math.floor(state.epoch + 1e-6)


def _describe(value: str | dict | PILImage.Image) -> str:
    where = value.get("path") if isinstance(value, dict) else value
    return where if isinstance(where, str) else "(in memory)"


def make_batch_transform(
    images_to_tensors: Callable[[list[PILImage.Image], list[int] | None], list[torch.Tensor]],
    source: Dataset | None = None,
) -> Callable[[dict], dict]:
    """`set_transform` function: decode, convert to RGB and transform a batch.

    `images_to_tensors` gets the images and their `sample_index` values (`None` without that column). An image
    that does not decode (a corrupt file must not kill a data-loader worker, nor empty a batch mid-epoch) is
    replaced by the next decodable image of `source` (the untransformed split that `sample_index` indexes) with
    its label; without `source` (streaming, where `map` may drop rows) it is dropped. Either way with a warning.
    """

    def replacement(index: int) -> tuple[PILImage.Image, int] | None:
        for step in range(1, len(source)):
            row = source[(index + step) % len(source)]
            try:
                return load_rgb(row["image"]), row["label"]
            except Exception:  # PIL raises many types for corrupt files
                continue
        return None

    def transform(batch: dict) -> dict:
        images, labels, indices = [], [], []
        sample_indices = batch.get("sample_index", [None] * len(batch["label"]))
        for value, label, index in zip(batch["image"], batch["label"], sample_indices):
            try:
                image = load_rgb(value)
            except Exception as error:  # PIL raises many types for corrupt files
                found = replacement(index) if source is not None and index is not None else None
                if found is None:
                    logger.warning(f"Skipping an undecodable image {_describe(value)}: {error}")
                    continue
                logger.warning(f"Replacing an undecodable image {_describe(value)} by the next sample: {error}")
                image, label = found
            images.append(image)
            labels.append(label)
            indices.append(index)
        pixel_values = images_to_tensors(images, indices if "sample_index" in batch else None) if images else []
        return {"pixel_values": pixel_values, "labels": labels}

    return transform


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------------- model


def default_image_processor(image_size: int) -> CLIPImageProcessor:
    """The official evaluation transform: short side to `image_size` (crop ratio 1.0), centre crop, bicubic."""
    return CLIPImageProcessor(**evaluation_transform(image_size))


def build_model(
    model_args: ModelArguments, class_names: list[str]
) -> tuple[InternImageForImageClassification, CLIPImageProcessor]:
    """A named architecture from scratch, or a converted checkpoint with a (possibly new) classifier."""
    id2label = dict(enumerate(class_names))
    overrides = {"num_labels": len(class_names), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    for name in ("drop_path_rate", "dcn_backend", "image_size"):
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    if model_args.model_name_or_path is not None:
        loader = AutoModelForImageClassification if model_args.trust_remote_code else InternImageForImageClassification
        model = loader.from_pretrained(
            model_args.model_name_or_path, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            trust_remote_code=model_args.trust_remote_code, **overrides,
        )
        try:
            processor = CLIPImageProcessor.from_pretrained(model_args.model_name_or_path)
        except OSError:
            processor = default_image_processor(model.config.image_size)
    elif model_args.architecture in ARCHITECTURES:
        model = InternImageForImageClassification(
            InternImageConfig(**{**ARCHITECTURES[model_args.architecture], **overrides})
        )
        processor = default_image_processor(model.config.image_size)
    elif model_args.architecture in VARIANTS:
        model = InternImageForImageClassification(
            InternImageConfig.from_variant(model_args.architecture, label_set=None, **overrides)
        )
        processor = default_image_processor(model.config.image_size)
    else:
        raise UsageError(
            f"--architecture {model_args.architecture!r} is unknown; choose one of "
            f"{sorted(ARCHITECTURES) + sorted(VARIANTS)} or pass --model_name_or_path"
        )
    if model_args.image_size is not None:
        size = model_args.image_size
        processor.size, processor.crop_size = {"shortest_edge": size}, {"height": size, "width": size}
    model.config.auto_map = dict(AUTO_MAP)
    model.register_for_auto_class("AutoModelForImageClassification")
    return model, processor


# ----------------------------------------------------------------------------------------------------- main


def _is_complete_checkpoint(folder: str, needs_ema: bool) -> bool:
    """Whether a checkpoint was written to the end: its trainer state (the Trainer's last file) reads as JSON, and
    the EMA weights (written before it) are there when used."""
    if needs_ema and not os.path.isfile(os.path.join(folder, training_recipe.EMA_WEIGHTS_NAME)):
        return False
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def find_resume_checkpoint(output_dir: str, needs_ema: bool) -> str | None:
    """The newest complete `checkpoint-*` in `output_dir`; one cut off while being written is passed over."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        folder = os.path.join(output_dir, name)
        if match and _is_complete_checkpoint(folder, needs_ema):
            steps.append((int(match.group(1)), folder))
        elif match:
            logger.warning(f"{folder} is incomplete (cut off while being written); it is not resumed from")
    return max(steps)[1] if steps else None


def top_k_metrics() -> tuple[Callable, Callable]:
    """`preprocess_logits_for_metrics` (keep the 5 best classes) and `compute_metrics` (top-1, top-5 accuracy)."""
    metric = evaluate.load(METRIC_PATH, keep_in_memory=True)

    def keep_top5(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.topk(min(5, logits.shape[-1]), dim=-1).indices

    def compute_metrics(prediction) -> dict[str, float]:
        return metric.compute(predictions=prediction.predictions.tolist(), references=prediction.label_ids.tolist())

    return keep_top5, compute_metrics


def prepare_datasets(
    splits: DatasetDict, processor: CLIPImageProcessor, recipe_args: RecipeArguments,
    training_args: TrainingArguments, streaming: bool,
) -> tuple[Dataset, Dataset, SeededAugmentation | None]:
    """Training set with timm's augmentation (seeded per sample), evaluation set with the image processor."""
    train_transform = create_transform(
        input_size=processor.crop_size["height"], is_training=True, scale=(recipe_args.crop_scale_min, 1.0),
        hflip=recipe_args.hflip, color_jitter=recipe_args.color_jitter,
        auto_augment=None if recipe_args.auto_augment.lower() == "none" else recipe_args.auto_augment,
        interpolation="bicubic", mean=tuple(processor.image_mean), std=tuple(processor.image_std),
        re_prob=recipe_args.reprob, re_mode="pixel", re_count=1,
    )
    augmentation = SeededAugmentation(train_transform, training_args.seed)
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        logger.warning("Persistent workers do not see the epoch: augmentations are not seeded per epoch and sample")
        augmentation = None

    def augment(images: list[PILImage.Image], indices: list[int] | None) -> list[torch.Tensor]:
        if indices is None or augmentation is None:
            return [train_transform(image) for image in images]
        return [augmentation(image, index) for image, index in zip(images, indices)]

    def preprocess(images: list[PILImage.Image], indices: list[int] | None) -> list[torch.Tensor]:
        return list(processor(images=images, return_tensors="pt").pixel_values)

    if streaming:
        columns = ["image", "label"]
        return (
            splits["train"].map(make_batch_transform(augment), batched=True, remove_columns=columns),
            splits["validation"].map(make_batch_transform(preprocess), batched=True, remove_columns=columns),
            None,
        )
    train, evaluation = (
        split.add_column("sample_index", list(range(len(split)))) for split in (splits["train"], splits["validation"])
    )
    return (
        train.with_transform(make_batch_transform(augment, source=splits["train"])),
        evaluation.with_transform(make_batch_transform(preprocess, source=splits["validation"])),
        augmentation,
    )


def setup_logging(training_args: TrainingArguments) -> None:
    """Script messages at INFO on the main process; library verbosity from `--log_level` (default: warnings)."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    library_level = training_args.get_process_log_level()
    script_level = logging.INFO if training_args.should_log else library_level
    for name in (__name__, "training_recipe"):
        logging.getLogger(name).setLevel(min(script_level, library_level))
    datasets.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.set_verbosity(library_level)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, save (EMA weights when enabled), evaluate; returns the evaluation metrics."""
    model_args, data_args, recipe_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    if recipe_args.cpu_threads > 0:
        torch.set_num_threads(recipe_args.cpu_threads)
    for name, value in FIXED_VALUES.items():
        setattr(training_args, name, value)
    set_seed(training_args.seed)

    splits, class_names = load_data(data_args, training_args.seed)
    model, processor = build_model(model_args, class_names)
    logger.info(
        f"InternImage with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(class_names)} "
        f"classes, {processor.crop_size['height']}px; train/eval: {splits['train']}, {splits['validation']}"
    )

    train_dataset, eval_dataset, augmentation = prepare_datasets(
        splits, processor, recipe_args, training_args, data_args.streaming
    )
    lr_scale, warmup_steps = training_recipe.scale_learning_rates(
        training_args, recipe_args, None if data_args.streaming else len(splits["train"])
    )

    mixup = None
    if recipe_args.mixup > 0 or recipe_args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=recipe_args.mixup, cutmix_alpha=recipe_args.cutmix, prob=recipe_args.mixup_prob,
            switch_prob=recipe_args.mixup_switch_prob, label_smoothing=training_args.label_smoothing_factor,
            num_classes=len(class_names),
        )

    resume = training_args.resume_from_checkpoint
    if resume is None and not recipe_args.ignore_checkpoints:
        resume = find_resume_checkpoint(training_args.output_dir, recipe_args.model_ema_decay > 0)
    if resume is not None:
        logger.info(f"Resuming from {resume}")
    ema_callback = None
    if recipe_args.model_ema_decay > 0:
        ema_callback = EMACallback(recipe_args.model_ema_decay, recipe_args.model_ema_warmup, resume)

    callbacks = [ema_callback] if ema_callback else []
    if augmentation is not None:
        callbacks.append(AugmentationEpochCallback(augmentation))
    keep_top5, compute_metrics = top_k_metrics()
    trainer = InternImageTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=collate, processing_class=processor, compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=keep_top5, callbacks=callbacks,
        layer_decay=recipe_args.layer_decay, dcn_lr_multiplier=recipe_args.dcn_lr_multiplier,
        warmup_steps=warmup_steps, warmup_lr=recipe_args.warmup_lr * lr_scale, min_lr=recipe_args.min_lr * lr_scale,
        mixup=mixup, ema_callback=ema_callback, freeze_batchnorm=recipe_args.freeze_batchnorm,
    )

    train_result = trainer.train(resume_from_checkpoint=resume)
    with trainer.ema_weights():
        trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        weights = "EMA" if ema_callback else "final"
        print(
            f"{weights} weights: top-1 {metrics['eval_accuracy']:.2%}, top-5 {metrics['eval_top5_accuracy']:.2%} "
            f"on the held-out images; model saved to {training_args.output_dir}"
        )
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """The command line: `main`, with a `UsageError` reported as one `error:` line on stderr (exit status 2)."""
    try:
        main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
