"""The whole model on a GPU, across the DCNv3 backends (all `@pytest.mark.gpu`, skipped without CUDA).

Parity of logits and parameter gradients with the PyTorch backend in float32/float16/bfloat16, batches above 256,
`torch.compile(fullgraph=True)` forward and backward, `device_map="auto"` and pipelines on the GPU, and the public
model card's two examples with the converted model loaded in float16 and bfloat16 on the GPU. The op-level GPU
tests are in tests/test_dcnv3_triton.py and tests/test_dcnv3_cuda.py; `python benchmarks/gpu_check.py` runs them
all (`pytest -m gpu`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, perturb_sampling, run_python
from official_format import fixture_classifier
from test_convert import official_kwargs_file

import dcnv3_ops
import dcnv3_triton
from configuration_internimage import InternImageConfig
from modeling_internimage import InternImageForImageClassification

pytestmark = pytest.mark.gpu
BACKENDS = ("pytorch", "triton", "cuda")
# Largest max |x - reference| / max |reference| of the logits and of all parameter gradients against the float32
# PyTorch backend. A whole model cast to half precision (LayerNorm and softmax backward included) loses more in
# the gradients: on CPU the PyTorch backend itself reaches 2.4e-2 (fp16) and 7.3e-2 (bf16) there.
TOLERANCE = {
    "logits": {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2},
    "gradients": {torch.float32: 1e-4, torch.float16: 1e-1, torch.bfloat16: 2.5e-1},
}


def require_backend(backend: str) -> None:
    """Skip, saying why, when `backend` cannot run on CUDA tensors here."""
    if backend == "triton" and dcnv3_triton.INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1 is set: Triton would interpret, not compile")
    try:
        dcnv3_ops.resolve_dcn_backend(backend, torch.device("cuda"))
    except RuntimeError as error:
        pytest.skip(str(error))


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    """Full float32 convolutions and matmuls (TF32 rounds their inputs to 10-bit mantissas); no backend override."""
    monkeypatch.delenv(dcnv3_ops.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def deformable_classifier(backend: str, **overrides) -> InternImageForImageClassification:
    """A small classifier on the GPU whose offsets are far from zero and whose masks differ between points, so the
    sampling is really deformable."""
    fields = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [2, 4, 8, 16], "num_labels": 10,
              "drop_path_rate": 0.0, "dcn_backend": backend, **overrides}
    torch.manual_seed(0)
    return perturb_sampling(InternImageForImageClassification(InternImageConfig(**fields))).cuda()


def logits_and_gradients(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits and all parameter gradients (flattened, float32) of a randomly weighted sum of the logits."""
    model.zero_grad()
    logits = model(pixel_values).logits
    weights = torch.randn(logits.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    (logits.float() * weights).sum().backward()
    gradients = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach().float(), gradients


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "NaN or infinity"
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_parity_with_gradients(backend, dtype):
    require_backend(backend)
    pixel_values = torch.randn(2, 3, 64, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    expected = logits_and_gradients(deformable_classifier("pytorch").eval(), pixel_values)
    model = deformable_classifier(backend).to(dtype).eval()
    actual = logits_and_gradients(model, pixel_values.to(dtype))
    for name, got, want in zip(("logits", "gradients"), actual, expected):
        error, tolerance = relative_error(got, want), TOLERANCE[name][dtype]
        assert error < tolerance, f"{name}: {error:.2e} >= {tolerance:.1e}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_batch_above_256_matches_pytorch_backend(backend):
    """Batch 300 (the official op processes at most 256 images per kernel launch, `im2col_step`)."""
    require_backend(backend)
    pixel_values = torch.randn(300, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    expected = logits_and_gradients(deformable_classifier("pytorch").eval(), pixel_values)
    actual = logits_and_gradients(deformable_classifier(backend).eval(), pixel_values)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-4, atol=1e-4)
    assert relative_error(actual[1], expected[1]) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_whole_model_forward_and_backward(backend):
    """Inductor, fullgraph=True (any graph break fails), training mode: logits and gradients match eager."""
    require_backend(backend)
    torch._dynamo.reset()
    model = deformable_classifier(backend, depths=[1, 1, 1, 1]).train()
    pixel_values = torch.randn(4, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager = logits_and_gradients(model, pixel_values)
    compiled = logits_and_gradients(torch.compile(model, fullgraph=True), pixel_values)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    assert relative_error(compiled[1], eager[1]) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# A converted checkpoint: device_map="auto", pipelines, the model card's examples
# ---------------------------------------------------------------------------------------------------------------

# The public model card's two examples (backbone, then classifier), with the model loaded in DTYPE and moved to the
# GPU together with the image; the image processor's float32 pixel values go in as they are.
MODEL_CARD_ON_GPU = """
import sys
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, CLIPImageProcessor

model_name, image_path, dtype_name, result_path = sys.argv[1:]
dtype = getattr(torch, dtype_name)

image_processor = CLIPImageProcessor.from_pretrained(model_name)
image = Image.open(image_path)
image = image_processor(images=image, return_tensors='pt').pixel_values.to("cuda")
print('image shape:', image.shape)

model = AutoModel.from_pretrained(model_name, trust_remote_code=True, dtype=dtype).to("cuda")
hidden_states = model(image).hidden_states

model = AutoModelForImageClassification.from_pretrained(model_name, trust_remote_code=True, dtype=dtype).to("cuda")
logits = model(image).logits
label = torch.argmax(logits, dim=1)
print("Predicted label:", label.item())
torch.save({"pixel_values": image.cpu(), "hidden_states": [h.detach().cpu() for h in hidden_states],
            "logits": logits.detach().cpu(), "label": label.item()}, result_path)
"""


@pytest.fixture(scope="module")
def converted_tiny_t(tmp_path_factory, session_hf_home) -> tuple:
    """tiny_t converted by the CLI (as tests/test_convert.py does) and a photograph saved as PNG."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    work = tmp_path_factory.mktemp("card")
    completed = run_python(["convert_checkpoints.py", FIXTURES / "models" / "tiny_t" / "checkpoint.pth",
                            work / "tiny_t", "--official-config", official_kwargs_file("tiny_t", work)],
                           session_hf_home)
    assert completed.returncode == 0, completed.stderr[-3000:]
    image = work / "china.png"
    Image.fromarray(load_sample_image("china.jpg")).save(image)
    return work / "tiny_t", image


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 0.02), ("bfloat16", 0.1)])
def test_model_card_examples_in_half_precision_on_gpu(converted_tiny_t, dtype, atol, tmp_path):
    """Needs half-precision models to accept the processor's float32 pixel values (cast at the stem)."""
    folder, image = converted_tiny_t
    (tmp_path / "card.py").write_text(MODEL_CARD_ON_GPU)
    completed = run_python([tmp_path / "card.py", folder, image, dtype, tmp_path / "result.pt"],
                           tmp_path / "hf_home", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["pixel_values"].dtype == torch.float32 and result["pixel_values"].shape == (1, 3, 224, 224)
    assert [h.dtype for h in result["hidden_states"]] == [getattr(torch, dtype)] * 4
    assert [h.shape[1:] for h in result["hidden_states"]] == [(16 * 2**i, 56 // 2**i, 56 // 2**i) for i in range(4)]
    with torch.no_grad():
        expected = fixture_classifier("tiny_t")[0](result["pixel_values"]).logits
    assert result["logits"].dtype == getattr(torch, dtype)
    torch.testing.assert_close(result["logits"].float(), expected, rtol=0, atol=atol)
    assert result["label"] == expected.argmax(-1).item()


def test_device_map_auto_and_pipeline_place_the_model_on_the_gpu(converted_tiny_t):
    from PIL import Image
    from transformers import CLIPImageProcessor, pipeline

    folder, image = converted_tiny_t
    model = InternImageForImageClassification.from_pretrained(folder, device_map="auto").eval()
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    processor = CLIPImageProcessor.from_pretrained(folder)
    pixel_values = processor(images=Image.open(image), return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = fixture_classifier("tiny_t")[0](pixel_values).logits.softmax(-1)[0]
        probabilities = model(pixel_values.cuda()).logits.softmax(-1)[0].cpu()
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-5)
    classifier = pipeline("image-classification", model=InternImageForImageClassification.from_pretrained(folder),
                          image_processor=processor)
    assert classifier.device.type == "cuda"
    predictions = classifier(str(image), top_k=3)
    top = expected.topk(3)
    assert [p["label"] for p in predictions] == [model.config.id2label[i] for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([p["score"] for p in predictions]), top.values, rtol=0, atol=1e-5)
