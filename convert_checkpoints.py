"""Convert official InternImage checkpoints into Hub-ready Hugging Face model folders.

Accepted inputs: released classification `.pth` files (`{"model": state_dict}`), detection/segmentation
checkpoints (`{"state_dict": ...}` with `backbone.` keys, converted to a backbone without pooler), bare state
dicts, DeepSpeed `{"module": ...}`, EMA-only `{"model_ema": ...}` and the OpenGVLab Hub repositories' weights
(`model.` prefix, `layer_scale1/2`; `.bin` or `.safetensors`).

    python convert_checkpoints.py internimage_t_1k_224.pth converted/internimage_t_1k_224
    python convert_checkpoints.py ckpt.pth out --official-config configs/internimage_t_1k_224.yaml
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

try:
    from .configuration_internimage import AUTO_MAP, NUM_LABELS, VARIANTS, InternImageConfig, evaluation_transform
except ImportError:
    from configuration_internimage import AUTO_MAP, NUM_LABELS, VARIANTS, InternImageConfig, evaluation_transform

logger = logging.get_logger(__name__)

CODE_DIR = Path(__file__).resolve().parent
MODEL_ENTRY_FILES = ("configuration_internimage.py", "modeling_internimage.py")
# Above this many bytes of weights, verification compares the written tensors with the source one by one instead
# of loading a second model.
LARGE_CHECKPOINT_BYTES = 4 * 1024**3
VERIFY_RESOLUTION = 64
TEDDY_BEAR_WNID, TEAPOT_WNID = "n04399382", "n04398044"


class ConversionError(Exception):
    """A checkpoint or option that cannot be converted; the message says what was wrong and what to do."""


# Official key pattern -> our key. Applied in order; the first match wins.
KEY_RULES: list[tuple[str, str]] = [
    (r"^patch_embed\.conv(\d)\.", r"internimage.embeddings.conv\1."),
    (r"^patch_embed\.norm(\d)\.1\.", r"internimage.embeddings.norm\1."),
    (
        r"^levels\.(\d+)\.blocks\.(\d+)\.(?:gamma|layer_scale)(\d)$",
        r"internimage.encoder.stages.\1.layers.\2.layer_scale\3",
    ),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.(norm\d|res_post_norm\d)\.0\.", r"internimage.encoder.stages.\1.layers.\2.\3."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.dcn\.dw_conv\.0\.", r"internimage.encoder.stages.\1.layers.\2.dcn.dw_conv."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.dcn\.dw_conv\.1\.1\.", r"internimage.encoder.stages.\1.layers.\2.dcn.dw_norm."),
    (
        r"^levels\.(\d+)\.blocks\.(\d+)\.dcn\.center_feature_scale_proj_(weight|bias)$",
        r"internimage.encoder.stages.\1.layers.\2.dcn.center_feature_scale_proj.\3",
    ),
    (
        r"^levels\.(\d+)\.blocks\.(\d+)\.(dcn\.(?:offset|mask|input_proj|output_proj)|mlp\.fc\d)\.",
        r"internimage.encoder.stages.\1.layers.\2.\3.",
    ),
    (r"^levels\.(\d+)\.norm\.0\.", r"internimage.encoder.stages.\1.norm."),
    (r"^levels\.(\d+)\.post_norms\.(\d+)\.0\.", r"internimage.encoder.stages.\1.post_norms.\2."),
    (r"^levels\.(\d+)\.downsample\.conv\.", r"internimage.encoder.stages.\1.downsample.conv."),
    (r"^levels\.(\d+)\.downsample\.norm\.1\.", r"internimage.encoder.stages.\1.downsample.norm."),
    (r"^conv_head\.0\.", r"internimage.pooler.conv."),
    (r"^conv_head\.1\.0\.", r"internimage.pooler.norm."),
    (r"^dcnv3_head_x4\.0\.", r"internimage.pooler.upsample_proj."),
    (r"^dcnv3_head_x3\.", r"internimage.pooler.lateral_proj."),
    (r"^clip_projector\.norm1_q\.0\.", r"internimage.pooler.attention.norm_query."),
    (r"^clip_projector\.norm1_k\.0\.", r"internimage.pooler.attention.norm_key."),
    (r"^clip_projector\.norm1_v\.0\.", r"internimage.pooler.attention.norm_value."),
    (r"^clip_projector\.cross_dcn\.q\.weight$", r"internimage.pooler.attention.query.weight"),
    (r"^clip_projector\.cross_dcn\.k\.weight$", r"internimage.pooler.attention.key.weight"),
    (r"^clip_projector\.cross_dcn\.v\.weight$", r"internimage.pooler.attention.value.weight"),
    (r"^clip_projector\.cross_dcn\.q_bias$", r"internimage.pooler.attention.query.bias"),
    (r"^clip_projector\.cross_dcn\.k_bias$", r"internimage.pooler.attention.key.bias"),
    (r"^clip_projector\.cross_dcn\.v_bias$", r"internimage.pooler.attention.value.bias"),
    (r"^clip_projector\.cross_dcn\.proj\.", r"internimage.pooler.attention.output_proj."),
    (r"^fc_norm\.0\.", r"internimage.pooler.norm."),
    (r"^head\.", r"classifier."),
]
_COMPILED_RULES = [(re.compile(pattern), replacement) for pattern, replacement in KEY_RULES]


def rename_official_key(key: str) -> str | None:
    """Our parameter name for an official state-dict key, or `None` if the key is not part of the model."""
    for pattern, replacement in _COMPILED_RULES:
        if pattern.search(key):
            return pattern.sub(replacement, key)
    return None


def config_from_official_kwargs(kwargs: dict, **overrides) -> InternImageConfig:
    """Our config from the keyword arguments of the official `InternImage` constructor."""
    dw_kernel_size = kwargs.get("dw_kernel_size")
    use_clip = kwargs.get("use_clip_projector", False)
    fields = {
        "channels": kwargs.get("channels", 64),
        "depths": kwargs.get("depths", [3, 4, 18, 5]),
        "groups": kwargs.get("groups", [3, 6, 12, 24]),
        "mlp_ratio": kwargs.get("mlp_ratio", 4.0),
        "dw_kernel_size": dw_kernel_size if dw_kernel_size is not None else 3,
        "offset_scale": kwargs.get("offset_scale", 1.0),
        "remove_center": bool(kwargs.get("remove_center", False)),
        "center_feature_scale": bool(kwargs.get("center_feature_scale", False)),
        "layer_scale_init_value": kwargs.get("layer_scale"),
        "post_norm": bool(kwargs.get("post_norm", False)),
        "res_post_norm": bool(kwargs.get("res_post_norm", False)),
        "stage3_post_norm_block_ids": (
            kwargs.get("level2_post_norm_block_ids") if kwargs.get("level2_post_norm", False) else None
        ),
        "hidden_act": OFFICIAL_ACTIVATIONS[kwargs.get("act_layer", "GELU")],
        "drop_path_rate": kwargs.get("drop_path_rate", 0.2),
        "drop_path_type": kwargs.get("drop_path_type", "linear"),
        "hidden_dropout_prob": kwargs.get("drop_rate", 0.0),
        "conv_pooler_ratio": kwargs.get("cls_scale", 1.5),
        "pooler_type": "attention" if use_clip else "conv",
        "num_labels": kwargs.get("num_classes", 1000),
    }
    fields.update(overrides)
    return InternImageConfig(**fields)


# ----------------------------------------------------------------------------------------------- official configs

OFFICIAL_ACTIVATIONS = {"GELU": "gelu", "ReLU": "relu", "SiLU": "silu"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool) or value in (0, 1) and _is_int(value)


def _is_int_list(value: Any, minimum: int, maximum: int | None = None) -> bool:
    return isinstance(value, list) and all(
        _is_int(item) and minimum <= item and (maximum is None or item <= maximum) for item in value
    )


# The official `InternImage` constructor's arguments (classification/models/intern_image.py L554-578): what each
# must be, as a test and its description.
OFFICIAL_KWARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "core_op": (lambda v: v in ("DCNv3", "DCNv3_pytorch"), "'DCNv3' or 'DCNv3_pytorch'"),
    "channels": (lambda v: _is_int(v) and 2 <= v <= 2**16, "an integer from 2 to 65536"),
    "depths": (lambda v: _is_int_list(v, 0, 1024) and 0 < len(v) <= 16, "a list of 1 to 16 integers from 0 to 1024"),
    "groups": (lambda v: _is_int_list(v, 1, 2**16) and 0 < len(v) <= 16, "a list of 1 to 16 integers >= 1"),
    "num_classes": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "mlp_ratio": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "drop_rate": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "drop_path_rate": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "drop_path_type": (lambda v: v in ("linear", "uniform"), "'linear' or 'uniform'"),
    "act_layer": (lambda v: v in OFFICIAL_ACTIVATIONS, f"one of {', '.join(OFFICIAL_ACTIVATIONS)}"),
    "norm_layer": (lambda v: v == "LN", "'LN' (the only norm of the released models)"),
    "layer_scale": (lambda v: v is None or _is_number(v), "null or a number"),
    "offset_scale": (lambda v: _is_number(v), "a number"),
    "post_norm": (_is_flag, "a boolean"),
    "cls_scale": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "with_cp": (_is_flag, "a boolean"),
    "dw_kernel_size": (lambda v: v is None or _is_int(v) and v > 0 and v % 2 == 1, "null or an odd integer > 0"),
    "use_clip_projector": (_is_flag, "a boolean"),
    "level2_post_norm": (_is_flag, "a boolean"),
    "level2_post_norm_block_ids": (lambda v: v is None or _is_int_list(v, 0), "null or a list of integers >= 0"),
    "res_post_norm": (_is_flag, "a boolean"),
    "center_feature_scale": (_is_flag, "a boolean"),
    "remove_center": (_is_flag, "a boolean"),
}


def check_official_kwargs(kwargs: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`kwargs` if they are valid arguments of the official constructor, else a `ConversionError` naming the
    first wrong one (`source` says where they came from)."""
    for name, value in kwargs.items():
        if name not in OFFICIAL_KWARGS:
            raise ConversionError(
                f"{source}: unknown constructor argument {name!r}; the official InternImage constructor takes"
                f" {', '.join(OFFICIAL_KWARGS)}"
            )
        test, description = OFFICIAL_KWARGS[name]
        if not test(value):
            raise ConversionError(f"{source}: {name} must be {description}, got {_short_repr(value)}")
    return dict(kwargs)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _literal(value: Any) -> Any:
    """Decode a YAML scalar the way yacs does (`"1e-5"` -> 1e-05, `"None"` -> None)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return ast.literal_eval(value)
    return value


_YAML_TO_KWARGS = {
    "CORE_OP": "core_op", "CHANNELS": "channels", "DEPTHS": "depths", "GROUPS": "groups",
    "LAYER_SCALE": "layer_scale", "OFFSET_SCALE": "offset_scale", "POST_NORM": "post_norm",
    "MLP_RATIO": "mlp_ratio", "RES_POST_NORM": "res_post_norm", "DW_KERNEL_SIZE": "dw_kernel_size",
    "USE_CLIP_PROJECTOR": "use_clip_projector", "LEVEL2_POST_NORM": "level2_post_norm",
    "LEVEL2_POST_NORM_BLOCK_IDS": "level2_post_norm_block_ids", "CENTER_FEATURE_SCALE": "center_feature_scale",
    "REMOVE_CENTER": "remove_center",
}


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConversionError(f"{what} {path} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConversionError(f"{what} {path} is not a text file (not UTF-8)") from None
    except OSError as error:
        raise ConversionError(f"{what} {path} cannot be read: {error.strerror or error}") from None


def read_official_config(path: str | os.PathLike) -> tuple[dict[str, Any], int | None]:
    """Official constructor kwargs and image size from a training YAML or a JSON of constructor kwargs.

    Returns `(kwargs, image_size)`; `image_size` is `None` when the file does not give one. In a YAML, only
    `MODEL.INTERN_IMAGE.*`, `MODEL.NUM_CLASSES`, `MODEL.DROP_PATH_RATE` and `DATA.IMG_SIZE` are read (the rest of a
    training configuration does not concern the architecture); a JSON holds nothing but constructor kwargs.
    """
    path = Path(path)
    source = f"--official-config {path}"
    text = _read_text(path, "--official-config")
    if path.suffix == ".json":
        try:
            kwargs = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise ConversionError(f"{source} is not valid JSON: {error}") from None
        if isinstance(kwargs, dict) and isinstance(kwargs.get("kwargs"), dict):
            kwargs = kwargs["kwargs"]
        if not isinstance(kwargs, dict) or "channels" not in kwargs:
            raise ConversionError(
                f"{source} must hold the official InternImage constructor kwargs (a JSON object with 'channels',"
                " 'depths', 'groups', ...)"
            )
        return check_official_kwargs(kwargs, source), None
    import yaml

    try:
        document = yaml.safe_load(text)
    except Exception as error:  # PyYAML also raises ValueError (bad dates), RecursionError, ...
        raise ConversionError(f"{source} is not valid YAML: {error}") from None
    model = document.get("MODEL") if isinstance(document, dict) else None
    arch = model.get("INTERN_IMAGE") if isinstance(model, dict) else None
    if not isinstance(arch, dict):
        raise ConversionError(
            f"{source} has no MODEL.INTERN_IMAGE section; pass an official training YAML"
            " (classification/configs/*.yaml) or a JSON of constructor kwargs"
        )
    unknown = sorted(str(key) for key in arch if key not in _YAML_TO_KWARGS)
    if unknown:
        raise ConversionError(
            f"{source}: unknown MODEL.INTERN_IMAGE keys {', '.join(unknown)}; the official configuration has"
            f" {', '.join(_YAML_TO_KWARGS)}"
        )
    kwargs = {_YAML_TO_KWARGS[key]: _literal(value) for key, value in arch.items()}
    if "NUM_CLASSES" in model:
        kwargs["num_classes"] = _literal(model["NUM_CLASSES"])
    if "DROP_PATH_RATE" in model:
        kwargs["drop_path_rate"] = _literal(model["DROP_PATH_RATE"])
    data = document.get("DATA")
    image_size = _literal(data.get("IMG_SIZE")) if isinstance(data, dict) else None
    if image_size is not None and not (_is_int(image_size) and image_size > 0):
        raise ConversionError(f"{source}: DATA.IMG_SIZE must be a positive integer, got {_short_repr(image_size)}")
    return check_official_kwargs(kwargs, source), image_size


# ----------------------------------------------------------------------------------------------- loading


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split(". ")[0].split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:limit]}"


def _zip_members(path: Path) -> dict[int, int] | None:
    """The data offset and size of every member of a zip checkpoint, or `None` if one is compressed.

    Each member's local header must match the central directory (memory-mapped `torch.load` trusts the directory's
    offsets unchecked), and no member may be marked as a directory (a plain load reads those as uninitialised memory).
    """
    members = {}
    with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
        for info in archive.infolist():
            if info.filename.endswith("/") or info.external_attr & 0x10 or info.flag_bits & 0x1:
                raise ValueError(f"member {info.filename!r} is marked as a directory or encrypted")
            with archive.open(info):  # checks the local header: signature, and the name in the directory
                pass
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            handle.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", handle.read(4))
            members[info.header_offset + 30 + name_length + extra_length] = info.file_size
    return members


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _can_memory_map(path: Path) -> bool:
    """Whether `path` is a zip checkpoint whose tensors each read exactly one whole uncompressed member.

    Memory-mapped loading slices the file at the offsets and sizes the pickle claims, unchecked (a plain load
    compares each size with its member's): the pickle is read once without data (`map_location="meta"`) to check.
    """
    if not zipfile.is_zipfile(path):
        return False  # the legacy format cannot be mapped
    members = _zip_members(path)
    if members is None:
        return False
    for tensor in _tensors(torch.load(path, map_location="meta", weights_only=True)):
        storage = tensor.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if offset is None:  # a torch that does not record offsets: load into memory
            return False
        if members.get(offset) != storage.nbytes():
            raise ValueError(f"a tensor's data ({storage.nbytes()} bytes at {offset}) is not one archive member")
    return True


def _torch_load(path: Path) -> Any:
    """`torch.load` restricted to tensors and plain containers (`weights_only`), memory-mapped when possible.

    The file is untrusted input: whatever goes wrong while reading it (the restricted unpickler raises `KeyError`,
    `IndexError`, ... on corrupted pickles) means the file is not a readable checkpoint.
    """
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 31": the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_can_memory_map(path))
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if found:
            raise ConversionError(
                f"{path} needs Python code to unpickle ({found.group(1)}); it was not loaded, because loading it"
                " would run that code. If you trust the file, re-save only its weights with"
                " `torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')` and convert that"
            ) from None
        raise ConversionError(
            f"{path} is not a readable PyTorch checkpoint (neither a torch.save zip archive nor a pickle of tensors:"
            f" {_first_line(error)})"
        ) from None
    except Exception as error:
        raise ConversionError(
            f"{path} is not a readable PyTorch checkpoint (truncated, corrupted or another format:"
            f" {_first_line(error)})"
        ) from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as error:  # untrusted input, as in `_torch_load`
        raise ConversionError(f"{path} is not a readable safetensors file ({_first_line(error)})") from None


@dataclass
class SourceCheckpoint:
    """Official-format state dict (official key names) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    source_format: str
    ignored_keys: list[str] = field(default_factory=list)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items()
    )


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: tensor for key, tensor in state_dict.items()}
    return dict(state_dict)


