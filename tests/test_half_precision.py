"""Half-precision checkpoints and half-precision models, from the user's side.

Official-format checkpoints of H-style and G-style tiny models (every flag of those releases) and of the T fixture
are stored in float16 / bfloat16 (the T one mixing half weights with float32 / int64 BatchNorm buffers, as AMP
exports do). Converted with default options they must load, with default `from_pretrained` arguments, as the
float32 model the official code builds from them: exactly the outputs of the float32 checkpoint holding the same
values, within 1e-4 of the reference model. The public model card's two examples run verbatim on every folder,
also on folders stored (and loading) in float16 / bfloat16, whose models cast the float32 pixel values at the stem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_python
from official_format import (
    TINY_G_KWARGS,
    TINY_H_KWARGS,
    fixture_classifier,
    fixture_kwargs,
    meta_maker,
    official_state_dict,
)

from convert_checkpoints import config_from_official_kwargs, main, rename_official_key
from modeling_internimage import InternImageForImageClassification

CARD_EXAMPLES = sorted((FIXTURES / "model_card").glob("seed003_example*.py"))
T_KWARGS = fixture_kwargs("tiny_t")


def half_representable(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """float32 tensors holding values that `dtype` represents exactly."""
    return {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in state_dict.items()}


def stored_as(state_dict: dict[str, torch.Tensor], dtype: torch.dtype, keep_float32: str = "$^") -> dict:
    """The state dict with its floating tensors in `dtype`, except those whose key contains `keep_float32`."""
    return {k: v.to(dtype) if v.is_floating_point() and keep_float32 not in k else v for k, v in state_dict.items()}


def reference_model(kwargs: dict, state_dict: dict[str, torch.Tensor]) -> InternImageForImageClassification:
    """The float32 model holding `state_dict`, built in this process from the official kwargs."""
    model = InternImageForImageClassification(config_from_official_kwargs(kwargs, drop_path_rate=0.0))
    model.load_state_dict({rename_official_key(k): v.float() if v.is_floating_point() else v
                           for k, v in state_dict.items()}, strict=True)
    return model.eval()


def convert(work: Path, name: str, content: dict, kwargs: dict, *options: str) -> Path:
    """Save `content` as an official checkpoint and convert it with the CLI (verification included)."""
    checkpoint, kwargs_file, folder = work / f"{name}.pth", work / f"{name}_kwargs.json", work / name
    torch.save(content, checkpoint)
    kwargs_file.write_text(json.dumps(kwargs))
    assert main([str(checkpoint), str(folder), "--official-config", str(kwargs_file), *options]) == 0
    return folder


# name -> (official kwargs, dtype of the checkpoint's values, state-dict keys kept in float32)
CASES = {
    "h_float16": (TINY_H_KWARGS, torch.float16, "$^"),
    "g_bfloat16": (TINY_G_KWARGS, torch.bfloat16, "$^"),
    "t_mixed": (T_KWARGS, torch.float16, "conv_head.1.0.running"),  # half weights, float32 / int64 buffers
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, dict]:
    """For each case: the float32 reference weights, and the folders converted from the half checkpoint and from
    its float32 twin (same values)."""
    work = tmp_path_factory.mktemp("half")
    t_official = torch.load(FIXTURES / "models" / "tiny_t" / "checkpoint.pth", weights_only=True)["model"]
    result = {}
    for name, (kwargs, dtype, keep) in CASES.items():
        source = t_official if name.startswith("t_") else official_state_dict(kwargs, seed=len(result))
        weights = half_representable(source, dtype)
        result[name] = {
            "kwargs": kwargs,
            "weights": weights,
            "half": convert(work, name, {"model": stored_as(weights, dtype, keep)}, kwargs),
            "float32": convert(work, f"{name}_twin", {"model": weights}, kwargs),
        }
    weights = result["t_mixed"]["weights"]
    for dtype in ("float16", "bfloat16"):
        result[f"t_{dtype}_stored"] = {
            "kwargs": T_KWARGS, "weights": weights,
            "half": convert(work, f"t_{dtype}_stored", {"model": weights}, T_KWARGS, "--dtype", dtype),
        }
    return result


def test_tiny_checkpoints_have_the_official_layout():
    """The builder reproduces the key names and shapes of every released checkpoint and of the official fixture."""
    for manifest in sorted((FIXTURES / "manifests").glob("*.json")):
        official = json.loads(manifest.read_text())
        built = official_state_dict(official["constructor_kwargs"], meta_maker)
        assert {k: list(v.shape) for k, v in built.items()} == dict(official["state_dict"]), manifest.stem
    fixture = torch.load(FIXTURES / "models" / "tiny_t" / "checkpoint.pth", weights_only=True)["model"]
    assert {k: v.shape for k, v in official_state_dict(T_KWARGS).items()} == {k: v.shape for k, v in fixture.items()}


def _outputs(model: torch.nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    return [outputs.logits, *outputs.hidden_states]


@pytest.mark.parametrize("name", list(CASES))
def test_half_checkpoint_loads_as_the_official_float32_model(folders, name):
    from transformers import AutoModelForImageClassification

    case = folders[name]
    config = json.loads((case["half"] / "config.json").read_text())
    assert config["dtype"] == "float32"
    if name != "t_mixed":  # every flag of the H / G releases made it into the folder
        assert config["dw_kernel_size"] == 5 and config["center_feature_scale"] and config["pooler_type"] == "attention"
        assert config["stage3_post_norm_block_ids"] == case["kwargs"]["level2_post_norm_block_ids"]
        assert (config["res_post_norm"], config["post_norm"]) == ((True, False) if name[0] == "h" else (False, True))
    model = AutoModelForImageClassification.from_pretrained(case["half"], trust_remote_code=True).eval()
    twin = AutoModelForImageClassification.from_pretrained(case["float32"], trust_remote_code=True).eval()
    assert model.dtype == torch.float32
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs, twin_outputs = _outputs(model, pixel_values), _outputs(twin, pixel_values)
    reference = _outputs(reference_model(case["kwargs"], case["weights"]), pixel_values)
    assert len(outputs) == 5 and outputs[0].std() > 0.1
    for output, twin_output, expected in zip(outputs, twin_outputs, reference):
        assert output.dtype == torch.float32
        assert torch.equal(output, twin_output)  # upcast weights: exactly the float32 conversion
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_option_stores_and_loads_half(folders, dtype):
    from safetensors import safe_open
    from transformers import AutoModelForImageClassification

    folder = folders[f"t_{dtype}_stored"]["half"]
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes == {"F16" if dtype == "float16" else "BF16", "I64"}
    card = (folder / "README.md").read_text()
    assert f"stored in {dtype}" in card and f"load and compute in {dtype} by default" in card
    assert "dtype=torch.float32" in card
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert model.dtype == getattr(torch, dtype)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(pixel_values).logits  # float32 pixel values, cast at the stem
    expected = reference_model(T_KWARGS, folders["t_mixed"]["weights"])(pixel_values).logits.detach()
    assert logits.dtype == getattr(torch, dtype)
    torch.testing.assert_close(logits.float(), expected, rtol=0, atol=0.1 if dtype == "bfloat16" else 0.02)


def test_model_card_describes_the_stored_precision(folders):
    card = (folders["h_float16"]["half"] / "README.md").read_text()
    assert "stored in float32 (the source checkpoint held float16 tensors)" in card
    assert "load and compute in float32 by default" in card
    assert "float16, float32" in (folders["t_mixed"]["half"] / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# The model card's examples, verbatim
# ---------------------------------------------------------------------------------------------------------------

CARD_RUNNER = r"""
import re, runpy, sys, torch
out, examples, folders = sys.argv[1], sys.argv[2:4], sys.argv[4:]
results = {}
for folder in folders:
    for example in examples:
        code = re.sub(r"(?m)^model_name = .*$", f"model_name = {folder!r}", open(example).read())
        open("example.py", "w").write(code)
        namespace = runpy.run_path("example.py", run_name="__main__")
        key = (folder, example[-4])
        results[key] = {"dtype": str(namespace["model"].dtype), "module": type(namespace["model"]).__module__,
                        "image": namespace["image"]}
        results[key].update({name: namespace[name] for name in ("hidden_states", "logits") if name in namespace})
