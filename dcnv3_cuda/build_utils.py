"""Build-environment checks for the DCNv3 CUDA extension, kept apart from `setup.py` so they can be unit-tested.

Every problem that would otherwise surface as a long compiler log (a CPU-only torch, no CUDA toolkit, a toolkit
whose major version differs from torch's CUDA, missing CUDA library headers) becomes one `BuildEnvironmentError`
that says what is wrong and what to do.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

INSTALL_COMMAND = "pip install ./dcnv3_cuda --no-build-isolation"
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
DEFAULT_TOOLKIT_ROOT = Path("/usr/local/cuda")
TOOLKIT_MARKER = Path("include") / "cuda_runtime_api.h"


class BuildEnvironmentError(RuntimeError):
    """The environment cannot build the extension; the message says what to change."""


@dataclass(frozen=True)
class BuildSettings:
    """What `setup.py` needs to compile the extension."""

    cuda_home: Path
    toolkit_version: str
    torch_cuda_version: str
    cuda_arch_list: str
    include_dirs: tuple[Path, ...]


def require_cuda_torch(torch_version: str, torch_cuda_version: str | None) -> str:
    """`torch.version.cuda`, or an error when the installed torch is a CPU-only build."""
    if torch_cuda_version is None:
        raise BuildEnvironmentError(
            f"The installed torch {torch_version} is a CPU-only build (torch.version.cuda is None), so the DCNv3 CUDA "
            "extension cannot be built against it. Install a CUDA build of torch (for example "
            "`pip install torch --index-url https://download.pytorch.org/whl/cu130`), then run "
            f"`{INSTALL_COMMAND}` again; or skip the extension: the model runs without it (Triton or PyTorch backend)."
        )
    return torch_cuda_version


def _is_toolkit_root(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / TOOLKIT_MARKER).is_file()


def _toolkit_root_reported_by_nvcc(nvcc: str) -> Path | None:
    """The toolkit root that `nvcc` itself uses (`TOP=` in its dry run), which sees through wrapper scripts."""
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, flags=re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


def find_cuda_home(
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
    default_root: Path = DEFAULT_TOOLKIT_ROOT,
) -> Path:
    """The CUDA toolkit root: `CUDA_HOME` (or `CUDA_PATH`), else `/usr/local/cuda`, else the one `nvcc` on PATH uses.

    `nvcc` on PATH may be a wrapper script (such as `/usr/local/bin/nvcc`), so its own dry run is asked for the
    toolkit root instead of guessing from the script's location.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(variable):
            root = Path(environ[variable])
            if not _is_toolkit_root(root):
                raise BuildEnvironmentError(
                    f"{variable}={root} is not a CUDA toolkit (no bin/nvcc and {TOOLKIT_MARKER} there). Point "
                    f"{variable} at the toolkit root, e.g. `{variable}=/usr/local/cuda {INSTALL_COMMAND}`."
                )
            return root
    if _is_toolkit_root(default_root):
        return default_root
    nvcc = which("nvcc")
    if nvcc is not None:
        resolved = Path(nvcc).resolve().parent.parent
        if _is_toolkit_root(resolved):
            return resolved
        reported = _toolkit_root_reported_by_nvcc(nvcc)
        if reported is not None and _is_toolkit_root(reported):
            return reported
    raise BuildEnvironmentError(
        "No CUDA toolkit found (CUDA_HOME is unset, /usr/local/cuda does not exist and no usable nvcc is on PATH). "
        "Install the CUDA toolkit whose major version matches torch.version.cuda and run "
        f"`CUDA_HOME=/path/to/cuda {INSTALL_COMMAND}`."
    )


def toolkit_version(cuda_home: Path) -> str:
    """The toolkit's `major.minor` version, from `nvcc --version`."""
    nvcc = cuda_home / "bin" / "nvcc"
    try:
        banner = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        message = f"Could not run `{nvcc} --version` ({error}); check the CUDA toolkit install."
        raise BuildEnvironmentError(message) from error
    return parse_nvcc_version(banner.stdout)


def parse_nvcc_version(banner: str) -> str:
    """`"13.0"` from nvcc's `... Cuda compilation tools, release 13.0, V13.0.88` banner."""
    match = re.search(r"release (\d+)\.(\d+)", banner)
    if match is None:
        raise BuildEnvironmentError(f"Could not read the CUDA version from nvcc's banner: {banner.strip()!r}")
    return f"{match.group(1)}.{match.group(2)}"


def check_toolkit_matches_torch(toolkit: str, torch_cuda: str, cuda_home: Path) -> None:
    """Raise when the toolkit's major CUDA version differs from the one torch was built with."""
    if toolkit.split(".")[0] != torch_cuda.split(".")[0]:
        raise BuildEnvironmentError(
            f"The CUDA toolkit at {cuda_home} is version {toolkit}, but torch was built with CUDA {torch_cuda} "
            "(torch.version.cuda); the major versions must match. Point CUDA_HOME at a CUDA "
            f"{torch_cuda.split('.')[0]}.x toolkit (`CUDA_HOME=/usr/local/cuda-{torch_cuda} {INSTALL_COMMAND}`), "
            f"or install a torch built for CUDA {toolkit.split('.')[0]}."
        )


def find_cuda_library_includes(site_dirs: Iterable[Path]) -> tuple[Path, ...]:
    """Header folders of the pip `nvidia-*` wheels torch depends on (cuSPARSE, cuBLAS, ... headers).

    CUDA 13 wheels share one `nvidia/cu13/include`; CUDA 12 wheels have one `nvidia/<library>/include` each.
    torch's headers include some of these, and a bare toolkit (nvcc only) does not ship them.
    """
    found: list[Path] = []
    for site_dir in site_dirs:
        found.extend(sorted(path for path in Path(site_dir).glob("nvidia/*/include") if path.is_dir()))
    return tuple(dict.fromkeys(found))


def site_package_dirs() -> tuple[Path, ...]:
    """This interpreter's `purelib` and `platlib` folders."""
    paths = sysconfig.get_paths()
    return tuple(dict.fromkeys(Path(paths[key]) for key in ("purelib", "platlib")))


def cuda_arch_list(environ: Mapping[str, str] = os.environ) -> str:
    """`TORCH_CUDA_ARCH_LIST`, or a default covering A100, A10/RTX 30, L4/RTX 40 and H100 (+PTX for newer GPUs)."""
    return environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def prepare_build_environment(environ: dict[str, str] = os.environ) -> BuildSettings:
    """Check the environment and export `CUDA_HOME`/`TORCH_CUDA_ARCH_LIST` for `torch.utils.cpp_extension`.

    Must run before `torch.utils.cpp_extension` is imported: it reads `CUDA_HOME` once, at import.
    """
    import torch

    torch_cuda = require_cuda_torch(torch.__version__, torch.version.cuda)
    cuda_home = find_cuda_home(environ)
    toolkit = toolkit_version(cuda_home)
    check_toolkit_matches_torch(toolkit, torch_cuda, cuda_home)
    settings = BuildSettings(
        cuda_home=cuda_home,
        toolkit_version=toolkit,
        torch_cuda_version=torch_cuda,
        cuda_arch_list=cuda_arch_list(environ),
        include_dirs=find_cuda_library_includes(site_package_dirs()),
    )
    environ["CUDA_HOME"] = str(settings.cuda_home)
    environ["TORCH_CUDA_ARCH_LIST"] = settings.cuda_arch_list
    return settings
