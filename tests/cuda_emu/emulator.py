"""Build csrc/cuda/*.cu for the CPU emulator (runtime.h) and load it as torch.ops.memfast_emu.

The sources are compiled as they are, after four mechanical rewrites a C++ compiler needs:
  kernel<<<grid, block, smem, stream>>>(args)  ->  ::memfast_emu_rt::launch("kernel", {grid, block, ...}, kernel, args)
  __shared__ T a[N], b[M];                      ->  per-block references (static shared memory of each block)
  __launch_bounds__(n, ...) kernel(...) {       ->  the same kernel checking its block size first
  __CUDA_ARCH__                                 ->  MEMFAST_EMU_ARCH (900: the sm_90 paths, clusters included)
and with the c10/cuda includes dropped (runtime.h stands in for them). The schemas are copied
from csrc/memfast.cpp's TORCH_LIBRARY block into a memfast_emu library whose CPU kernels are
the CUDA host code and kernels; `-Dmemfast=memfast_emu` keeps their symbols apart from the
real extension's.

    python tests/cuda_emu/emulator.py     # builds (or reuses) build/cuda_emu and prints the ops
"""
from __future__ import annotations

import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
OUT = ROOT / "build" / "cuda_emu"


def _match_forward(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes text[i] (== open_)."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"unbalanced {open_!r} at offset {i}")


def _match_backward(text: str, j: int, open_: str, close: str) -> int:
    """Index of the bracket that opens the one at text[j] (== close)."""
    depth = 0
    for i in range(j, -1, -1):
        if text[i] == close:
            depth += 1
        elif text[i] == open_:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {close!r} at offset {j}")


def rewrite_launches(text: str) -> str:
    out = []
    pos = 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        end = text.index(">>>", start)
        config = text[start + 3:end]
        # The callee: an identifier with template arguments, or a parenthesised expression.
        k = start - 1
        while text[k].isspace():
            k -= 1
        if text[k] == ")":
            callee_start = _match_backward(text, k, "(", ")")
        else:
            if text[k] == ">":
                k = _match_backward(text, k, "<", ">") - 1
            while k >= 0 and (text[k].isalnum() or text[k] in "_:"):
                k -= 1
            callee_start = k + 1
        callee = text[callee_start:start].strip()
        a = end + 3
        while text[a].isspace():
            a += 1
        assert text[a] == "(", f"a launch without arguments near offset {start}"
        args_end = _match_forward(text, a, "(", ")")
        args = text[a + 1:args_end - 1].strip()
        name = " ".join(callee.split()).replace('"', "'")
        out.append(text[pos:callee_start])
        out.append(f'::memfast_emu_rt::launch("{name}", ::memfast_emu_rt::LaunchConfig({config}), {callee}'
                   + (f", {args})" if args else ")"))
        pos = args_end


_SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w:]*(?:<[^;]*?>)?)\s+([^;]+);")


def rewrite_shared(text: str) -> str:
    counter = [0]

    def one(m: re.Match) -> str:
        type_, decls = m.group(1), m.group(2)
        parts = []
        for decl in re.split(r",(?![^\[]*\])", decls):
            dm = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*((?:\[[^\]]+\]\s*)*)", decl)
            assert dm, f"cannot read the shared declaration {decl!r}"
            counter[0] += 1
            key = f"memfast_emu_shared_key_{counter[0]}"
            parts.append(f"static char {key}; auto& {dm.group(1)} = "
                         f"::memfast_emu_rt::shared<{type_}{dm.group(2).strip()}>(&{key});")
        return " ".join(parts)

    return _SHARED.sub(one, text)