torch.save(results, out)
"""


@pytest.fixture(scope="module")
def card_results(folders, tmp_path_factory, session_hf_home) -> tuple[dict, str]:
    """Both model card examples run on every folder in one fresh process (cwd holding img.png), and its stderr."""
    from PIL import Image

    work = tmp_path_factory.mktemp("card")
    gradient = np.linspace(0, 255, 300 * 400 * 3).reshape(300, 400, 3)
    noise = np.random.default_rng(0).integers(0, 64, (300, 400, 3))
    Image.fromarray(((gradient + noise) % 256).astype("uint8")).save(work / "img.png")
    (work / "runner.py").write_text(CARD_RUNNER)
    names = [name for name in folders]
    completed = run_python(
        [work / "runner.py", work / "results.pt", *CARD_EXAMPLES, *(folders[name]["half"] for name in names)],
        session_hf_home, cwd=work,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(work / "results.pt", weights_only=True), completed.stderr


@pytest.mark.parametrize("name", [*CASES, "t_float16_stored", "t_bfloat16_stored"])
def test_model_card_examples_run_verbatim(folders, card_results, name):
    results, stderr = card_results
    case = folders[name]
    backbone, classifier = results[(str(case["half"]), "1")], results[(str(case["half"]), "2")]
    dtype = f"torch.{name.split('_')[1]}" if name.endswith("_stored") else "torch.float32"
    assert backbone["dtype"] == classifier["dtype"] == dtype
    assert backbone["module"].startswith("transformers_modules.")
    pixel_values = classifier["image"]
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (1, 3, 224, 224)
    assert len(backbone["hidden_states"]) == 4
    reference = reference_model(case["kwargs"], case["weights"])
    with torch.no_grad():
        expected = reference(pixel_values, output_hidden_states=True)
    tolerance = 1e-4 if dtype == "torch.float32" else 0.1
    torch.testing.assert_close(classifier["logits"].float(), expected.logits, rtol=0, atol=tolerance)
    for hidden_state, expected_state in zip(backbone["hidden_states"], expected.hidden_states):
        torch.testing.assert_close(hidden_state.float(), expected_state, rtol=0, atol=max(tolerance, 1e-4) * 10)
    assert "LOAD REPORT" not in stderr and "UNEXPECTED" not in stderr  # example 1 loads a classification folder


# ---------------------------------------------------------------------------------------------------------------
# Half-precision models: the stem casts, pipelines cast, any memory layout
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_takes_float32_pixel_values_in_any_layout(folders, dtype):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folders["t_mixed"]["half"], trust_remote_code=True, dtype=dtype).eval()
    assert model.dtype == dtype
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values.to(dtype)).pooler_output
        output = model(pixel_values).pooler_output  # float32, cast at the stem
        assert output.dtype == dtype and torch.equal(output, expected)
        for variant in (
            pixel_values.to(memory_format=torch.channels_last),
            pixel_values.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
            torch.stack([pixel_values, pixel_values], dim=-1)[..., 0],
        ):
            assert not variant.is_contiguous()
            # Same values; another memory layout may take another convolution kernel (other rounding).
            torch.testing.assert_close(model(variant).pooler_output, expected, rtol=2e-2, atol=2e-2)


def test_channels_last_and_non_contiguous_pixel_values_float32(folders):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folders["g_bfloat16"]["half"], trust_remote_code=True)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.eval()(pixel_values).logits
        for variant in (pixel_values.to(memory_format=torch.channels_last), pixel_values.mT.contiguous().mT):
            assert not variant.is_contiguous()
            torch.testing.assert_close(model(variant).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipelines_in_half_precision(folders, dtype, tmp_path):
    from PIL import Image
    from transformers import pipeline

    folder = folders["t_mixed"]["half"]
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (80, 96, 3)).astype("uint8"))
    full = pipeline("image-classification", model=str(folder), trust_remote_code=True)(image, top_k=3)
    classifier = pipeline("image-classification", model=str(folder), trust_remote_code=True, dtype=dtype)
    assert classifier.model.dtype == dtype
    half = classifier(image, top_k=3)
    assert half[0]["label"] == full[0]["label"]
    assert abs(half[0]["score"] - full[0]["score"]) < 0.05
    extractor = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True, dtype=dtype)
    features = torch.tensor(extractor(image, pool=True))
    assert features.shape == (1, 192) and torch.isfinite(features).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_on_gpu_takes_float32_pixel_values(folders, dtype):
    from transformers import AutoModelForImageClassification

    case = folders["h_float16"]
    model = AutoModelForImageClassification.from_pretrained(case["half"], trust_remote_code=True, dtype=dtype)
    model = model.eval().to("cuda")
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(pixel_values.to("cuda")).logits.float().cpu()
        expected = reference_model(case["kwargs"], case["weights"])(pixel_values).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.15)


@pytest.mark.parametrize("name", ["tiny_t", "tiny_l"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_from_pretrained_matches_float32(name, dtype, tolerance, tmp_path):
    model, pixel_values, expected = fixture_classifier(name)
    model.save_pretrained(tmp_path)
    half = InternImageForImageClassification.from_pretrained(tmp_path, dtype=dtype).eval()
    assert half.classifier.weight.dtype == dtype
    with torch.no_grad():
        logits = half(pixel_values.to(dtype)).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), expected["logits"], rtol=0, atol=tolerance)
    assert torch.equal(logits.float().argmax(-1), expected["logits"].argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu_matches_float32(dtype, tmp_path):
    model, pixel_values, expected = fixture_classifier("tiny_t")
    model.save_pretrained(tmp_path)
    half = InternImageForImageClassification.from_pretrained(tmp_path, dtype=dtype).eval().cuda()
    with torch.no_grad():
        logits = half(pixel_values.to("cuda", dtype)).logits.float().cpu()
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0.1)
    assert torch.equal(logits.argmax(-1), expected["logits"].argmax(-1))
