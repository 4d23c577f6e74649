"""Build script for fastmtl's native extensions.

Two extension modules are built:

* ``fastmtl._C`` (always): op schemas (``csrc/ops.cpp``), their autograd (``csrc/autograd.cpp``), the grouped
  multi-task loss (``csrc/masked_multitask_loss.cpp``) and the C++ CPU kernels (``csrc/cpu/*.cpp``), OpenMP, -O3.
* ``fastmtl._C_cuda`` (when torch has CUDA and nvcc is found): the CUDA kernels (``csrc/cuda/*.cu``, raw pointers
  only, so they compile in seconds) and their ATen glue (``csrc/cuda/*_aten.cpp``).

Environment switches:

* ``FASTMTL_SKIP_CUDA_BUILD=1`` builds the CPU extension alone.
* ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` when no GPU is visible.
* ``CUDA_HOME`` defaults to the directory of the real nvcc (``/usr/local/cuda`` on our machines).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]  # the C++ standard is chosen by torch
# --threads 2: nvcc compiles a file's two default archs (sm_80, sm_90) side by side. The grouped masked-loss kernel's
# file is the build's long pole (nine builds of a large kernel per arch): 317 s -> 251 s on a 2-core machine, where
# ninja runs out of other files to compile beside it.
NVCC_FLAGS = ["-O3", "-lineinfo", "-DNDEBUG", "--threads", "2"]


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _find_cuda_home():
    """The CUDA toolkit root, resolved through the real nvcc (not a wrapper in /usr/local/bin)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _nvidia_wheel_includes():
    """Headers from the nvidia-* wheels (cublas.h and friends are missing from some local toolkits)."""
    try:
        import nvidia  # noqa: F401  (namespace package installed with CUDA builds of torch)
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs


def _want_cuda(torch):
    if os.environ.get("FASTMTL_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False, "FASTMTL_SKIP_CUDA_BUILD is set"
    if not torch.version.cuda:
        return False, "torch was built without CUDA"
    cuda_home = _find_cuda_home()
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return False, "nvcc not found"
    os.environ["CUDA_HOME"] = cuda_home
    return True, cuda_home


def _release_build_ext(base):
    """BuildExtension without the ``-g`` that Python's own build flags add (it makes the .so ~10x larger)."""

    class ReleaseBuildExt(base):
        def build_extensions(self):
            for attr in ("compiler_so", "compiler_cxx", "linker_so"):
                cmd = getattr(self.compiler, attr, None)
                if cmd:
                    setattr(self.compiler, attr, [arg for arg in cmd if arg != "-g"])
            super().build_extensions()

    return ReleaseBuildExt


def _extensions():
    import torch

    # Decide on CUDA (and set CUDA_HOME) before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    want_cuda, why = _want_cuda(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "fastmtl._C",
            _sources("csrc/ops.cpp") + _sources("csrc/autograd.cpp") + _sources("csrc/masked_multitask_loss.cpp")
            + _sources("csrc/cpu/*.cpp"),
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    if want_cuda:
        from torch.utils.cpp_extension import CUDAExtension

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext_modules.append(
            CUDAExtension(
                "fastmtl._C_cuda",
                _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
                include_dirs=_nvidia_wheel_includes(),
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                extra_link_args=["-fopenmp"],
            )
        )
    else:
        print(f"fastmtl: building without CUDA ({why})", file=sys.stderr)
    return ext_modules, {"build_ext": _release_build_ext(BuildExtension).with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastmtl", "fastmtl.*"]) + ["fastmtl.kernels"],
    package_dir={"fastmtl.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