# Entries of a training checkpoint that hold weights, in the order they are chosen (`--ema` puts `model_ema` first).
WEIGHT_ENTRIES = {
    "model": "classification checkpoint ('model')",
    "module": "DeepSpeed checkpoint ('module')",
    "model_ema": "EMA weights ('model_ema')",
}


def _select_weights(loaded: Any, path: Path, ema: bool) -> tuple[Any, str, list[str]]:
    """The state dict inside a loaded checkpoint, a description of where it was, and the keys left out."""
    if not isinstance(loaded, Mapping):
        return loaded, "state dict", []
    if ema and not isinstance(loaded.get("model_ema"), Mapping):
        raise ConversionError(f"{path} has no 'model_ema' entry (found {_describe_keys(loaded)}); drop --ema")
    order = ["model_ema", "model", "module"] if ema else list(WEIGHT_ENTRIES)
    for entry in order:
        if isinstance(loaded.get(entry), Mapping):
            source_format = WEIGHT_ENTRIES[entry]
            if entry == "model" and isinstance(loaded.get("model_ema"), Mapping):
                source_format += "; its 'model_ema' weights were not used (--ema converts those)"
            return loaded[entry], source_format, []
    full = loaded.get("state_dict")
    if not isinstance(full, Mapping):
        return loaded, "state dict", []
    if not _is_tensor_dict(full):
        raise ConversionError(f"{path} holds a 'state_dict' that is not a dict of named tensors")
    backbone = {key[len("backbone."):]: value for key, value in full.items() if key.startswith("backbone.")}
    if not backbone:
        raise ConversionError(
            f"{path} holds a 'state_dict' without 'backbone.' keys; it is not an InternImage detection or"
            " segmentation checkpoint"
        )
    ignored = sorted(key for key in full if not key.startswith("backbone."))
    return backbone, "detection/segmentation checkpoint ('state_dict', backbone only)", ignored


