"""`train_classification.py`'s data: local folders, list files, Hub-style folders (in process, one CLI run).

A problem in a list file (not UTF-8, no label, a label that is not a non-negative integer or is out of range, a
label and a folder that disagree) is one `error:` line naming the file and line, before any training; a listed file
that is missing, empty or unreadable, and an empty class folder, are skipped and counted in one warning. The list
parser is fuzzed with hypothesis.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("datasets")
pytest.importorskip("evaluate")

from training_helpers import (  # noqa: E402
    SCRIPT,
    WNIDS,
    make_imagenet_folder,
    photo_crops,
    read_json,
    run_command,
    run_script,
)

import train_classification  # noqa: E402
from train_classification import UsageError, load_image_folder, read_list_file  # noqa: E402

# ------------------------------------------------------------------------------------ an ImageNet-layout folder


def test_imagenet_folder_uses_list_labels_and_skips_bad_images(tmp_path, caplog):
    root = tmp_path / "imagenet"
    val_labels = make_imagenet_folder(root)
    splits = load_image_folder(str(root), 20.0, check_images=True, seed=0)
    assert splits["train"].features["label"].names == ["n01443537", "n01484850", "n01440764"]
    assert len(splits["train"]) == 18 + 4  # the corrupt and the missing file are skipped
    assert "skipped 2 image(s)" in caplog.text
    assert f"{root / 'train_list.txt'}:23: {WNIDS[1]}/corrupt.JPEG (unreadable" in caplog.text
    assert f"{root / 'train_list.txt'}:24: {WNIDS[2]}/missing.JPEG (missing)" in caplog.text
    for path, label in zip(splits["validation"]["image"], splits["validation"]["label"]):
        relative = "/".join(Path(path).parts[-2:])
        assert label == val_labels[relative]
    for path in splits["train"]["image"][-4:]:
        assert train_classification.load_rgb(path).mode == "RGB"


def test_missing_files_are_skipped_without_opening_images(tmp_path, caplog):
    """`--check_images false` skips decoding every image, not the (cheap) check that a listed file exists: a
    missing file must not reach the data loader mid-epoch."""
    root = tmp_path / "imagenet"
    make_imagenet_folder(root)
    splits = load_image_folder(str(root), 20.0, check_images=False, seed=0)
    assert len(splits["train"]) == 18 + 4 + 1  # only the missing file; the corrupt one is dropped when decoded
    assert f"skipped 1 image(s): {root / 'train_list.txt'}:24: {WNIDS[2]}/missing.JPEG (missing)" in caplog.text


def test_imagenet_folder_trains_and_evaluates_what_it_saved(tmp_path):
    """The in1k recipe (RandAugment, random erasing, mixup/cutmix, EMA) for an epoch in a worker process, images not
    checked beforehand: the missing file is skipped before training, the corrupt one replaced when its batch is
    loaded. The saved model, run on the validation list, gives the evaluated accuracy."""
    import torch
    from transformers import CLIPImageProcessor

    from modeling_internimage import InternImageForImageClassification

    root = tmp_path / "imagenet"
    val_labels = make_imagenet_folder(root)
    out = tmp_path / "out"
    log = run_script(
        tmp_path, "--data_path", str(root), "--architecture", "internimage_digits", "--image_size", "32",
        "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "1", "--save_strategy", "no",
        "--eval_strategy", "no", "--disable_tqdm", "true", "--cpu_threads", "1", "--check_images", "false",
    )
    assert "skipped 1 image(s)" in log  # 23 images: 6 batches of 4 make the first epoch
    assert f"Replacing an undecodable image {root / 'train' / WNIDS[1] / 'corrupt.JPEG'} by the next sample" in log
    config = read_json(out / "config.json")
    assert config["id2label"] == {"0": "n01443537", "1": "n01484850", "2": "n01440764"}
    assert read_json(out / "trainer_state.json")["global_step"] == 6
    model = InternImageForImageClassification.from_pretrained(out).eval()
    processor = CLIPImageProcessor.from_pretrained(out)
    images = [train_classification.load_rgb(str(root / "val" / name)) for name in val_labels]
    with torch.no_grad():
        predicted = model(processor(images=images, return_tensors="pt").pixel_values).logits.argmax(-1)
    accuracy = (predicted == torch.tensor(list(val_labels.values()))).double().mean().item()
    assert read_json(out / "eval_results.json")["eval_accuracy"] == pytest.approx(accuracy, abs=1e-12)


# ------------------------------------------------------------------------------------ list files: clear errors


def write_lines(path: Path, edits: dict[int, str]) -> None:
    """Replace lines of a list file (1-based line numbers; beyond the end: appended)."""
    lines = path.read_text().splitlines()
    for number, text in sorted(edits.items()):
        if number <= len(lines):
            lines[number - 1] = text
        else:
            lines.append(text)
    path.write_text("\n".join(lines) + "\n")


BAD_LISTS = {
    "non_integer_label": ("train", {3: f"{WNIDS[0]}/a.JPEG two"}, r"train_list.txt:3: expected '<class>/<file> <label"),
    "negative_label": ("train", {3: f"{WNIDS[0]}/a.JPEG -1"}, r"train_list.txt:3: expected"),
    "no_label": ("train", {3: f"{WNIDS[0]}/a.JPEG"}, r"train_list.txt:3: expected"),
    "label_out_of_range": (
        "train", {3: f"{WNIDS[0]}/a.JPEG 3"}, r"train_list.txt:3: label 3 is out of range: .*train has 3 class "
        r"folders \(labels 0..2\)",
    ),
    "huge_label": ("train", {3: f"{WNIDS[0]}/a.JPEG {'9' * 5000}"}, r"train_list.txt:3: label 9{20}\.\.\. is out of"),
    "label_in_two_folders": (
        "train", {9: f"{WNIDS[1]}/a.JPEG 2"}, r"train_list.txt:9: label 2 belongs to folder 'n01440764' on an "
        r"earlier line, not 'n01443537'",
    ),
    "folder_with_two_labels": (
        "train", {3: f"{WNIDS[0]}/a.JPEG 1"}, r"train_list.txt:3: folder 'n01440764' has label 2 on an earlier line",
    ),
    "not_utf8": ("train", {3: "caf\xe9.JPEG 1"}, r"train_list.txt:3: not UTF-8 text"),
    "val_label_out_of_range": (
        "val", {2: f"{WNIDS[0]}/a.JPEG 7"}, r"val_list.txt:2: label 7 is out of range: the training split has 3 "
        r"classes \(labels 0..2\)",
    ),
    "val_label_in_another_folder": (
        "val", {2: f"{WNIDS[0]}/{WNIDS[0]}_val_1.JPEG 0"}, r"val_list.txt:2: label 0 is folder 'n01443537' in the "
        r"training split, not 'n01440764'",
    ),
    "empty_list": ("val", None, r"val_list.txt lists no images"),
}


@pytest.mark.parametrize("name", sorted(BAD_LISTS))
def test_list_file_problems_name_the_file_and_line(name, tmp_path):
    split, edits, message = BAD_LISTS[name]
    root = tmp_path / "imagenet"
    make_imagenet_folder(root)
    path = root / f"{split}_list.txt"
    if edits is None:
        path.write_text("\n \n")
    elif name == "not_utf8":
        write_lines(path, {})
        lines = path.read_bytes().split(b"\n")
        lines[2] = edits[3].encode("latin-1")
        path.write_bytes(b"\n".join(lines))
    else:
        write_lines(path, edits)
    with pytest.raises(UsageError, match=message):
        load_image_folder(str(root), 20.0, check_images=False, seed=0)


def test_a_bad_list_stops_the_command_line_before_training_with_one_line(tmp_path):
    """The real command line: exit status 2, the last line of stderr `error: <file>:<line>: ...`, no traceback,
    nothing written."""
    root = tmp_path / "imagenet"
    make_imagenet_folder(root)
    write_lines(root / "train_list.txt", {5: f"{WNIDS[0]}/{WNIDS[0]}_train_4.JPEG 12"})
    out = tmp_path / "out"
    result = run_command(tmp_path, [sys.executable, SCRIPT, "--data_path", str(root), "--output_dir", str(out)])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {root / 'train_list.txt'}:5: label 12 is out of range"), last_line
    assert not out.exists()


def test_bad_data_paths_give_clear_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="is not a folder"):
        load_image_folder(str(tmp_path / "nowhere"), 20.0, True, 0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(UsageError, match="no class sub-folders"):
        load_image_folder(str(tmp_path / "flat"), 20.0, True, 0)
    (tmp_path / "flat" / "a").mkdir()
    (tmp_path / "flat" / "a" / "x.png").write_bytes(b"")
    assert train_classification.cli(["--data_path", str(tmp_path / "flat"), "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: no usable image in {tmp_path / 'flat'}"


# --------------------------------------------------------------------------------- imagefolder-style folders


def save_class_folders(root: Path, counts: dict[str, int]) -> None:
    crops = iter(photo_crops(sum(counts.values())))
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            next(crops).save(root / name / f"{index}.png")


def test_imagefolder_without_splits_gets_a_stratified_held_out_split(tmp_path, caplog):
    save_class_folders(tmp_path, {"cat": 10, "dog": 10, "empty": 0})
    splits = load_image_folder(str(tmp_path), 20.0, True, 0)
    assert splits["train"].features["label"].names == ["cat", "dog", "empty"]
    assert f"{tmp_path}: 1 class(es) have no images: 'empty'" in caplog.text
    assert sorted(splits["validation"]["label"]) == [0, 0, 1, 1]


def test_a_class_too_small_to_stratify_still_gets_a_held_out_split(tmp_path, caplog):
    """A class with a single image cannot be stratified (datasets raises): the split is made without strata; a
    folder too small to split at all is an error that says what to do."""
    save_class_folders(tmp_path / "small_class", {"cat": 9, "dog": 1})
    splits = load_image_folder(str(tmp_path / "small_class"), 20.0, True, 0)
    assert len(splits["train"]) == 8 and len(splits["validation"]) == 2
    assert "the held-out split is not stratified by class" in caplog.text
    save_class_folders(tmp_path / "single", {"cat": 1})
    with pytest.raises(UsageError, match=r"cannot hold out 20% of 1 images .*give a val/ folder"):
        load_image_folder(str(tmp_path / "single"), 20.0, True, 0)


def test_dataset_folder_through_datasets_decodes_late_and_drops_corrupt_images(tmp_path, caplog):
    """`--dataset_name <local folder>` goes through `datasets` (the Hub path): images stay encoded until the
    transform, which converts modes and drops an undecodable image with a warning instead of failing the batch;
    `--streaming` yields the same transformed examples."""
    crops = iter(photo_crops(12))
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(3):
                next(crops).convert("L" if index == 0 else "RGB").save(tmp_path / split / name / f"{index}.png")
    (tmp_path / "val" / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data_args = train_classification.DataArguments(dataset_name=str(tmp_path))
    splits, class_names = train_classification.load_data(data_args, seed=0)
    assert class_names == ["cat", "dog"] and len(splits["validation"]) == 7
    assert isinstance(splits["validation"][0]["image"], dict)  # still encoded
    processor = train_classification.default_image_processor(32)
    transform = train_classification.make_batch_transform(
        lambda images, indices: list(processor(images=images, return_tensors="pt").pixel_values)
    )
    batch = transform(splits["validation"][:])
    assert len(batch["pixel_values"]) == len(batch["labels"]) == 6
    assert batch["pixel_values"][0].shape == (3, 32, 32)
    assert "Skipping an undecodable image" in caplog.text
    streamed, _ = train_classification.load_data(
        train_classification.DataArguments(dataset_name=str(tmp_path), streaming=True), seed=0
    )
    first = next(iter(streamed["train"].map(transform, batched=True, remove_columns=["image", "label"])))
    assert first["pixel_values"].shape == (3, 32, 32) and first["labels"] in (0, 1)


def test_an_undecodable_image_is_replaced_so_no_batch_empties(tmp_path, caplog):
    """Decoded late (`--check_images false`, or `--dataset_name`), a corrupt file is replaced by the next decodable
    sample of its split, with that sample's label: a batch of corrupt images keeps its size instead of ending the
    epoch with `stack expects a non-empty TensorList`."""
    from datasets import Dataset

    save_class_folders(tmp_path, {"cat": 2, "dog": 2})
    for name in ("cat/0.png", "cat/1.png", "dog/1.png"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = [str(tmp_path / name) for name in ("cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png")]
    split = Dataset.from_dict({"image": paths, "label": [0, 0, 1, 1], "sample_index": [0, 1, 2, 3]})
    transform = train_classification.make_batch_transform(
        lambda images, indices: [image.tobytes() for image in images], source=split
    )
    batch = transform(split.select([0, 1, 3])[:])
    expected = train_classification.load_rgb(paths[2]).tobytes()
    assert batch["pixel_values"] == [expected] * 3 and batch["labels"] == [1, 1, 1]
    assert caplog.text.count("Replacing an undecodable image") == 3


# ------------------------------------------------------------------------------------ the list parser, fuzzed

TOKENS = st.sampled_from(
    ["n01440764/a.JPEG", "b c.png", "0", "7", "-1", "x", "007", "9" * 30, " ", "\t", "\r", "\n", "\r\n", "\x00",
     "\xe9", "\u2028", "\ufeff", "٣", "/", "\\"]
)
CONTENTS = st.one_of(
    st.binary(max_size=200),
    st.lists(TOKENS, max_size=30).map(lambda tokens: "".join(tokens).encode("utf-8", "surrogatepass")),
    st.lists(TOKENS, max_size=30).map(lambda tokens: "".join(tokens).encode("latin-1", "replace")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=CONTENTS)
def test_any_list_file_parses_or_names_its_line(content, tmp_path):
    """Whatever the bytes, `read_list_file` returns entries that come from its non-blank lines, or raises one
    `UsageError` naming the file (and the line, for a bad line): never another exception."""
    path = tmp_path / "train_list.txt"
    path.write_bytes(content)
    try:
        entries = read_list_file(str(path))
    except UsageError as error:
        assert str(error).startswith(str(path))
        return
    lines = content.removeprefix(b"\xef\xbb\xbf").splitlines()
    assert entries
    for entry in entries:
        number = int(entry.where.rsplit(":", 1)[1])
        assert entry.where == f"{path}:{number}"
        relative, label = lines[number - 1].decode("utf-8").rsplit(maxsplit=1)
        assert label.isascii() and label.isdigit() and int(label) == entry.label
        assert relative.strip() == entry.relative and entry.relative


# File and folder names: any UTF-8 text without whitespace, separators or a byte-order mark.
NAMES = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), exclude_characters="/\\\ufeff"),
    min_size=1, max_size=12,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(st.tuples(NAMES, NAMES, st.integers(0, 10**6)), min_size=1, max_size=8),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    blank=st.sampled_from(["", " ", "\t"]),
)
def test_written_list_files_read_back(entries, newline, blank, tmp_path):
    """`<folder>/<file> <label>` lines, with any newline convention and blank lines, read back exactly."""
    lines = [f"{folder}/{file} {label}" for folder, file, label in entries]
    path = tmp_path / "val_list.txt"
    path.write_bytes((blank + newline).join(lines).encode("utf-8") + newline.encode())
    parsed = read_list_file(str(path))
    assert [(entry.relative, entry.label) for entry in parsed] == [(f"{f}/{n}", label) for f, n, label in entries]
    assert [entry.folder for entry in parsed] == [folder for folder, _, _ in entries]
