"""`kernel: machete`: GPTQModel's Machete, vLLM's mixed-input GEMM for Hopper (CUTLASS, TMA and
wgmma), built by llmopt for what it runs: bf16 activations on symmetric 4-bit codes (`u4b8`).

Why: on an H100 Marlin (mma.sync, Ampere's instructions) runs a 7B's products at 32-64 rows no
faster than cuBLAS runs bf16 (a 4096 x 4096 product at 32 rows: 19.9 us against bf16's 9.2 on an
H200, `benchmarks/results/marlin_probe_h200.json`), so a server's steps at 64 streams cost int4 as
much as bf16 (README, "Serving under load"). Machete is the kernel vLLM serves W4A16 with on Hopper.

The build. GPTQModel compiles Machete on first use, but only against CUTLASS 4.7.1 fetched from
GitHub at run time (offline: refused), and for 8 type pairs (fp16 and bf16, 4- and 8-bit, with and
without zero points: about 80 CUTLASS kernels). llmopt builds it itself:
- CUTLASS's headers come from the `nvidia-cutlass` wheel (`pip install 'llmopt[hopper]'`, a
  package registry, no GitHub), laid out as a CUTLASS checkout under the cache;
- GPTQModel's own generator writes the sources, limited to bf16 x u4b8 (about 10 kernels, one per
  tile shape its heuristic picks from);
- nvcc compiles them for sm_90a against the installed torch (or another torch's headers and
  libraries, `build_library(torch_dir=...)`, to build on one machine for another), a file per job;
- the library is cached under `<cache root>/torch-extensions/machete/`, rebuilt when its key (the
  sources, the flags, torch, CUTLASS and GPTQModel) changes, and loaded through GPTQModel's own loader
  (`GPTQMODEL_MACHETE_PRECOMPILED_LIBRARY`), so GPTQModel's layer and its weight prepacking run on it.
`LLMOPT_MACHETE_LIBRARY` names a library built elsewhere (skipping the build).

    python -m llmopt.kernels.machete build OUT_DIR [--torch-dir DIR] [--include DIR ...] [--jobs N]

builds one ahead (how the GPU machine here gets it: compiled on the 2-core CPU machine against that
machine's torch 2.11 headers, as the GPU machine's call time is scarcer).

Imports no torch at module level.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LIBRARY_ENV = "LLMOPT_MACHETE_LIBRARY"
GPTQMODEL_LIBRARY_ENV = "GPTQMODEL_MACHETE_PRECOMPILED_LIBRARY"
LIBRARY_NAME = "llmopt_machete.so"
ACTIVATIONS = "bf16"
CODES = "u4b8"  # symmetric 4-bit: code c stands for c - 8
ARCH = ("-gencode=arch=compute_90a,code=sm_90a",)
# GPTQModel's Machete build flags (gptqmodel.utils.machete): torch's half and bf16 operators on,
# ptxas at O3 with L1 caching of global loads, and CUTLASS's noisy diagnostics off
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-Xptxas", "-O3,-dlcm=ca",
              "-diag-suppress=179,39,177", "-DNDEBUG", "-D_GLIBCXX_USE_CXX11_ABI=1", "-Xcompiler", "-fPIC")
CUDA_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")  # torch's ATen/cuda includes them


def cutlass_package() -> Path:
    """The `cutlass_library` package of the `nvidia-cutlass` wheel; CUTLASS's sources are in its `source/`."""
    try:
        import cutlass_library
    except ImportError as e:
        raise RuntimeError("kernel machete needs CUTLASS's headers: pip install 'llmopt[hopper]' "
                           "(the nvidia-cutlass wheel)") from e
    package = Path(cutlass_library.__file__).parent
    if not (package / "source" / "include" / "cutlass" / "cutlass.h").is_file():
        raise RuntimeError(f"the installed nvidia-cutlass has no headers under {package / 'source'}")
    return package