def _describe_keys(mapping: Mapping, limit: int = 10) -> str:
    keys = sorted(_short_repr(key, 40) for key in mapping)
    return "keys " + ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "") if keys else "an empty dict"


def load_official_checkpoint(path: str | os.PathLike, ema: bool = False) -> SourceCheckpoint:
    """Read a checkpoint file without executing code and return its weights under official key names.

    A training checkpoint holding both `model` and `model_ema` gives `model` (what the official code evaluates and
    releases), or `model_ema` with `ema=True`.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"input checkpoint {path} does not exist")
    if not path.is_file():
        raise ConversionError(f"input checkpoint {path} is not a file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(16)
    except OSError as error:
        raise ConversionError(f"input checkpoint {path} cannot be read: {error.strerror or error}") from None
    if not magic:
        raise ConversionError(f"input checkpoint {path} is empty")
    is_safetensors = path.suffix == ".safetensors" or (magic[8:9] == b"{" and not magic.startswith(b"PK"))
    loaded = _safetensors_load(path) if is_safetensors else _torch_load(path)

    state_dict, source_format, ignored = _select_weights(loaded, path, ema)
    if not _is_tensor_dict(state_dict):
        found = _describe_keys(loaded) if isinstance(loaded, Mapping) else f"a {type(loaded).__name__}"
        raise ConversionError(
            f"{path} holds no state dict of named tensors (found {found}); expected an InternImage checkpoint with"
            " a 'model', 'module', 'model_ema' or 'state_dict' entry, or a bare state dict"
        )
    state_dict = _strip_prefix(_strip_prefix(state_dict, "module."), "backbone.")
    if any(key.startswith("model.") for key in state_dict):
        state_dict = _strip_prefix(state_dict, "model.")
        source_format = "OpenGVLab Hub weights ('model.' prefix)"
    renamed = {re.sub(r"\.layer_scale(\d)$", r".gamma\1", key): tensor for key, tensor in state_dict.items()}
    if len(renamed) != len(state_dict):
        raise ConversionError(f"{path} holds both `gammaN` and `layer_scaleN` for the same layer scale")
    state_dict = renamed
    if all(rename_official_key(key) is None for key in state_dict):
        raise ConversionError(
            f"{path} holds no InternImage weights: none of its {len(state_dict)} keys"
            f" ({_describe_keys(state_dict, 5)}) is an InternImage parameter name"
        )
    return SourceCheckpoint(state_dict, source_format, ignored)


# ----------------------------------------------------------------------------------------------- mapping


def _model_class(config: InternImageConfig) -> type[torch.nn.Module]:
    try:
        from .modeling_internimage import InternImageForImageClassification, InternImageModel
    except ImportError:
        from modeling_internimage import InternImageForImageClassification, InternImageModel
    return InternImageModel if config.pooler_type is None else InternImageForImageClassification


def build_empty_model(config: InternImageConfig) -> torch.nn.Module:
    """The model for `config` on the meta device (no memory): `InternImageModel` without pooler, else the
    classifier."""
    with torch.device("meta"):
        return _model_class(config)(config)


def expected_shapes(config: InternImageConfig) -> dict[str, torch.Size]:
    """Our state-dict keys and shapes for `config`, named as in `InternImageForImageClassification` (a model
    without pooler gets the `internimage.` prefix)."""
    model = build_empty_model(config)
    prefix = "internimage." if config.pooler_type is None else ""
    return {prefix + key: tensor.shape for key, tensor in model.state_dict().items()}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prepare_tensors(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors to write: floating-point ones cast to `dtype` (whatever floating dtype the checkpoint stored),
    integer buffers (`num_batches_tracked`) in their own dtype; each dense, contiguous and owning its memory.

    `expected` maps the same keys to the model's tensors (meta tensors do), whose dtypes say which kind each is.
    """
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key in _progress(list(state_dict), "Preparing tensors", _size_in_bytes(state_dict)):
        tensor, wanted = state_dict[key], expected[key].dtype
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type != "cpu":
            raise ConversionError(
                f"checkpoint tensor {key} is not a dense tensor in memory ({tensor.layout}, {tensor.device}"
                f"{', quantized' if tensor.is_quantized else ''})"
            )
        integer = not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
        if (wanted.is_floating_point and not tensor.is_floating_point()) or (
            not wanted.is_floating_point and not integer
        ):
            kind = "floating-point" if wanted.is_floating_point else "integer"
            raise ConversionError(f"checkpoint tensor {key} has dtype {tensor.dtype}; a {kind} tensor is expected")
        tensor = tensor.detach().to(dtype if wanted.is_floating_point else wanted).contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # entries sharing memory are written separately
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        prepared[key] = tensor
    return prepared