def rewrite_launch_bounds(text: str) -> str:
    out = []
    pos = 0
    while True:
        i = text.find("__launch_bounds__(", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out)
        p = i + len("__launch_bounds__")
        p_end = _match_forward(text, p, "(", ")")
        bounds = text[p + 1:p_end - 1]
        params = text.index("(", p_end)  # the kernel's parameter list
        body = _match_forward(text, params, "(", ")")
        while text[body].isspace():
            body += 1
        assert text[body] == "{", f"no kernel body after __launch_bounds__ near offset {i}"
        out.append(text[pos:body + 1])
        out.append(f" ::memfast_emu_rt::check_launch_bounds({bounds});")
        pos = body + 1


def rewrite_cuda(text: str) -> str:
    text = re.sub(r"^#include <c10/cuda/[^>]+>\s*$", "// (c10/cuda: tests/cuda_emu/runtime.h)", text, flags=re.M)
    text = text.replace("__CUDA_ARCH__", "MEMFAST_EMU_ARCH")
    return rewrite_launches(rewrite_launch_bounds(rewrite_shared(text)))


def schemas_source() -> str:
    text = (ROOT / "csrc" / "memfast.cpp").read_text()
    start = text.index("TORCH_LIBRARY(memfast, m)")
    end = _match_forward(text, text.index("{", start), "{", "}")
    block = text[start:end].replace("TORCH_LIBRARY(memfast, m)", "TORCH_LIBRARY(memfast_emu, m)", 1)
    return '#include <torch/library.h>\n#include "../common/ce_math.h"\n\n' + block + "\n"


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate() -> list[pathlib.Path]:
    src = OUT / "src"
    for header in sorted((ROOT / "csrc" / "common").iterdir()):
        text = header.read_text()
        _write_if_changed(src / "common" / header.name, rewrite_cuda(text) if header.suffix == ".cuh" else text)
    sources = [HERE / "runtime.cpp"]
    schemas = src / "cuda" / "schemas.cpp"
    _write_if_changed(schemas, schemas_source())
    sources.append(schemas)
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [HERE / "selftest.cu"]:
        target = src / "cuda" / (cu.stem + ".cpp")
        _write_if_changed(target, rewrite_cuda(cu.read_text()))
        sources.append(target)
    return sources


def load(verbose: bool = False) -> None:
    """Build (ninja: only what changed) and load the emulated CUDA ops into this process."""
    import torch
    from torch.utils import cpp_extension

    if hasattr(torch.ops, "memfast_emu") and hasattr(torch.ops.memfast_emu, "track_"):
        return
    import memfast  # noqa: F401  (the real ops, for the comparisons)
    sources = generate()
    build_dir = OUT / f"torch-{torch.__version__}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="memfast_cuda_emu",
        sources=[str(s) for s in sources],
        extra_cflags=["-O1", "-include", str(HERE / "runtime.h"), "-Dmemfast=memfast_emu", "-ffp-contract=off",
                      "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wno-unused-variable"],
        extra_include_paths=[str(HERE / "include"), str(HERE)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )


# The ops whose CUDA kernels csrc/cuda registers (track_unless_backward_ calls track_).
ROUTED_OPS = ("cross_entropy_fwd", "cross_entropy_fwd_", "cross_entropy_prob_fwd", "cross_entropy_prob_fwd_",
              "cross_entropy_bwd", "cross_entropy_bwd_", "track_", "curvature_perturb", "curvature_reduce")


def route_cpu_kernels():
    """Make torch.ops.memfast's CPU kernels the emulated CUDA ones, until the returned library is
    destroyed (library._destroy() brings the CPU kernels back): the CUDA test files then run
    their checks, on CPU tensors, against the CUDA sources (MEMFAST_TEST_CUDA_DEVICE=emulator)."""
    import warnings

    import torch

    load()
    library = torch.library.Library("memfast", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name in ROUTED_OPS:
            emulated = getattr(torch.ops.memfast_emu, name).default
            library.impl(name, (lambda op: lambda *args: op(*args))(emulated), "CPU")
    return library


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    load(verbose="-v" in sys.argv)
    import torch
    print(sorted(n for n in dir(torch.ops.memfast_emu) if not n.startswith("_")))
