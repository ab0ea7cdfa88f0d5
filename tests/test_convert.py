"""The checkpoint converter: official fixtures -> Hub folder -> Auto* remote code, every input format, the
released architectures, the 22k -> 1k head and the errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT, run_python

import convert_checkpoints
from configuration_internimage import AUTO_MAP
from modeling_internimage import InternImageForImageClassification

MODELS = ("tiny_t", "tiny_l")
MANIFESTS = sorted((FIXTURES / "manifests").glob("*.json"))


def official_kwargs(name: str) -> dict:
    return json.loads((FIXTURES / "models" / name / "official_args.json").read_text())["kwargs"]


def official_kwargs_file(name: str, folder: Path) -> Path:
    """The fixture's official constructor kwargs as a JSON file (what `--official-config` takes)."""
    path = folder / f"{name}_kwargs.json"
    path.write_text(json.dumps(official_kwargs(name)))
    return path


def official_state_dict(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "models" / name / "checkpoint.pth", weights_only=True)["model"]


def local_classifier(name: str) -> InternImageForImageClassification:
    """The fixture model built in this process with the converter's key mapping (no remote code)."""
    model = InternImageForImageClassification(convert_checkpoints.config_from_official_kwargs(official_kwargs(name)))
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
    for name in ("configuration_internimage.py", "modeling_internimage.py", "dcnv3_ops.py", "dcnv3_triton.py"):
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
    channels = official_kwargs(name)["channels"]
    assert [tuple(h.shape) for h in result["card_hidden_states"]] == [
        (1, channels * 2**i, 224 // 2 ** (i + 2), 224 // 2 ** (i + 2)) for i in range(4)
    ]
    with torch.no_grad():
        reference = local_classifier(name)(pixel_values).logits
    torch.testing.assert_close(result["card_logits"], reference, rtol=0, atol=1e-5)