@dataclass
class KeyReport:
    """How an official state dict compares with a model's: keys without a counterpart and shape mismatches."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 10) -> str:
        parts = []
        groups = (
            ("model tensors missing from the checkpoint", self.missing),
            ("unexpected checkpoint keys", self.unexpected),
            ("mis-shaped checkpoint tensors", self.mismatched),
        )
        for title, keys in groups:
            if keys:
                shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
                parts.append(f"{len(keys)} {title} ({shown})")
        return "; ".join(parts)


def compare_keys(official: Mapping[str, Any], expected: Mapping[str, torch.Size]) -> tuple[dict[str, str], KeyReport]:
    """Map official keys to ours and compare with `expected` (our key -> shape).

    `official` maps official key names to tensors (or anything with a `.shape`). Returns the rename table for the
    keys that fit and a report of the missing (ours, without a source), unexpected (official, without a
    destination) and mis-shaped keys (official names, with both shapes).
    """
    renames, unexpected, mismatched = {}, [], []
    for key, tensor in official.items():
        ours = rename_official_key(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(expected[ours]):
            mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(expected[ours])}")
        else:
            renames[key] = ours
    mapped = {rename_official_key(key) for key in official}
    missing = [key for key in expected if key not in mapped]
    return renames, KeyReport(missing, unexpected, mismatched)


def visible_architecture(official: Mapping[str, Any]) -> tuple[int | None, list[int], int | None]:
    """What the tensor names and shapes of an official state dict show: stem width (`channels`), blocks per stage
    (`depths`) and classifier rows; `None` where the checkpoint does not tell."""
    stem, head = official.get("patch_embed.conv2.weight"), official.get("head.weight")
    levels: dict[int, int] = {}
    for key in official:
        found = re.match(r"levels\.([0-9]+)\.(?:blocks\.([0-9]+)\.)?", key)
        if found:
            level = int(found.group(1))
            levels[level] = max(levels.get(level, 0), int(found.group(2)) + 1 if found.group(2) else 0)
    depths = [levels.get(level, 0) for level in range(max(levels) + 1)] if levels and max(levels) < 64 else []
    channels = stem.shape[0] if stem is not None and stem.ndim == 4 else None
    classes = head.shape[0] if head is not None and head.ndim == 2 else None
    return channels, depths, classes


def describe_architecture(official: Mapping[str, Any]) -> str:
    """Short description of the architecture visible in an official state dict, for error messages."""
    channels, depths, classes = visible_architecture(official)
    return f"channels {channels or '?'}, depths {depths}, {classes if classes is not None else 'no'} classes"


def _check_kwargs_fit(kwargs: Mapping[str, Any], official: Mapping[str, Any], source: str) -> None:
    """Stop early (before building anything of that size) when the configuration's widths, depths or class count
    are not the checkpoint's."""
    channels, depths, classes = visible_architecture(official)
    found = {"channels": channels, "depths": depths or None, "num_classes": classes}
    for name, value in found.items():
        if value is not None and name in kwargs and kwargs[name] != value:
            raise ConversionError(
                f"{source} gives {name} {_short_repr(kwargs[name])} but the checkpoint has {value}: the file does not"
                " describe this checkpoint"
            )


