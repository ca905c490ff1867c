"""`kernel: machete` (llmopt.kernels.machete): what llmopt generates and how it compiles it. No GPU
here: the generator runs for real (GPTQModel's, on the nvidia-cutlass wheel's CUTLASS), the compiler
is a stand-in that records its command lines (these tests check llmopt's commands, never that the
library works: that is the GPU test's and `benchmarks/machete_probe.py`'s)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import torch
from llmopt import kernels
from llmopt.kernels import linear, machete
from llmopt.kernels.linear import MacheteLinear, MacheteMarlinLinear, QuantizedWeight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_generator_writes_machete_for_bf16_on_symmetric_4bit_codes_only(tmp_path):
    root = machete.cutlass_checkout(tmp_path)
    assert (root / "include" / "cutlass" / "cutlass.h").is_file() and (root / "python" / "cutlass_library").is_dir()
    sources = machete.generate(tmp_path / "gen", root)
    names = {p.name for p in sources}
    assert "machete_mm_dispatch.cu" in names and "machete_prepack.cu" in names
    text = "\n".join(p.read_text() for p in sources)
    kernels_written = set(re.findall(r"impl_(\w+?)_sch_(\w+?)\(", text))
    types = {t for t, _ in kernels_written}
    assert types == {"bf16u4b8bf16voidvoidvoidbf16f32"}, types
    shapes = {s.split("_")[0] for _, s in kernels_written}
    # every tile shape the heuristic picks from, decode (128x16) to prefill (128x256)
    assert {"128x16", "128x32", "128x64", "128x128", "128x256", "256x128"} <= shapes, shapes
    assert "f16u4b8" not in text.replace("bf16u4b8", "") and "u8b128" not in text.split("prepack")[0]


def _stand_in_toolkit(tmp_path: Path, fail_on: str | None = None) -> tuple[Path, Path]:
    """A CUDA_HOME whose nvcc records each command line and writes its -o file (or fails on the
    source named `fail_on`), with the library headers torch's ATen/cuda includes; and a torch folder
    of 2.11's kind (c++17)."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    for header in machete.CUDA_HEADERS:
        (home / "include" / header).write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path / "calls"}
for a in "$@"; do case "$a" in *{fail_on or "NEVER"}*) echo "error: no" >&2; exit 1;; esac; done
while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then echo built > "$2"; fi; shift; done
""")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    torch_dir = tmp_path / "torch"
    (torch_dir / "utils").mkdir(parents=True)
    (torch_dir / "lib").mkdir()
    (torch_dir / "include").mkdir()
    (torch_dir / "utils" / "cpp_extension.py").write_text("    common_cflags += ['-std=c++17', '-fPIC']\n")
    (torch_dir / "version.py").write_text("__version__ = '2.11.0+cu130'\n")
    return home, torch_dir


def test_each_source_compiles_for_sm90a_against_the_named_torch_and_links_once(tmp_path, monkeypatch):
    """Stand-in compiler: llmopt's command lines and its cache, not a working library."""
    home, torch_dir = _stand_in_toolkit(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(home))
    library = machete.build_library(tmp_path / "out", torch_dir, jobs=2, log=lambda _: None)
    calls = (tmp_path / "calls").read_text().splitlines()
    compiles, links = [c for c in calls if " -c " in f" {c} "], [c for c in calls if "-shared" in c]
    sources = sorted((tmp_path / "out" / "generated").glob("*.cu"))
    assert len(compiles) == len(sources) + 1 and len(links) == 1  # + machete_pytorch.cu, GPTQModel's op registration
    for call in compiles:
        assert "-gencode=arch=compute_90a,code=sm_90a" in call and "-std=c++17" in call
        assert f"-I{torch_dir / 'include'}" in call and f"-I{home / 'include'}" in call
    assert "machete_pytorch.cu" in " ".join(compiles)
    assert f"-L{torch_dir / 'lib'}" in links[0] and "-ltorch_cuda" in links[0] and str(library) in links[0]
    assert library.read_text() == "built\n"
    # the same key: nothing compiled again; another torch: everything
    machete.build_library(tmp_path / "out", torch_dir, jobs=2, log=lambda _: None)
    assert len((tmp_path / "calls").read_text().splitlines()) == len(calls)
    (torch_dir / "version.py").write_text("__version__ = '2.12.0+cu130'\n")
    machete.build_library(tmp_path / "out", torch_dir, jobs=2, log=lambda _: None)
    assert len((tmp_path / "calls").read_text().splitlines()) == 2 * len(calls)