def cutlass_version(root: Path) -> str:
    text = (root / "include" / "cutlass" / "version.h").read_text()
    parts = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "#define" and words[1] in ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"):
            parts[words[1]] = words[2]
    return ".".join(parts.get(k, "?") for k in ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"))


def cutlass_checkout(folder: Path) -> Path:
    """A CUTLASS checkout's layout (include/, tools/, examples/, python/cutlass_library) under `folder`,
    linked to the wheel's files: what GPTQModel's generator and Machete's includes expect."""
    package = cutlass_package()
    source = package / "source"
    root = folder / f"cutlass-{cutlass_version(source)}"
    (root / "python").mkdir(parents=True, exist_ok=True)
    links = {root / name: source / name for name in ("include", "tools", "examples")}
    links[root / "python" / "cutlass_library"] = package
    for link, target in links.items():
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return root


def machete_source_dir() -> Path:
    import gptqmodel_ext

    return Path(gptqmodel_ext.__file__).parent


def generate(out: Path, cutlass_root: Path) -> list[Path]:
    """Machete's sources for bf16 x u4b8, written by GPTQModel's generator (run in a child process:
    it puts CUTLASS's Python on sys.path)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.cu"):
        old.unlink()
    env = dict(os.environ, GPTQMODEL_CUTLASS_DIR=str(cutlass_root))
    done = subprocess.run([sys.executable, "-m", "llmopt.kernels.machete", "generate", str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"Machete's generator failed: {(done.stderr or done.stdout).strip()[-600:]}")
    sources = sorted(out.glob("*.cu"))
    if not sources:
        raise RuntimeError(f"Machete's generator wrote no sources into {out}")
    return sources


def _generate_here(out: str) -> None:
    """The child process of `generate`: GPTQModel's `generate.py`, its sources limited to the one type pair."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("machete_generate", machete_source_dir() / "machete" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    everything = module.create_sources

    def ours(impl_configs, **kwargs):
        kept = [c for c in impl_configs if c.types.a == module.DataType.bf16 and c.types.b == module.VLLMDataType.u4b8
                and c.types.b_group_zeropoint == module.DataType.void]
        if not kept:
            raise RuntimeError("GPTQModel's Machete generator lists no bf16 x u4b8 kernel")
        return everything(kept, **kwargs)

    module.create_sources = ours
    module.generate(out)


def cxx_standard(torch_dir: Path) -> str:
    """The C++ standard the torch at `torch_dir` builds its extensions with (c++17 up to 2.11, c++20 later)."""
    text = (torch_dir / "utils" / "cpp_extension.py").read_text()
    return "-std=c++20" if "common_cflags += ['-std=c++20'" in text else "-std=c++17"


def cuda_home() -> Path:
    found = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if found:
        return Path(found)
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    raise RuntimeError("kernel machete is compiled on first use and needs nvcc (CUDA 12.3+): none on PATH or CUDA_HOME")


def _wheel_header_dirs() -> list[Path]:
    """`nvidia/<lib>/include` (and `nvidia/cu13/include`) of the nvidia-* wheels torch installs."""
    try:
        import nvidia
    except ImportError:
        return []
    return [p for base in nvidia.__path__ for p in sorted(Path(base).glob("*/include")) if p.is_dir()]


def header_dirs(extra: list[Path]) -> list[Path]:
    """Where the CUDA library headers torch's ATen/cuda includes are: CUDA_HOME/include, `extra`, and
    the nvidia-* wheels torch installs; an error naming the ones none of them has."""
    dirs = [cuda_home() / "include", *extra, *_wheel_header_dirs()]
    missing = [h for h in CUDA_HEADERS if not any((d / h).is_file() for d in dirs)]
    if missing:
        raise RuntimeError(f"kernel machete's build needs the CUDA headers {', '.join(missing)} (cuSPARSE, cuBLAS, "
                           "cuSOLVER: CUDA_HOME/include or torch's nvidia-* wheels); none found")
    return dirs


def build_library(out: Path, torch_dir: Path | None = None, include: list[Path] = (), jobs: int | None = None,
                  log=print) -> Path:
    """Generate and compile Machete into `out`/LIBRARY_NAME; returns its path. Rebuilt only when the
    key (sources, flags, torch, CUTLASS, GPTQModel) changed."""
    if torch_dir is None:
        import torch

        torch_dir = Path(torch.__file__).parent
    torch_dir = Path(torch_dir)
    out.mkdir(parents=True, exist_ok=True)
    cutlass_root = cutlass_checkout(out)
    sources = [machete_source_dir() / "machete" / "machete_pytorch.cu",
               *generate(out / "generated", cutlass_root)]
    ext = machete_source_dir()
    includes = [ext / "machete", ext, ext / "cutlass_extensions", cutlass_root / "include",
                cutlass_root / "tools" / "library" / "include", cutlass_root / "tools" / "util" / "include",
                cutlass_root / "examples" / "common" / "include", torch_dir / "include",
                torch_dir / "include" / "torch" / "csrc" / "api" / "include", *header_dirs(list(include))]
    import sysconfig

    includes.append(Path(sysconfig.get_paths()["include"]))  # Python.h (registration.h); no Python API is used
    flags = [cxx_standard(torch_dir), *ARCH, *NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=llmopt_machete"]
    nvcc = str(cuda_home() / "bin" / "nvcc")
    key = hashlib.sha256()
    from importlib.metadata import version

    # GPTQModel's version stands for the headers the sources include (machete_mm_kernel.cuh, ...)
    for part in [nvcc, *flags, str(torch_dir), (torch_dir / "version.py").read_text(), cutlass_version(cutlass_root),
                 version("gptqmodel")]:
        key.update(part.encode())
    for source in sources:
        key.update(source.read_bytes())
    library = out / LIBRARY_NAME
    stamp = out / "key"
    if library.is_file() and stamp.is_file() and stamp.read_text() == key.hexdigest():
        return library
    objects = out / "objects"
    objects.mkdir(exist_ok=True)
    started = time.perf_counter()

    def compile_one(source: Path) -> Path:
        obj = objects / (source.stem + ".o")
        command = [nvcc, "-c", str(source), "-o", str(obj), *flags, *(f"-I{d}" for d in includes)]
        done = subprocess.run(command, capture_output=True, text=True)
        (objects / (source.stem + ".log")).write_text(" ".join(command) + "\n" + done.stdout + done.stderr)
        if done.returncode:
            raise RuntimeError(f"nvcc failed on {source.name}: {done.stderr.strip()[-800:]} (log: {objects / source.stem}.log)")
        log(f"machete: compiled {source.name} ({time.perf_counter() - started:.0f} s)")
        return obj

    jobs = jobs or max(1, min(len(sources), (os.cpu_count() or 2)))
    log(f"machete: compiling {len(sources)} sources for sm_90a, {jobs} at a time (minutes on few cores)")
    with ThreadPoolExecutor(jobs) as pool:
        built = list(pool.map(compile_one, sources))
    lib_dir = torch_dir / "lib"
    link = [nvcc, "-shared", *ARCH, "-o", str(library), *map(str, built), f"-L{lib_dir}", "-lc10", "-lc10_cuda",
            "-ltorch", "-ltorch_cpu", "-ltorch_cuda", f"-L{cuda_home() / 'lib64'}", "-lcudart",
            f"-Xlinker=-rpath,{lib_dir}"]
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"linking Machete failed: {done.stderr.strip()[-800:]}")
    stamp.write_text(key.hexdigest())
    log(f"machete: built {library} in {time.perf_counter() - started:.0f} s")
    return library


def build_machete(cache_root) -> float:
    """Load Machete for GPTQModel's layer: the library `LLMOPT_MACHETE_LIBRARY` names, else llmopt's
    build under `<cache root>/torch-extensions/machete` (built on first use); seconds spent. A failed
    build or load raises KernelBuildError (exit 1) with the compiler's or loader's message."""
    import logging

    from llmopt.kernels import BUILD_DIR, KernelBuildError

    log = logging.getLogger("llmopt")
    started = time.perf_counter()
    try:
        named = os.environ.get(LIBRARY_ENV)
        if named:
            library = Path(named)
            if not library.is_file():
                raise RuntimeError(f"{LIBRARY_ENV}={named} is not a file")
        else:
            from llmopt.kernels.builds import FLOCK, _exclusive

            folder = Path(cache_root) / BUILD_DIR / "machete"
            folder.mkdir(parents=True, exist_ok=True)
            with _exclusive(folder / FLOCK, "kernel machete"):  # one build at a time; the next finds it built
                library = build_library(folder, log=log.info)
        os.environ[GPTQMODEL_LIBRARY_ENV] = str(library.resolve())
        from llmopt.methods.gptq import quiet_gptqmodel

        quiet_gptqmodel()
        from gptqmodel.utils.machete import machete_extension_error, prewarm_machete_extension

        if not prewarm_machete_extension():
            raise RuntimeError(machete_extension_error())
    except Exception as e:
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        raise KernelBuildError(f"kernel machete failed to build or load ({detail[:600]})") from e
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    if argv[:1] == ["generate"]:
        _generate_here(argv[1])
        return 0
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmopt.kernels.machete")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--torch-dir", type=Path, default=None, help="the torch package to build against")
    parser.add_argument("--include", type=Path, action="append", default=[], help="more header folders")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    print(build_library(args.out, args.torch_dir, args.include, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