def has_classifier(official: Mapping[str, Any]) -> bool:
    """Whether an official state dict holds a classification head (else it is converted as a bare backbone)."""
    return "head.weight" in official


def variant_config(name: str, official: Mapping[str, Any], **overrides) -> InternImageConfig:
    """The released configuration `name`, with no pooler when the checkpoint has no classifier."""
    if not has_classifier(official):
        overrides.setdefault("pooler_type", None)
    return InternImageConfig.from_variant(name, **overrides)


@functools.lru_cache(maxsize=32)
def _variant_shapes(name: str, with_classifier: bool) -> dict[str, torch.Size]:
    overrides = {} if with_classifier else {"pooler_type": None}
    return expected_shapes(InternImageConfig.from_variant(name, **overrides))


def detect_variant(official: Mapping[str, Any], file_name: str = "") -> str:
    """The released variant whose shapes match an official state dict exactly.

    Shapes cannot tell apart releases that differ only in resolution (H 384 / 640); those are resolved from
    `file_name` (e.g. `internimage_h_22kto1k_640.pth`). Backbones without a head match every release of their
    architecture and resolution; the first one is returned.
    """
    stem = official.get("patch_embed.conv2.weight")
    same_width = [name for name in VARIANTS if stem is None or VARIANTS[name]["arch"]["channels"] == stem.shape[0]]
    candidates = [
        name for name in same_width if not compare_keys(official, _variant_shapes(name, has_classifier(official)))[1]
    ]
    if not candidates:
        raise ConversionError(
            f"the checkpoint's shapes ({describe_architecture(official)}) match no released InternImage"
            f" ({', '.join(VARIANTS)}); pass the training configuration with --official-config FILE"
        )
    file_stem = Path(file_name).name.lower()
    named = [name for name in candidates if name in file_stem]
    if len(named) == 1:
        return named[0]
    by_size = [name for name in candidates if re.search(rf"_{VARIANTS[name]['image_size']}(?!\d)", file_stem)]
    if len({VARIANTS[name]["image_size"] for name in by_size}) == 1:
        return by_size[0]
    releases = {json.dumps([VARIANTS[name]["arch"], VARIANTS[name]["image_size"]]) for name in candidates}
    if len(releases) == 1:
        return candidates[0]
    raise ConversionError(
        f"the checkpoint matches several releases that differ only in resolution or label set: {candidates};"
        " choose one with --variant NAME (or name the file after the release)"
    )


def _timm_info_lines(file_name: str) -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the ImageNet class lists come from timm: `pip install timm`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "_info" / file_name
    return path.read_text().splitlines()


def imagenet_22k_to_1k_indices() -> list[int]:
    """For each ImageNet-1k class, the row of the ImageNet-22k head (21841 classes, sorted wnids) of the same wnid.

    The one 1k class missing from the 22k set, n04399382 (teddy bear), takes the row of n04398044 (teapot), as in
    the official `map22kto1k.txt`.
    """
    index_22k = {wnid: index for index, wnid in enumerate(_timm_info_lines("imagenet22k_synsets.txt"))}
    indices = []
    for wnid in _timm_info_lines("imagenet_synsets.txt"):
        indices.append(index_22k[TEAPOT_WNID if wnid == TEDDY_BEAR_WNID and wnid not in index_22k else wnid])
    return indices