def test_a_failed_compile_is_one_line_naming_the_kernel_and_the_source_log(tmp_path, monkeypatch):
    home, _ = _stand_in_toolkit(tmp_path, fail_on="machete_prepack.cu")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.delenv(machete.LIBRARY_ENV, raising=False)
    with pytest.raises(kernels.KernelBuildError) as failed:
        machete.build_machete(tmp_path / "cache")
    message = str(failed.value)
    assert message.startswith("kernel machete failed to build or load") and "\n" not in message
    assert "nvcc failed on machete_prepack.cu" in message and "machete_prepack.log" in message
    assert not list((tmp_path / "cache").rglob(machete.LIBRARY_NAME)), "no library left from a failed build"


def test_a_named_library_that_is_missing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(machete.LIBRARY_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(kernels.KernelBuildError, match=r"LLMOPT_MACHETE_LIBRARY=.*nope.so is not a file"):
        machete.build_machete(tmp_path)


def test_the_header_search_names_what_it_misses(tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(machete, "_wheel_header_dirs", lambda: [])
    with pytest.raises(RuntimeError, match="needs the CUDA headers cusparse.h, cublas_v2.h, cublasLt.h, cusolverDn.h"):
        machete.header_dirs([])
    assert machete.header_dirs([_headers(tmp_path / "extra")])[-1] == tmp_path / "extra"


def _headers(folder: Path) -> Path:
    folder.mkdir()
    for header in machete.CUDA_HEADERS:
        (folder / header).write_text("")
    return folder


@pytest.mark.parametrize("bits, group, act_order, shape, words", [
    (8, 128, False, (256, 256), "machete runs symmetric 4-bit weights"),
    (4, 32, False, (256, 256), "machete takes groups of 64 or 128 or one per row, not 32"),
    (4, 128, True, (256, 256), "machete runs weights without act-order"),
    (4, 64, False, (192, 256), "machete needs inputs in multiples of 64 and outputs of 128, not a 192x256 layer"),
])
def test_machete_refuses_what_it_cannot_run_before_touching_gptqmodel(bits, group, act_order, shape, words):
    """A ValueError: `auto`'s signal to take the next kernel, and the named kernel's message."""
    n, k = shape
    g_idx = torch.randperm(k) // group if act_order else None
    weight = QuantizedWeight(codes=torch.zeros(n, k, dtype=torch.uint8), scales=torch.ones(k // group, n),
                             bits=bits, group_size=group, g_idx=g_idx)
    with pytest.raises(ValueError, match=re.escape(words)):
        MacheteLinear(weight, "cpu", torch.bfloat16)


def test_gptq_grids_list_machete_where_it_runs():
    from llmopt.methods.gptq import gptq_kernels

    assert gptq_kernels({"bits": 4, "group_size": 128}, "cuda") == ("marlin", "machete", "machete+marlin", "int4pack")
    assert "machete" not in gptq_kernels({"bits": 8, "group_size": 128}, "cuda")
    assert "machete" not in gptq_kernels({"bits": 4, "group_size": 32}, "cuda")
    assert "machete" not in gptq_kernels({"bits": 4, "group_size": 128, "desc_act": True}, "cuda")
    assert "machete" not in gptq_kernels({"bits": 4, "group_size": 128, "sym": False}, "cuda")
    assert "machete" not in gptq_kernels({"bits": 4, "group_size": 128}, "cpu")
    assert kernels.usable(("marlin", "machete", "machete+marlin"), "cuda", 90) == ("marlin", "machete", "machete+marlin")
    # auto never builds or tries them, not even where Marlin refuses a model's shapes: int4pack comes next
    assert kernels.auto_order(("marlin", "machete", "machete+marlin", "int4pack")) == ("marlin", "int4pack")
    assert kernels.usable(("marlin", "machete", "machete+marlin"), "cuda", 100) == ("marlin",)
    assert kernels.usable(("marlin", "machete", "machete+marlin"), "cuda", 89) == ("marlin",)


def test_modelopt_int4_awq_lists_machete_for_its_groups_on_cuda():
    from llmopt.methods.modelopt import Modelopt

    assert Modelopt.kernel_candidates({"format": "int4_awq", "group_size": 128}, "cuda") == (
        "marlin", "machete", "machete+marlin", "int4pack")
    assert Modelopt.kernel_candidates({"format": "int4_awq", "group_size": 32}, "cuda") == ("marlin", "int4pack")
    assert Modelopt.kernel_candidates({"format": "int4_awq", "group_size": 128}, "cpu") == ("int4pack",)


def test_machete_marlin_builds_both_kernels(monkeypatch):
    built = []
    monkeypatch.setattr(machete, "build_machete", lambda root: built.append("machete") or 2.0)
    monkeypatch.setattr(linear, "build_marlin", lambda root: built.append("marlin") or 3.0)
    assert kernels.prepare("machete+marlin", "cache") == 5.0 and built == ["machete", "marlin"]
    built.clear()
    assert kernels.prepare("machete", "cache") == 2.0 and built == ["machete"]


class _StandIn(torch.nn.Module):
    """A kernel layer on CPU (GPTQModel's need CUDA): the grid's dense product, each call recorded."""

    def __init__(self, name: str, dense: torch.Tensor, calls: list):
        super().__init__()
        self.name, self.calls = name, calls
        self.register_buffer("packed", dense.clone())  # its own layout, as each real layer holds one

    def forward(self, x):
        self.calls.append((self.name, x.shape[0]))
        return torch.nn.functional.linear(x, self.packed.to(x.dtype))


def test_machete_marlin_runs_each_product_on_the_kernel_measured_faster_for_its_rows(monkeypatch):
    """Below MACHETE_FROM_ROWS rows Marlin's layer, from it Machete's: in eager code and in a compiled
    graph (where the product is the opaque `llmopt::kernel_mm`), with the grid's product either way.
    Stand-in layers (no GPU here): this tests llmopt's dispatch and bookkeeping, not the kernels."""
    gen = torch.Generator().manual_seed(0)
    n, k = 256, 128
    weight = QuantizedWeight(codes=torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                             scales=torch.rand(1, n, generator=gen) * 0.01 + 0.001, bits=4, group_size=128,
                             bias=torch.randn(n, generator=gen))
    dense = weight.dequantize().to(torch.bfloat16)
    calls: list = []
    monkeypatch.setattr(linear, "marlin_layer", lambda w, device: (_StandIn("marlin", dense, calls), None))
    machete_layer = _StandIn("machete", dense, calls)
    machete_layer.weight_type = type("T", (), {"id": 7})
    monkeypatch.setattr(linear, "machete_layer", lambda w, device: machete_layer)
    monkeypatch.setattr(MacheteLinear, "product", lambda self, x: self.machete(x))
    module = linear.kernel_module("machete+marlin", weight, "cpu", torch.bfloat16)
    assert isinstance(module, MacheteMarlinLinear) and module.kernel == "machete+marlin"
    assert module.type_id == 7 and module.group == 128
    # both layouts are the module's buffers: the benchmark's weight bytes count them
    assert sum(b.numel() for b in module.buffers()) >= 2 * n * k
    assert linear.MACHETE_FROM_ROWS == 32
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    for rows, expected in [(1, "marlin"), (16, "marlin"), (31, "marlin"), (32, "machete"), (64, "machete"),
                           (512, "machete")]:
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        reference = torch.nn.functional.linear(x.float(), dense.float(), weight.bias.float())
        for run in (module, compiled):
            calls.clear()
            got = run(x)
            assert calls == [(expected, rows)], (rows, calls)
            assert linear.relative_error(got.float(), reference) < 0.02
    assert linear.kernels_in(torch.nn.Sequential(module)) == {"machete+marlin": 1}
    # the repack check at build time reads both layouts: a Machete layout misread fails it, though Marlin's is right
    assert linear.check_module(module, weight, torch.bfloat16, "cpu") < 0.02
    machete_layer.packed.mul_(-1)
    assert linear.check_module(module, weight, torch.bfloat16, "cpu") > 0.5


@pytest.mark.parametrize("bits, group, words", [
    (8, 128, "machete runs symmetric 4-bit weights"),  # Marlin would take it: the stricter refusal speaks first
    (4, 32, "machete takes groups of 64 or 128"),
])
def test_machete_marlin_refuses_what_machete_cannot_run(bits, group, words):
    n, k = 256, 256
    weight = QuantizedWeight(codes=torch.zeros(n, k, dtype=torch.uint8), scales=torch.ones(k // group, n), bits=bits,
                             group_size=group)
    with pytest.raises(ValueError, match=re.escape(words)):
        MacheteMarlinLinear(weight, "cpu", torch.bfloat16)
