"""The checkpoint converter: official fixtures -> Hub folder -> Auto* remote code, every input format, the
released architectures, the 22k -> 1k head and the errors on bad input."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT, run_python
from official_format import fixture_kwargs

import convert_checkpoints
from configuration_internimage import AUTO_MAP, InternImageConfig
from convert_checkpoints import ConversionError, compare_keys, convert_checkpoint, detect_variant, main
from modeling_internimage import InternImageForImageClassification, InternImageModel

MODELS = ("tiny_t", "tiny_l")
MANIFESTS = sorted((FIXTURES / "manifests").glob("*.json"))


def official_kwargs_file(name: str, folder: Path) -> Path:
    """The fixture's official constructor kwargs as a JSON file (what `--official-config` takes)."""
    path = folder / f"{name}_kwargs.json"
    path.write_text(json.dumps(fixture_kwargs(name)))
    return path


def official_state_dict(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "models" / name / "checkpoint.pth", weights_only=True)["model"]


def local_classifier(name: str) -> InternImageForImageClassification:
    """The fixture model built in this process with the converter's key mapping (no remote code)."""
    model = InternImageForImageClassification(convert_checkpoints.config_from_official_kwargs(fixture_kwargs(name)))
    renamed = {convert_checkpoints.rename_official_key(k): v for k, v in official_state_dict(name).items()}
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def expected_outputs(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    folder = FIXTURES / "models" / name
    return torch.load(folder / "input.pt", weights_only=True), torch.load(folder / "expected.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Official fixtures through the CLI and remote code
# ---------------------------------------------------------------------------------------------------------------

REMOTE_CODE_SCRIPT = """
import sys
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, CLIPImageProcessor

results = {}
for name, folder, input_path in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    pixel_values = torch.load(input_path, weights_only=True)
    classifier = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        result = {
            "class": type(classifier).__module__,
            "logits": classifier(pixel_values).logits,
            "hidden_states": backbone(pixel_values).hidden_states,
            "logits_f64": classifier.double()(pixel_values.double()).logits,
        }
    # The two public model-card examples, verbatim apart from the model name and the image.
    model_name, image_path = folder, sys.argv[1]
    image_processor = CLIPImageProcessor.from_pretrained(model_name)
    image = Image.open(image_path)
    image = image_processor(images=image, return_tensors="pt").pixel_values
    model = AutoModel.from_pretrained(model_name, trust_remote_code=True)
    hidden_states = model(image).hidden_states
    model = AutoModelForImageClassification.from_pretrained(model_name, trust_remote_code=True)
    logits = model(image).logits
    result.update(card_pixel_values=image, card_hidden_states=hidden_states, card_logits=logits.detach())
    results[name] = result
torch.save(results, sys.argv[-1])
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory, session_hf_home) -> dict[str, Path]:
    """tiny_t and tiny_l converted by the CLI from their official checkpoints and constructor kwargs."""
    work = tmp_path_factory.mktemp("converted")
    folders = {}
    for name in MODELS:
        folders[name] = work / name
        completed = run_python(
            [
                "convert_checkpoints.py", FIXTURES / "models" / name / "checkpoint.pth", folders[name],
                "--official-config", official_kwargs_file(name, work),
            ],
            session_hf_home,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
    return folders


@pytest.fixture(scope="module")
def sample_png(tmp_path_factory) -> Path:
    """A real photograph (scikit-learn's china.jpg) saved as PNG."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    path = tmp_path_factory.mktemp("image") / "china.png"
    Image.fromarray(load_sample_image("china.jpg")).save(path)
    return path


@pytest.fixture(scope="module")
def remote_results(converted, sample_png, tmp_path_factory, session_hf_home) -> dict[str, dict]:
    """Outputs of the converted folders loaded through the Auto classes with remote code, in a fresh process."""
    work = tmp_path_factory.mktemp("remote")
    (work / "load.py").write_text(REMOTE_CODE_SCRIPT)
    args = [work / "load.py", sample_png]
    for name in MODELS:
        args += [name, converted[name], FIXTURES / "models" / name / "input.pt"]
    completed = run_python([*args, work / "results.pt"], session_hf_home, cwd=work)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(work / "results.pt", weights_only=True)


def test_converted_folder_contents(converted):
    folder = converted["tiny_t"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["InternImageForImageClassification"]
    assert config["id2label"]["3"] == "LABEL_3" and config["label_set"] is None
    assert config["channels"] == 16 and config["depths"] == [1, 1, 2, 1] and config["offset_scale"] == 1.0
    for name in convert_checkpoints.model_code_files():
        assert (folder / name).read_text() == (ROOT / name).read_text()
    assert (folder / "model.safetensors").is_file()
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 224} and processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["resample"] == 3 and processor["image_mean"] == [0.485, 0.456, 0.406]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "license: mit" in card
    assert "AutoModelForImageClassification.from_pretrained(model_name, trust_remote_code=True)" in card
    assert not list(folder.parent.glob("_internimage_convert_*")), "the staging folder was left behind"
    tiny_l = json.loads((converted["tiny_l"] / "config.json").read_text())
    assert tiny_l["offset_scale"] == 2.0 and tiny_l["post_norm"] and tiny_l["layer_scale_init_value"] == 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_cli_conversion_matches_official_outputs(remote_results, name):
    result = remote_results[name]
    _, expected = expected_outputs(name)
    assert result["class"].startswith("transformers_modules.")
    torch.testing.assert_close(result["logits"], expected["logits"], rtol=0, atol=1e-4)
    assert len(result["hidden_states"]) == 4
    for index, hidden_state in enumerate(result["hidden_states"]):
        torch.testing.assert_close(hidden_state, expected[f"stage_{index}"], rtol=0, atol=1e-4)
    assert result["logits_f64"].dtype == torch.float64
    torch.testing.assert_close(result["logits_f64"], expected["logits_f64ref"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", MODELS)
def test_model_card_examples_on_a_real_png(remote_results, name):
    result = remote_results[name]
    pixel_values = result["card_pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    # A photograph after ImageNet normalisation: inside [(0 - mean) / std, (1 - mean) / std], both signs present.
    assert -2.2 < pixel_values.min() < 0 < pixel_values.max() < 2.7
    channels = fixture_kwargs(name)["channels"]
    assert [tuple(h.shape) for h in result["card_hidden_states"]] == [
        (1, channels * 2**i, 224 // 2 ** (i + 2), 224 // 2 ** (i + 2)) for i in range(4)
    ]
    with torch.no_grad():
        reference = local_classifier(name)(pixel_values).logits
    torch.testing.assert_close(result["card_logits"], reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Released architectures (manifests of the official state dicts)
# ---------------------------------------------------------------------------------------------------------------


def manifest_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Empty (meta) tensors with the keys and shapes of an official released state dict."""
    return {key: torch.empty(shape, device="meta") for key, shape in json.loads(path.read_text())["state_dict"]}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.stem)
def test_released_architecture_by_name(manifest):
    name, official = manifest.stem, json.loads(manifest.read_text())
    with torch.device("meta"):
        model = InternImageForImageClassification(InternImageConfig.from_variant(name))
    assert sum(p.numel() for p in model.parameters()) == official["num_params"]

    state_dict = manifest_state_dict(manifest)
    renames, report = compare_keys(state_dict, convert_checkpoints.expected_shapes(model.config))
    assert not report, report.describe()
    assert len(renames) == len(state_dict) == official["num_state_dict_entries"]
    assert sorted(renames.values()) == sorted(model.state_dict())
    assert detect_variant(state_dict, f"/checkpoints/{name}.pth") == name


def test_detection_needs_the_resolution_when_only_that_differs():
    state_dict = manifest_state_dict(FIXTURES / "manifests" / "internimage_h_22kto1k_384.json")
    with pytest.raises(ConversionError, match="internimage_h_22kto1k_384.*internimage_h_22kto1k_640.*--variant"):
        detect_variant(state_dict, "weights.pth")
    assert detect_variant(state_dict, "internimage_h_22kto1k_640.pth") == "internimage_h_22kto1k_640"
    l_22k = manifest_state_dict(FIXTURES / "manifests" / "internimage_l_22k_384.json")
    assert detect_variant(l_22k, "weights.pth") == "internimage_l_22k_384"  # told apart by the head size
    l_backbone = {key: value for key, value in l_22k.items() if key.startswith(("patch_embed.", "levels."))}
    assert detect_variant(l_backbone, "weights.pth") == "internimage_l_22kto1k_384"  # same backbone, same size


def test_release_flags_that_shapes_cannot_show_come_from_the_table():
    l_state_dict = manifest_state_dict(FIXTURES / "manifests" / "internimage_l_22kto1k_384.json")
    config, variant = convert_checkpoints._resolve_config(l_state_dict, Path("l.pth"), None, None, None)
    assert variant == "internimage_l_22kto1k_384" and config.offset_scale == 2.0 and config.image_size == 384
    assert config.post_norm and config.layer_scale_init_value == 1e-5 and config.pooler_type == "conv"
    g_backbone = {
        key: value
        for key, value in manifest_state_dict(FIXTURES / "manifests" / "internimage_g_22kto1k_512.json").items()
        if key.startswith(("patch_embed.", "levels."))
    }
    config, variant = convert_checkpoints._resolve_config(
        g_backbone, Path("upernet_g.pth"), "internimage_g_22kto1k_512", None, 896
    )
    assert config.pooler_type is None and config.post_norm and config.center_feature_scale
    assert config.stage3_post_norm_block_ids == [5, 11, 17, 23, 29, 35, 41, 47] and config.image_size == 896


def test_wrong_variant_names_the_mismatching_keys(tmp_path):
    with pytest.raises(ConversionError, match=r"does not match --variant internimage_t_1k_224: .*mis-shaped"):
        convert_checkpoint(FIXTURES / "models" / "tiny_t" / "checkpoint.pth", tmp_path / "out",
                           variant="internimage_t_1k_224")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Input formats
# ---------------------------------------------------------------------------------------------------------------


def convert_fixture(name: str, checkpoint: Path, output: Path, **kwargs) -> Path:
    """In-process conversion with the fixture's constructor kwargs, written next to `output` (the reload check runs in
    the CLI tests)."""
    return convert_checkpoint(
        checkpoint, output, official_config=official_kwargs_file(name, output.parent), verify=False, **kwargs
    )


def test_detection_checkpoint_becomes_a_backbone(tmp_path):
    official = official_state_dict("tiny_t")
    backbone = {f"backbone.{k}": v for k, v in official.items() if k.startswith(("patch_embed.", "levels."))}
    checkpoint = tmp_path / "mask_rcnn_internimage.pth"
    extra = {"neck.fpn.0.weight": torch.ones(2), "rpn_head.conv.weight": torch.ones(3)}
    torch.save({"state_dict": {**backbone, **extra}, "meta": {"epoch": 12}}, checkpoint)
    folder = convert_fixture("tiny_t", checkpoint, tmp_path / "out")

    config = json.loads((folder / "config.json").read_text())
    assert config["pooler_type"] is None and config["architectures"] == ["InternImageModel"]
    assert "2 non-backbone tensors of the source" in (folder / "README.md").read_text()
    model = InternImageModel.from_pretrained(folder).eval()
    pixel_values, expected = expected_outputs("tiny_t")
    with torch.no_grad():
        outputs = model(pixel_values)
    assert outputs.pooler_output is None
    for index, hidden_state in enumerate(outputs.hidden_states):
        torch.testing.assert_close(hidden_state, expected[f"stage_{index}"], rtol=0, atol=1e-4)


def _hub_style(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The OpenGVLab Hub repositories' naming: `model.` prefix, `gamma1/2` renamed `layer_scale1/2`."""
    return {"model." + k.replace(".gamma", ".layer_scale"): v.clone() for k, v in official.items()}


@pytest.mark.parametrize("layout", ["hub_bin", "hub_safetensors", "module", "bare", "model_ema", "legacy_format"])
def test_other_checkpoint_layouts(tmp_path, layout):
    official = official_state_dict("tiny_l")
    assert any(".gamma1" in key for key in official)
    if layout == "hub_safetensors":
        from safetensors.torch import save_file

        checkpoint = tmp_path / "model.safetensors"
        save_file(_hub_style(official), checkpoint)
    else:
        checkpoint = tmp_path / "pytorch_model.bin"
        content = {
            "hub_bin": _hub_style(official), "module": {"module": official}, "bare": official,
            "model_ema": {"model_ema": official, "epoch": 3}, "legacy_format": {"model": official},
        }[layout]
        # The pre-1.6 format cannot be memory-mapped: the loader falls back to a plain load.
        torch.save(content, checkpoint, _use_new_zipfile_serialization=layout != "legacy_format")
    folder = convert_fixture("tiny_l", checkpoint, tmp_path / "out")
    model = InternImageForImageClassification.from_pretrained(folder).eval()
    pixel_values, expected = expected_outputs("tiny_l")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, expected["logits"], rtol=0, atol=1e-4)


def test_official_training_yaml(tmp_path):
    kwargs = fixture_kwargs("tiny_l")
    (tmp_path / "tiny_l.yaml").write_text(
        "DATA:\n  IMG_SIZE: 96\nMODEL:\n  TYPE: intern_image\n  NUM_CLASSES: 10\n  DROP_PATH_RATE: 0.1\n"
        f"  INTERN_IMAGE:\n    CORE_OP: 'DCNv3'\n    DEPTHS: {kwargs['depths']}\n    GROUPS: {kwargs['groups']}\n"
        f"    CHANNELS: {kwargs['channels']}\n    LAYER_SCALE: 1e-5\n    OFFSET_SCALE: 2.0\n"
        "    MLP_RATIO: 4.0\n    POST_NORM: True\n"
    )
    read, image_size = convert_checkpoints.read_official_config(tmp_path / "tiny_l.yaml")
    assert image_size == 96 and read["layer_scale"] == 1e-5 and read["offset_scale"] == 2.0 and read["post_norm"]
    folder = convert_checkpoint(
        FIXTURES / "models" / "tiny_l" / "checkpoint.pth", tmp_path / "out", official_config=tmp_path / "tiny_l.yaml",
        verify=False,
    )
    assert json.loads((folder / "preprocessor_config.json").read_text())["crop_size"] == {"height": 96, "width": 96}
    model = InternImageForImageClassification.from_pretrained(folder).eval()
    pixel_values, expected = expected_outputs("tiny_l")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, expected["logits"], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet labels and the 22k -> 1k head
# ---------------------------------------------------------------------------------------------------------------


def test_22k_to_1k_map_from_timm_lists():
    synsets_1k = convert_checkpoints._timm_info_lines("imagenet_synsets.txt")
    synsets_22k = convert_checkpoints._timm_info_lines("imagenet22k_synsets.txt")
    assert len(synsets_1k) == 1000 and len(synsets_22k) == 21841
    indices = convert_checkpoints.imagenet_22k_to_1k_indices()
    same_wnid = [i for i, row in enumerate(indices) if synsets_22k[row] == synsets_1k[i]]
    assert len(same_wnid) == 999 and 850 not in same_wnid
    assert synsets_1k[850] == "n04399382" and synsets_22k[indices[850]] == "n04398044" and indices[850] == 11136
    labels_1k, labels_22k = (convert_checkpoints.imagenet_labels(s) for s in ("imagenet-1k", "imagenet-22k"))
    assert labels_1k[0] == "tench, Tinca tinca" and labels_1k[850] == "teddy, teddy bear" and len(labels_22k) == 21841
    assert labels_22k[indices[850]] == "teapot"


def test_head_1k_selects_the_22k_rows(tmp_path):
    official = official_state_dict("tiny_t")
    generator = torch.Generator().manual_seed(0)
    width = official["head.weight"].shape[1]
    official["head.weight"] = torch.randn(21841, width, generator=generator)
    official["head.bias"] = torch.randn(21841, generator=generator)
    checkpoint = tmp_path / "tiny_22k.pth"
    torch.save({"model": official}, checkpoint)
    kwargs_file = tmp_path / "kwargs.json"
    kwargs_file.write_text(json.dumps({**fixture_kwargs("tiny_t"), "num_classes": 21841}))

    folder = convert_checkpoint(checkpoint, tmp_path / "out", official_config=kwargs_file, head_1k=True, verify=False)
    model = InternImageForImageClassification.from_pretrained(folder)
    rows = torch.tensor(convert_checkpoints.imagenet_22k_to_1k_indices())
    assert torch.equal(model.classifier.weight, official["head.weight"][rows])
    assert torch.equal(model.classifier.bias, official["head.bias"][rows])
    assert model.config.label_set == "imagenet-1k" and model.config.id2label[850] == "teddy, teddy bear"

    full = convert_checkpoint(checkpoint, tmp_path / "full", official_config=kwargs_file, verify=False)
    config = json.loads((full / "config.json").read_text())
    assert config["label_set"] == "imagenet-22k" and config["id2label"]["11136"] == "teapot"
    with pytest.raises(ConversionError, match="--head-1k needs"):
        convert_fixture("tiny_t", FIXTURES / "models" / "tiny_t" / "checkpoint.pth", tmp_path / "x", head_1k=True)


# ---------------------------------------------------------------------------------------------------------------
# Repository files
# ---------------------------------------------------------------------------------------------------------------


def test_repository_config_is_the_converters_output(tmp_path):
    convert_checkpoints.write_repo_metadata(tmp_path)
    for name in ("config.json", "preprocessor_config.json"):
        written, committed = (json.loads((folder / name).read_text()) for folder in (tmp_path, ROOT))
        written.pop("transformers_version", None), committed.pop("transformers_version", None)
        assert written == committed, name
    config = json.loads((ROOT / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["image_size"] == 224
    assert config["id2label"]["1"] == "goldfish, Carassius auratus" and config["label_set"] == "imagenet-1k"


def test_code_files_follow_relative_imports(tmp_path):
    assert convert_checkpoints.model_code_files() == [
        "configuration_internimage.py", "modeling_internimage.py", "dcnv3_ops.py", "dcnv3_custom_ops.py",
        "dcnv3_pytorch.py", "dcnv3_triton.py",
    ]
    (tmp_path / "a.py").write_text("try:\n    from .b import x\nexcept ImportError:\n    from b import x\n")
    (tmp_path / "b.py").write_text("from .c import y\n")
    (tmp_path / "c.py").write_text("import os\n")
    assert convert_checkpoints.model_code_files(("a.py",), tmp_path) == ["a.py", "b.py", "c.py"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one `error: ...` line, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------------------------


class _CodeCarrier:
    """Unpickling this would create `path` (a stand-in for arbitrary code in a malicious checkpoint)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _edited_checkpoint(path: Path, edit) -> Path:
    state_dict = official_state_dict("tiny_t")
    edit(state_dict)
    torch.save({"model": state_dict}, path)
    return path


def _bad_input(kind: str, folder: Path) -> tuple[Path, list[str], str]:
    """A bad checkpoint of the given kind, the extra CLI options and a regex the error message must match."""
    checkpoint = FIXTURES / "models" / "tiny_t" / "checkpoint.pth"
    official = ["--official-config", str(official_kwargs_file("tiny_t", folder))]
    path = folder / f"{kind}.pth"
    if kind == "missing_path":
        return path, [], "does not exist"
    if kind == "empty":
        path.write_bytes(b"")
        return path, [], "is empty"
    if kind == "truncated":
        path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
        return path, [], "not a readable PyTorch checkpoint"
    if kind == "random_bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                         .numpy().tobytes())
        return path, [], "not a readable PyTorch checkpoint"
    if kind == "unrelated":
        torch.save({"model": {"encoder.fc.weight": torch.ones(3, 3)}}, path)
        return path, [], "holds no InternImage weights"
    if kind == "missing_keys":
        _edited_checkpoint(path, lambda sd: [sd.pop(k) for k in ("head.bias", "levels.1.blocks.0.mlp.fc1.weight")])
        return path, official, "2 model tensors missing.*classifier.bias"
    if kind == "unexpected_keys":
        _edited_checkpoint(path, lambda sd: sd.update({"levels.0.blocks.0.extra": torch.ones(1)}))
        return path, official, "1 unexpected checkpoint keys \\(levels.0.blocks.0.extra\\)"
    if kind == "mis_shaped":
        _edited_checkpoint(path, lambda sd: sd.update({"head.bias": torch.ones(11)}))
        return path, official, "mis-shaped checkpoint tensors \\(head.bias \\(11,\\) vs \\(10,\\)\\)"
    if kind == "wrong_variant":
        return checkpoint, ["--variant", "internimage_s_1k_224"], "does not match --variant internimage_s_1k_224"
    if kind == "no_release_matches":
        return checkpoint, [], "match no released InternImage.*--official-config"
    if kind == "code_in_pickle":
        torch.save({"model": _CodeCarrier(folder / "MARKER")}, path)
        return path, [], "needs Python code to unpickle"
    raise ValueError(kind)


BAD_INPUTS = (
    "missing_path", "empty", "truncated", "random_bytes", "unrelated", "missing_keys", "unexpected_keys",
    "mis_shaped", "wrong_variant", "no_release_matches", "code_in_pickle",
)


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_clear_error(tmp_path, capsys, kind):
    checkpoint, options, message = _bad_input(kind, tmp_path)
    output = tmp_path / "out" / "model"
    assert main([str(checkpoint), str(output), *options]) == 1
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: "), stderr
    assert re.search(message, stderr[0]), stderr[0]
    assert not output.exists() and not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kind", ["code_in_pickle", "random_bytes"])
def test_cli_bad_input_without_traceback(tmp_path, session_hf_home, kind):
    checkpoint, options, message = _bad_input(kind, tmp_path)
    completed = run_python(["convert_checkpoints.py", checkpoint, tmp_path / "out", *options], session_hf_home)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr and completed.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists() and not (tmp_path / "MARKER").exists()
    with open(checkpoint, "rb") as handle:  # the carrier is real: an unrestricted unpickler runs it
        if kind == "code_in_pickle":
            torch.load(handle, weights_only=False)
            assert (tmp_path / "MARKER").exists()


def test_existing_output_folder_needs_overwrite(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    checkpoint = FIXTURES / "models" / "tiny_t" / "checkpoint.pth"
    options = ["--official-config", str(official_kwargs_file("tiny_t", tmp_path)), "--no-verify"]
    assert main([str(checkpoint), str(output), *options]) == 1
    assert "--overwrite" in capsys.readouterr().err and (output / "keep.txt").read_text() == "mine"
    assert main([str(checkpoint), str(output), *options, "--overwrite"]) == 0
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny_t_kwargs.json"]


def test_large_checkpoints_are_verified_tensor_by_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_checkpoints, "LARGE_CHECKPOINT_BYTES", 0)
    monkeypatch.setattr(convert_checkpoints, "verify_by_reload", lambda *args: pytest.fail("reloaded a large model"))
    checkpoint = FIXTURES / "models" / "tiny_t" / "checkpoint.pth"
    kwargs_file = official_kwargs_file("tiny_t", tmp_path)
    folder = convert_checkpoint(checkpoint, tmp_path / "out", official_config=kwargs_file, max_shard_size="200KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()

    def corrupt_first_shard(staging: Path, state_dict: dict) -> None:
        from safetensors.torch import load_file, save_file

        shard = sorted(staging.glob("model-*.safetensors"))[0]
        tensors = load_file(shard)
        save_file({key: value + 1 for key, value in tensors.items()}, shard, metadata={"format": "pt"})
        original_verify(staging, state_dict)

    original_verify = convert_checkpoints.verify_tensors
    monkeypatch.setattr(convert_checkpoints, "verify_tensors", corrupt_first_shard)
    with pytest.raises(ConversionError, match="written tensor .* differs from the source"):
        convert_checkpoint(checkpoint, tmp_path / "bad", official_config=kwargs_file, max_shard_size="200KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny_t_kwargs.json"]


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(*args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_checkpoints, "write_model_card", interrupt)
    options = ["--official-config", str(official_kwargs_file("tiny_t", tmp_path))]
    assert main([str(FIXTURES / "models" / "tiny_t" / "checkpoint.pth"), str(tmp_path / "out"), *options]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_t_kwargs.json"]


def test_model_card_of_a_release(tmp_path):
    config = convert_checkpoints.finalize_config(InternImageConfig.from_variant("internimage_xl_22kto1k_384"))
    convert_checkpoints.write_model_card(tmp_path / "README.md", config, "internimage_xl_22kto1k_384", [])
    card = (tmp_path / "README.md").read_text()
    header = card.split("---\n")[1]
    assert "pipeline_tag: image-classification" in header and "- imagenet-1k" in header and "license: mit" in header
    assert "88.0 % ImageNet-1k top-1, 335M parameters" in card and "Resolution: 384" in card
    assert "CLIPImageProcessor.from_pretrained(model_name)" in card


# ---------------------------------------------------------------------------------------------------------------
# Loading without noise
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def transformers_log() -> Iterator[io.StringIO]:
    """What transformers logs (at its default verbosity, warnings and above) while the block runs."""
    from transformers.utils import logging as hf_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def test_base_model_loads_a_classification_folder_silently(converted, tmp_path):
    """The model card's example 1 (`AutoModel` on a classification folder) prints no LOAD REPORT for the
    classifier it does not use; a folder with genuinely wrong tensors still reports them."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    with transformers_log() as log:
        model = AutoModel.from_pretrained(converted["tiny_t"], trust_remote_code=True)
    assert type(model).__name__ == "InternImageModel" and model.pooler is not None
    assert "LOAD REPORT" not in log.getvalue() and "classifier" not in log.getvalue(), log.getvalue()

    broken = tmp_path / "broken"
    shutil.copytree(converted["tiny_t"], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["internimage.encoder.stages.0.extra"] = torch.ones(2)
    del tensors["internimage.embeddings.conv1.bias"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with transformers_log() as log:
        AutoModel.from_pretrained(broken, trust_remote_code=True)
    report = log.getvalue()
    assert "LOAD REPORT" in report and "encoder.stages.0.extra" in report and "embeddings.conv1.bias" in report


def test_model_and_model_ema_default_is_model(tmp_path, capsys):
    """A training checkpoint with both: `model` by default (documented in the README), `--ema` takes the other."""
    official = official_state_dict("tiny_t")
    ema = {key: value + 0.5 if value.is_floating_point() else value for key, value in official.items()}
    checkpoint = tmp_path / "ckpt_epoch_best.pth"
    torch.save({"model": official, "model_ema": ema, "epoch": 300, "max_accuracy": 0.5}, checkpoint)
    default = convert_fixture("tiny_t", checkpoint, tmp_path / "default")
    taken = convert_fixture("tiny_t", checkpoint, tmp_path / "ema", ema=True)
    for folder, source in ((default, official), (taken, ema)):
        model = InternImageForImageClassification.from_pretrained(folder)
        assert torch.equal(model.classifier.weight, source["head.weight"])
        assert torch.equal(model.internimage.embeddings.conv1.weight, source["patch_embed.conv1.weight"])
    assert "its 'model_ema' weights were not used (--ema converts those)" in (default / "README.md").read_text()
    assert "EMA weights ('model_ema')" in (taken / "README.md").read_text()
    assert "converts its `model` weights" in (ROOT / "docs" / "converting.md").read_text()

    torch.save({"model": official}, tmp_path / "no_ema.pth")
    options = ["--official-config", str(official_kwargs_file("tiny_t", tmp_path)), "--ema"]
    assert main([str(tmp_path / "no_ema.pth"), str(tmp_path / "out"), *options]) == 1
    assert "has no 'model_ema' entry (found keys 'model'); drop --ema" in capsys.readouterr().err