def imagenet_labels(label_set: str) -> dict[int, str]:
    """`id2label` of an ImageNet head: the readable names of timm's sorted wnid lists."""
    lemmas = dict(line.split("\t", 1) for line in _timm_info_lines("imagenet_synset_to_lemma.txt"))
    file_name = {"imagenet-1k": "imagenet_synsets.txt", "imagenet-22k": "imagenet22k_synsets.txt"}[label_set]
    return {index: lemmas[wnid] for index, wnid in enumerate(_timm_info_lines(file_name))}


def label_set_for(num_labels: int) -> str | None:
    """The ImageNet label set of a head with `num_labels` classes, or `None` for any other head."""
    return next((name for name, count in NUM_LABELS.items() if count == num_labels), None)


# ----------------------------------------------------------------------------------------------- writing


def model_code_files(entry_files: tuple[str, ...] = MODEL_ENTRY_FILES, code_dir: Path = CODE_DIR) -> list[str]:
    """The top-level modules the model needs: the entry files and every module they import relatively."""
    pending, found = list(entry_files), []
    while pending:
        name = pending.pop(0)
        if name in found:
            continue
        found.append(name)
        source = (code_dir / name).read_text()
        pending += [f"{module}.py" for module in re.findall(r"^\s*from \.(\w+) import", source, flags=re.MULTILINE)]
    return found


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """The `preprocessor_config.json` of a release: a `CLIPImageProcessor` with the official evaluation transform."""
    return {"image_processor_type": "CLIPImageProcessor", **evaluation_transform(image_size)}


def finalize_config(config: InternImageConfig) -> InternImageConfig:
    """Set `auto_map`, the label set and ImageNet class names (other heads keep `LABEL_i`)."""
    config.auto_map = dict(AUTO_MAP)
    if config.pooler_type is not None:
        config.label_set = label_set_for(config.num_labels)
        if config.label_set is not None:
            config.id2label = imagenet_labels(config.label_set)
            config.label2id = {label: index for index, label in config.id2label.items()}
    else:
        config.label_set = None
    return config


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


# The examples of README's "Classify" section, of docs/usage.md's "Dense prediction backbone" and of every converted
# folder's model card, written once here: tests/test_docs.py checks that README and docs/usage.md show them as written.
USAGE_EXAMPLE = """\
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, CLIPImageProcessor

model_name = "path/to/converted/folder"  # or its Hub repo id
image_processor = CLIPImageProcessor.from_pretrained(model_name)
pixel_values = image_processor(images=Image.open("path/to/image.jpg"), return_tensors="pt").pixel_values

encoder = AutoModel.from_pretrained(model_name, trust_remote_code=True)
hidden_states = encoder(pixel_values).hidden_states  # four NCHW maps, strides 4, 8, 16, 32
"""
CLASSIFIER_EXAMPLE = """
classifier = AutoModelForImageClassification.from_pretrained(model_name, trust_remote_code=True)
logits = classifier(pixel_values).logits
print(classifier.config.id2label[logits.argmax(-1).item()])
"""
DENSE_PREDICTION_EXAMPLE = """\
import torch
from transformers import AutoModel, UperNetConfig, UperNetForSemanticSegmentation

model_name = "path/to/converted/folder"  # or its Hub repo id
encoder = AutoModel.from_pretrained(model_name, trust_remote_code=True, pooler_type=None)  # stem and stages
segmenter = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=encoder.config, num_labels=150))
segmenter.backbone.load_state_dict(encoder.state_dict())  # the pretrained backbone weights
feature_maps = segmenter.backbone(torch.randn(1, 3, 224, 224)).feature_maps  # 4 maps, backbone.channels channels
segmentation_logits = segmenter.eval()(torch.randn(1, 3, 224, 224)).logits  # (1, 150, 224, 224)
"""


def write_model_card(path: Path, config: InternImageConfig, variant: str | None, notes: list[str]) -> None:
    """A README.md with Hub metadata, usage and the published numbers of the release."""
    is_classifier = config.pooler_type is not None
    release = VARIANTS.get(variant or "", {})
    datasets = ["imagenet-1k"] if config.label_set != "imagenet-22k" else ["imagenet-21k"]
    title = variant or "InternImage"
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'image-classification' if is_classifier else 'image-feature-extraction'}",
        "license: mit",
        "tags:",
        "- internimage",
        "- vision",
        "- dcnv3",
        f"- {'image-classification' if is_classifier else 'backbone'}",
        "datasets:",
        *[f"- {name}" for name in datasets],
        "---",
        "",
        f"# {title}",
        "",
        "InternImage ([CVPR 2023](https://arxiv.org/abs/2211.05778)), converted from the official checkpoint of"
        " [OpenGVLab/InternImage](https://github.com/OpenGVLab/InternImage) for 🤗 Transformers (remote code:"
        " load with `trust_remote_code=True`).",
        "",
        f"- Resolution: {config.image_size}; stage widths {config.stage_channels}; depths {config.depths}.",
        f"- Head: {config.num_labels} classes ({config.label_set or 'custom labels'})." if is_classifier
        else "- Backbone only (no pooler, no classifier): use `AutoModel` for the four stage maps.",
    ]
    if release:
        top1 = f"{release['top1']} % ImageNet-1k top-1" if release["top1"] is not None else "no published top-1"
        lines.append(f"- Published: {top1}, {release['params']} parameters.")
    lines += [f"- {note}" for note in notes]
    usage = USAGE_EXAMPLE + (CLASSIFIER_EXAMPLE if is_classifier else "")
    lines += ["", "## Usage", "", f"```python\n{usage}```", "", "## Dense prediction", ""]
    lines += [
        "UperNet, Mask2Former and the other models that build their backbone with `load_backbone` take this one with"
        " its pretrained weights:",
        "",
        f"```python\n{DENSE_PREDICTION_EXAMPLE}```",
        "",
    ]
    path.write_text("\n".join(lines))


