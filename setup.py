"""Build the memfast extension: CPU kernels always, CUDA kernels when a CUDA
build of torch and the CUDA toolkit are present.

Environment:
  MEMFAST_CUDA=0|1|auto    force the CUDA kernels off / on (default auto)
  CUDA_HOME                the toolkit's install folder; found automatically
                           when unset (the `nvcc` on PATH may be a wrapper
                           script, which makes torch guess it wrong)
  TORCH_CUDA_ARCH_LIST     default: 9.0 plus what the visible GPU needs
  MEMFAST_CPU_FLAGS        host compiler ISA flags; default: -mavx2 -mfma -mf16c
                           and -mavx512{f,bw,vl,dq,bf16} as far as this machine's
                           CPU has them
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    text = open(os.path.join(ROOT, "memfast", "_version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_cuda_home():
    """The toolkit folder whose bin/nvcc is the real compiler, not a wrapper."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        if not is_elf(real):  # a wrapper script: look for the path it execs
            m = re.search(r"(/\S+)/bin/nvcc", open(real, errors="replace").read())
            if m:
                candidates.append(m.group(1))
    candidates += [os.path.realpath("/usr/local/cuda")] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and is_elf(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def want_cuda(torch):
    flag = os.environ.get("MEMFAST_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return None
    home = find_cuda_home()
    if flag in ("1", "true", "yes", "on"):
        if home is None or torch.version.cuda is None:
            raise RuntimeError("MEMFAST_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
        return home
    return home if (home and torch.version.cuda) else None


def cuda_arch_list(torch):
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    archs = {"9.0"}
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                archs.add(f"{major}.{minor}")
    except Exception:  # no driver: keep the default
        pass
    return ";".join(sorted(archs))


def host_cpu_flags():
    if "MEMFAST_CPU_FLAGS" in os.environ:
        return os.environ["MEMFAST_CPU_FLAGS"].split()
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = set(re.findall(r"\b(avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512dq|avx512_bf16)\b", info))
    out = ["-mavx2", "-mfma", "-mf16c"] if flags >= {"avx2", "fma", "f16c"} else []
    # AVX-512 turns on the hand-vectorised loops in csrc/cpu/ (the build runs where it is installed).
    if out and flags >= {"avx512f", "avx512bw", "avx512vl", "avx512dq"}:
        out += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        if "avx512_bf16" in flags:
            out.append("-mavx512bf16")
    return out


def extensions():
    import torch

    cuda_home = want_cuda(torch)
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    # Imported after CUDA_HOME is settled: cpp_extension reads it at import.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    version = read_version()
    sources = ["csrc/memfast.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    defines = [f'-DMEMFAST_VERSION="{version}"']
    # -fno-trapping-math lets the compiler turn the selects in fast_exp into
    # vector blends (results are unchanged: nothing here traps on FP exceptions).
    cxx = ["-O3", "-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno"] + host_cpu_flags()
    # at::parallel_for is inlined into our code as `#pragma omp parallel`: without
    # -fopenmp it silently runs on one thread. (The libgomp that torch loads serves it.)
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if cuda_home:
        archs = cuda_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        defines += ["-DMEMFAST_WITH_CUDA", f'-DMEMFAST_CUDA_ARCH_LIST="{archs}"']
        return [
            CUDAExtension(
                "memfast._C",
                sources,
                extra_compile_args={
                    "cxx": cxx + defines,
                    "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
                },
                extra_link_args=link,
            )
        ]
    return [CppExtension("memfast._C", sources, extra_compile_args={"cxx": cxx + defines}, extra_link_args=link)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    version=read_version(),
    packages=find_packages(include=["memfast", "memfast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
