"""Build the DCNv3 CUDA extension against the installed torch: `pip install ./dcnv3_cuda --no-build-isolation`.

Architectures come from `TORCH_CUDA_ARCH_LIST` (default "8.0;8.6;8.9;9.0+PTX"); no GPU is needed at build time.
"""

import logging
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_utils import BuildEnvironmentError, prepare_build_environment  # noqa: E402

logger = logging.getLogger("dcnv3_cuda.setup")

try:
    settings = prepare_build_environment()
except BuildEnvironmentError as error:
    raise SystemExit(f"error: {error}") from None
logger.warning(
    "Building dcnv3_cuda with the CUDA %s toolkit at %s (torch CUDA %s) for TORCH_CUDA_ARCH_LIST=%s",
    settings.toolkit_version, settings.cuda_home, settings.torch_cuda_version, settings.cuda_arch_list,
)

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402  (reads CUDA_HOME at import)

setup(
    ext_modules=[
        CUDAExtension(
            name="dcnv3_cuda._C",
            sources=["csrc/dcnv3_cuda.cu"],
            include_dirs=[str(path) for path in settings.include_dirs],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