def write_repo_metadata(output_dir: str | os.PathLike, variant: str = "internimage_t_1k_224") -> None:
    """Write the `config.json` and `preprocessor_config.json` of a release (with `auto_map` and class names)
    into `output_dir`, e.g. the repository's own top-level files."""
    output_dir = Path(output_dir)
    config = finalize_config(InternImageConfig.from_variant(variant))
    config.architectures = ["InternImageForImageClassification"]
    config.save_pretrained(output_dir)
    write_json(output_dir / "preprocessor_config.json", preprocessor_config(config.image_size))


# ----------------------------------------------------------------------------------------------- verification


def _comparable_outputs(model: torch.nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    first = outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state
    return [first, *outputs.hidden_states]


def verify_by_reload(folder: Path, model: torch.nn.Module) -> None:
    """Reload `folder` through the Auto classes (remote code, offline, default arguments) and check that it loads
    in the model's dtype and that its outputs equal the in-memory model's on a random input."""
    from transformers import AutoModel, AutoModelForImageClassification

    auto_class = AutoModel if model.config.pooler_type is None else AutoModelForImageClassification
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, VERIFY_RESOLUTION, VERIFY_RESOLUTION, generator=generator)
    try:
        reloaded = auto_class.from_pretrained(folder, trust_remote_code=True, local_files_only=True).eval()
        expected, actual = _comparable_outputs(model.eval(), pixel_values), _comparable_outputs(reloaded, pixel_values)
    except Exception as error:  # e.g. weights that make the forward fail: the folder is not verified
        raise ConversionError(f"verification failed: the written folder does not run ({_first_line(error)})") from None
    if reloaded.dtype != model.dtype:
        raise ConversionError(f"verification failed: the folder loads as {reloaded.dtype}, not {model.dtype}")
    for index, (want, got) in enumerate(zip(expected, actual)):
        # Same weights and code; only the memory layout of the weights may change the rounding. Non-finite weights
        # (a checkpoint may hold them) give non-finite outputs at the same places.
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-5, atol=1e-5, equal_nan=True):
            raise ConversionError(
                f"verification failed: output {index} of the reloaded folder differs from the converted model"
                f" (max abs difference {(want - got).abs().max().item():.3g})"
            )


def verify_tensors(folder: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Compare every tensor written in `folder`'s safetensors files with `state_dict`, one tensor at a time."""
    from safetensors import safe_open

    seen = set()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in _progress(list(handle.keys()), f"Verifying {shard.name}", _size_in_bytes(state_dict)):
                if key not in state_dict or not _bitwise_equal(handle.get_tensor(key), state_dict[key]):
                    raise ConversionError(f"verification failed: written tensor {key} differs from the source")
                seen.add(key)
    if seen != set(state_dict):
        raise ConversionError(f"verification failed: {len(set(state_dict) - seen)} tensors were not written")


def _bitwise_equal(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike `torch.equal`, NaN equals the same NaN)."""
    if first.dtype != second.dtype or first.shape != second.shape:
        return False
    return torch.equal(first.contiguous().view(-1).view(torch.uint8), second.contiguous().view(-1).view(torch.uint8))


# ----------------------------------------------------------------------------------------------- conversion


def _progress(items: list[str], description: str, total_bytes: int) -> Iterator[str]:
    """`items`, with a tqdm progress bar for checkpoints above 1 GB."""
    if total_bytes < 1024**3:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=description, unit="tensor"))


def _size_in_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())


@contextlib.contextmanager
def _staging_folder(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder next to `output_dir` that replaces it only when the block succeeds; on failure nothing
    is left, not even the parent folders this created."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ConversionError(f"output folder {output_dir} exists and is not empty; pass --overwrite to replace it")
    created = [parent for parent in output_dir.absolute().parents if not parent.exists()]
    staging = None
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="_internimage_convert_", dir=output_dir.parent))
        yield staging
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix="_internimage_old_", dir=output_dir.parent))
            os.replace(output_dir, old / "previous")
            os.replace(staging, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _resolve_config(
    official: Mapping[str, Any],
    input_path: Path,
    variant: str | None,
    official_config: str | os.PathLike | None,
    image_size: int | None,
) -> tuple[InternImageConfig, str | None]:
    """The config the checkpoint is converted to, and the release name when it is one."""
    if variant is not None and official_config is not None:
        raise ConversionError("pass either --variant or --official-config, not both")
    overrides = {"image_size": image_size} if image_size is not None else {}
    if official_config is not None:
        kwargs, config_size = read_official_config(official_config)
        _check_kwargs_fit(kwargs, official, f"--official-config {official_config}")
        if image_size is None:
            overrides["image_size"] = config_size or 224
        if not has_classifier(official):  # a backbone: the class count of the training run does not apply
            overrides["pooler_type"] = None
            kwargs = {name: value for name, value in kwargs.items() if name != "num_classes"}
        try:
            return config_from_official_kwargs(kwargs, **overrides), None
        except (TypeError, ValueError) as error:
            raise ConversionError(f"--official-config {official_config}: {error}") from None
    if variant is not None:
        if variant not in VARIANTS:
            raise ConversionError(f"unknown --variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        report = compare_keys(official, _variant_shapes(variant, has_classifier(official)))[1]
        if report:
            raise ConversionError(f"the checkpoint does not match --variant {variant}: {report.describe()}")
    else:
        variant = detect_variant(official, input_path.name)
    return variant_config(variant, official, **overrides), variant


def _empty_model(config: InternImageConfig, official_config: str | os.PathLike | None) -> torch.nn.Module:
    """`build_empty_model(config)`; a configuration read from a file that cannot be built is that file's error."""
    try:
        return build_empty_model(config)
    except Exception as error:
        if official_config is None:
            raise
        raise ConversionError(
            f"--official-config {official_config}: no model can be built from it ({_first_line(error)})"
        ) from None


def _precision_note(official: Mapping[str, torch.Tensor], dtype: str) -> str:
    """What the model card says about the stored precision."""
    stored = sorted({str(t.dtype).removeprefix("torch.") for t in official.values() if t.is_floating_point()})
    note = f"Weights: stored in {dtype} (the source checkpoint held {', '.join(stored) or 'no floating-point'} tensors)"
    if dtype == "float32":
        return note + "; they load and compute in float32 by default, as the official code runs them."
    return (
        note + f"; they load and compute in {dtype} by default. For the official float32 numbers, load with"
        " `dtype=torch.float32`."
    )


def convert_checkpoint(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    variant: str | None = None,
    official_config: str | os.PathLike | None = None,
    image_size: int | None = None,
    head_1k: bool = False,
    verify: bool = True,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    push_to_hub: str | None = None,
    dtype: str = "float32",
    ema: bool = False,
) -> Path:
    """Convert an official InternImage checkpoint into a Hub-ready folder and return the folder.

    The architecture comes from `official_config` (training YAML or constructor-kwargs JSON), from `variant`, or is
    detected from the tensor shapes. `head_1k` reduces a 22k head (21841 classes) to ImageNet-1k. The weights are
    stored, and load by default, in `dtype` ("float32", "float16" or "bfloat16"), whatever floating dtypes the
    checkpoint holds: the default float32 computes as the official code, which loads any checkpoint into a float32
    model. `ema` takes a training checkpoint's `model_ema` weights instead of its `model`. The folder holds
    `model.safetensors` (sharded above `max_shard_size`), `config.json` with `auto_map`, the model code,
    `preprocessor_config.json` and a model card; it is written next to `output_dir` and renamed at the end.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    input_path, output_dir = Path(input_path), Path(output_dir)
    source = load_official_checkpoint(input_path, ema=ema)
    official = source.state_dict
    config, variant = _resolve_config(official, input_path, variant, official_config, image_size)
    notes = [f"Source: `{input_path.name}` ({source.source_format})."]
    if source.ignored_keys:
        logger.warning(f"Ignoring {len(source.ignored_keys)} non-backbone tensors (e.g. {source.ignored_keys[0]})")
        notes.append(f"{len(source.ignored_keys)} non-backbone tensors of the source (neck, heads) were left out.")
    if head_1k:
        if visible_architecture(official)[2] != NUM_LABELS["imagenet-22k"] or "head.bias" not in official:
            raise ConversionError("--head-1k needs a checkpoint with an ImageNet-22k head (21841 classes)")
        rows = torch.tensor(imagenet_22k_to_1k_indices())
        official = {**official, "head.weight": official["head.weight"][rows], "head.bias": official["head.bias"][rows]}
        config.num_labels = NUM_LABELS["imagenet-1k"]
        notes.append("The ImageNet-22k head was reduced to the 1000 ImageNet-1k classes (rows of the same wnid).")
    finalize_config(config)
    notes.append(_precision_note(official, dtype))

    model = _empty_model(config, official_config)
    prefix = "internimage." if config.pooler_type is None else ""
    empty_state = model.state_dict()
    renames, report = compare_keys(official, {prefix + key: tensor.shape for key, tensor in empty_state.items()})
    if report:
        raise ConversionError(f"the checkpoint does not fit the configuration: {report.describe()}")
    renamed = {renames[key][len(prefix):]: official[key] for key in official}
    state_dict = prepare_tensors(renamed, empty_state, DTYPES[dtype])
    weight_bytes = _size_in_bytes(state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval()

    try:
        with _staging_folder(output_dir, overwrite) as staging:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
            for name in model_code_files():
                shutil.copy2(CODE_DIR / name, staging / name)
            write_json(staging / "preprocessor_config.json", preprocessor_config(config.image_size))
            write_model_card(staging / "README.md", config, variant, notes)
            if verify:
                if weight_bytes > LARGE_CHECKPOINT_BYTES:
                    verify_tensors(staging, state_dict)
                else:
                    verify_by_reload(staging, model)
    except OSError as error:
        raise ConversionError(f"could not write {output_dir}: {error.strerror or error}") from None
    logger.info(f"Wrote {output_dir} ({variant or 'custom configuration'}, {len(state_dict)} tensors)")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=output_dir, repo_id=push_to_hub, commit_message=f"Convert {input_path.name}")
    return output_dir


# ----------------------------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _shard_size(text: str) -> str | int:
    from transformers.utils.hub import convert_file_size_to_int

    if text.isdigit() and int(text) > 0:
        return int(text)
    with contextlib.suppress(ValueError):
        if convert_file_size_to_int(text) > 0:
            return text
    raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 100000, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an official InternImage checkpoint into a Hugging Face model folder (remote code).",
    )
    parser.add_argument("input", nargs="?", metavar="INPUT", help="official checkpoint (.pth, .bin or .safetensors)")
    parser.add_argument("output_dir", nargs="?", metavar="OUTPUT_DIR", help="folder to write (absent or empty)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--variant",
        metavar="NAME",
        choices=list(VARIANTS),
        help=f"released architecture, detected by default; one of {', '.join(VARIANTS)}",
    )
    source.add_argument(
        "--official-config", metavar="FILE", help="official training YAML or JSON of the constructor kwargs"
    )
    parser.add_argument(
        "--image-size",
        type=_positive_int,
        metavar="N",
        help="resolution of the weights (default: the release's, or 224)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="precision the weights are stored in and load in by default (default float32: the official numbers,"
        " also for float16/bfloat16 checkpoints, whose values float32 holds exactly)",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="convert the 'model_ema' weights of a training checkpoint (default: its 'model' weights)",
    )
    parser.add_argument("--head-1k", action="store_true", help="reduce an ImageNet-22k head to ImageNet-1k")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading and comparing the written folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    parser.add_argument(
        "--max-shard-size", default="2GB", type=_shard_size, metavar="SIZE", help="largest shard (default 2GB)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    parser.add_argument(
        "--write-repo-config",
        metavar="DIR",
        help="only write config.json and preprocessor_config.json of InternImage-T (1k, 224) into DIR",
    )
    args = parser.parse_args(argv)
    if args.write_repo_config is None and (args.input is None or args.output_dir is None):
        parser.error("INPUT and OUTPUT_DIR are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.write_repo_config is not None:
            write_repo_metadata(args.write_repo_config)
            return 0
        output = convert_checkpoint(
            args.input,
            args.output_dir,
            variant=args.variant,
            official_config=args.official_config,
            image_size=args.image_size,
            head_1k=args.head_1k,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            push_to_hub=args.push_to_hub,
            dtype=args.dtype,
            ema=args.ema,
        )
    except ConversionError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # always one line
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"converted {args.input} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
