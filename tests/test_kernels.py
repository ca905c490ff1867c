"""Fast decode kernels on CPU (llmopt.kernels): each quantized format's kernel against the format's
own library on the shipped tiny Llama (float32), their choice and refusals, and the bad input.

Tolerances: the integer kernels compute in bf16 (torch's CPU int4/int8 kernels are vectorised for
bf16 only: their float32 path measured 15-30x slower), so logits differ from the float32 library by
the activations' rounding: within 5% of the largest logit (measured 0.9-2.3%); greedy decoding
agrees on 16 tokens and perplexity within 0.5%. The ModelOpt formats run their exported weights,
which the export rounds in bfloat16 before quantizing while the fake quantization does not:
perplexity within 0.5% (measured 0.01% for INT4-AWQ, 0.02% for FP8). The CUDA twins are
tests/test_gpu_kernels.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import DATA, run_cli
from llmopt import kernels
from llmopt.cache import Artifact
from llmopt.data import load_texts, token_stream
from llmopt.eval.perplexity import perplexity
from llmopt.kernels.linear import FusedSlice, QuantizedWeight, concatenate, pack_gptq, relative_error, swap, unpack_gptq
from llmopt.methods.gptq import GptqQuantize, read_gptq
from llmopt.methods.gptq_rtn import GptqRtnQuantize
from llmopt.methods.modelopt import ModeloptQuantize
from llmopt.methods.rtn import RtnQuantize
from llmopt.models import load_model, load_tokenizer
from llmopt.recipe import DatasetSpec
from llmopt.stages import StageContext, quantize

CPU = StageContext("cpu", "float32", False, progress=False)
CALIBRATION = {"dataset": {"path": str(DATA / "calibration.jsonl")}, "num_samples": 16, "seq_len": 64}
LAYERS = 8 * 7
CASES = {
    "gptq-int4-g32": (GptqQuantize(stage="quantize", method="gptq", bits=4, group_size=32, calibration=CALIBRATION),
                      "int4pack", 5e-2),
    "gptq-int4-asym-actorder": (GptqQuantize(stage="quantize", method="gptq", bits=4, group_size=32, sym=False,
                                             desc_act=True, calibration=CALIBRATION), "int4pack", 5e-2),
    "int8-per-channel": (GptqRtnQuantize(stage="quantize", method="gptq_rtn"), "int8pack", 5e-2),
    "rtn-int4": (RtnQuantize(stage="quantize", method="rtn", bits=4, group_size=32), "int4pack", 5e-2),
    "rtn-int4-asym": (RtnQuantize(stage="quantize", method="rtn", bits=4, group_size=32, sym=False), "int4pack", 5e-2),
}


@pytest.fixture(scope="module")
def ids(tiny_model) -> list[int]:
    return token_stream(load_tokenizer(tiny_model), load_texts(DatasetSpec(path=DATA / "validation.jsonl"), limit=100))


def _quantized(cfg, tiny_model: Path, out: Path) -> Artifact:
    out.mkdir(exist_ok=True)
    return quantize.run(cfg, Artifact(tiny_model, "hf-checkpoint"), out, CPU)


def _ppl(model, ids) -> float:
    return perplexity(model, ids, 128, 128, 8, False)["ppl"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_kernel_matches_the_format_library(case, tiny_model, ids, tmp_path):
    """Each format's CPU kernel, named (`auto` runs the tiny model's small products dequantized:
    test_auto_on_cpu_runs_small_products_dequantized), on every layer."""
    cfg, kernel, tolerance = CASES[case]
    artifact = _quantized(cfg, tiny_model, tmp_path / "q")
    _, auto = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", "auto", tmp_path)
    assert (auto.kernel, auto.dequantized) == ("dequantized", LAYERS) and f"beats {kernel}'s call" in auto.tag(), auto
    reference = load_model(artifact, "cpu", "float32")
    fast, applied = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", kernel, tmp_path)
    assert (applied.kernel, applied.layers, applied.dequantized) == (kernel, LAYERS, 0), applied
    assert type(fast.model.layers[0].mlp.down_proj).kernel == kernel
    prompt = torch.tensor([ids[:32]])
    with torch.no_grad():
        expected, got = reference(prompt).logits, fast(prompt).logits
        greedy = [m.generate(prompt, max_new_tokens=16, do_sample=False)[0, 32:].tolist() for m in (reference, fast)]
    assert ((got - expected).abs().max() / expected.abs().max()).item() < tolerance
    assert greedy[0] == greedy[1], "greedy decoding agrees on the first 16 tokens"
    assert _ppl(fast, ids) == pytest.approx(_ppl(reference, ids), rel=5e-3)


@pytest.mark.parametrize("fmt, kernel", [("int4_awq", "int4pack"), ("fp8", "fp8")])
def test_modelopt_formats_run_their_exported_weights(fmt, kernel, tiny_model, ids, tmp_path):
    """Real int4 / FP8 weights from the export, not the fake quantization: same quality. FP8's
    kernel (`_scaled_mm`) is chosen on CUDA SM89+ only; torch also runs it on CPU, so it is called
    directly here."""
    from llmopt.methods.modelopt import Modelopt

    cfg = ModeloptQuantize(stage="quantize", method="modelopt", format=fmt, calibration=CALIBRATION,
                           **({"group_size": 64} if fmt == "int4_awq" else {}))
    artifact = _quantized(cfg, tiny_model, tmp_path / "q")
    assert artifact.metrics["quantize/extension_build_s"] == 0.0, "no CUDA, nothing built (and the metric is declared)"
    fake = load_model(artifact, "cpu", "float32")
    expected = _ppl(fake, ids)
    fast, layers = Modelopt.fast_path(fake, artifact, "cpu", kernel)
    assert layers == LAYERS and type(fast.model.layers[3].self_attn.o_proj).kernel == kernel
    attention = fast.model.layers[3].self_attn
    assert isinstance(attention.k_proj, FusedSlice) and attention.k_proj.kernel == kernel, "q/k/v run as one call"
    assert attention.k_proj._shared[0] is attention.q_proj._shared[0] is attention.v_proj._shared[0]
    assert not any("quantizer" in name for name, _ in fast.named_modules()), "a plain model, no ModelOpt wrappers"
    assert _ppl(fast, ids) == pytest.approx(expected, rel=5e-3)


def test_load_accelerated_builds_modelopt_from_its_source_without_the_fake_quantization(tiny_model, ids, tmp_path,
                                                                                       monkeypatch):
    """Where a kernel runs the export's real weights, restoring ModelOpt's fake quantization first was
    loading the model twice: load_accelerated starts from the plain source. kernel: none still gets the
    fake-quantized model (the format's own library)."""
    from llmopt.export import modelopt

    cfg = ModeloptQuantize(stage="quantize", method="modelopt", format="int4_awq", group_size=64, calibration=CALIBRATION)
    artifact = _quantized(cfg, tiny_model, tmp_path / "q")
    expected = _ppl(load_model(artifact, "cpu", "float32"), ids)
    restore = modelopt.restore
    monkeypatch.setattr(modelopt, "restore", lambda *a: pytest.fail("the fake quantization was restored"))
    fast, applied = kernels.load_accelerated(artifact, "cpu", "float32", False, "auto", tmp_path)
    # auto on CPU: the tiny model's products run dequantized, AWQ's unfolded pre-scales in their columns
    assert (applied.kernel, applied.layers, applied.dequantized) == ("dequantized", LAYERS, LAYERS), applied
    assert not any("quantizer" in name for name, _ in fast.named_modules())
    assert _ppl(fast, ids) == pytest.approx(expected, rel=5e-3)
    monkeypatch.setattr(modelopt, "restore", restore)
    library, applied = kernels.load_accelerated(artifact, "cpu", "float32", False, "none", tmp_path)
    assert applied.kernel == "none" and any("quantizer" in name for name, _ in library.named_modules())


def test_auto_without_a_kernel_warns_and_says_why(tiny_model, tmp_path, caplog):
    """3-bit rtn has no fast kernel: never a silent fallback, the warning and the tag say so."""
    artifact = _quantized(RtnQuantize(stage="quantize", method="rtn", bits=3, group_size=32), tiny_model, tmp_path / "q")
    model = load_model(artifact, "cpu", "float32")
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        same, applied = kernels.accelerate(model, artifact, "cpu", "auto", tmp_path)
    assert same is model and applied.kernel == "none" and "no fast kernel for rtn" in applied.tag()
    assert "no fast kernel for rtn" in caplog.text
    with pytest.raises(ValueError, match="kernel: marlin cannot run here: marlin runs on CUDA only; nearest valid choice: "
                                         "none"):
        kernels.accelerate(model, artifact, "cpu", "marlin", tmp_path)


def test_a_named_kernel_that_cannot_run_here_is_refused_with_the_nearest(tiny_model, tmp_path):
    artifact = _quantized(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), tiny_model,
                          tmp_path / "q")
    with pytest.raises(ValueError, match="marlin runs on CUDA only; nearest valid choice: int4pack"):
        kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", "marlin", tmp_path)


def test_a_kernel_that_fails_to_build_names_itself_and_its_log(tmp_path):
    """Marlin's extension cannot build without CUDA: a real build failure, reported on one line
    with the log it wrote."""
    from llmopt.kernels.linear import build_marlin

    with pytest.raises(kernels.KernelBuildError) as failed:
        build_marlin(tmp_path)
    message = str(failed.value)
    assert message.startswith("kernel marlin failed to build") and "\n" not in message
    log = Path(message.rpartition("build log: ")[2])
    assert log == tmp_path / kernels.BUILD_DIR / "marlin-build.log" and log.is_file()


@pytest.mark.parametrize("fp32, k_full", [(True, True), (False, False)])
def test_marlin_is_called_with_the_arguments_gptqmodels_wrapper_gives_it(monkeypatch, fp32, k_full):
    """MarlinLinear.product calls Marlin's GEMM op itself (GPTQModel's per-call Python cost ~80 us of
    host time on an H200). The op cannot run without CUDA; a recorder stands in for it, and each of
    the 18 arguments must be what GPTQModel's own `apply_gptq_marlin_linear` (called as its
    MarlinLinear.forward calls it) hands the same op for the same layer."""
    from types import SimpleNamespace

    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear as GptqModelMarlin
    from gptqmodel.utils import marlin as gptqmodel_marlin
    from llmopt.kernels.linear import MarlinLinear

    calls = []

    def recorder(*args):
        calls.append(args)
        return torch.zeros(args[0].shape[0], args[12], dtype=args[0].dtype)

    tensors = {name: torch.full((2,), float(i)) for i, name in
               enumerate(["qweight", "scales", "qzeros", "g_idx", "g_idx_sort_indices", "workspace"])}
    layer = SimpleNamespace(**tensors, weight_type=GptqModelMarlin.TYPE_MAP[(4, True)], in_features=64, out_features=32,
                            is_k_full=k_full, fp32=fp32, bias=None)
    monkeypatch.setattr(gptqmodel_marlin, "_marlin_resolve_op",
                        lambda dtype, op_name: recorder if op_name == "gptq_marlin_gemm_bf16" else None)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    gptqmodel_marlin.apply_gptq_marlin_linear(
        input=x, weight=layer.qweight, weight_scale=layer.scales, weight_zp=layer.qzeros, g_idx=layer.g_idx,
        g_idx_sort_indices=layer.g_idx_sort_indices, workspace=layer.workspace, wtype=layer.weight_type,
        output_size_per_partition=layer.out_features, input_size_per_partition=layer.in_features,
        is_k_full=layer.is_k_full, bias=layer.bias, use_fp32_reduce=layer.fp32, use_atomics=False)
    out = MarlinLinear.product(SimpleNamespace(gemm=recorder, marlin=layer), x)
    assert out.shape == (5, 32) and len(calls) == 2
    theirs, ours = calls
    assert len(ours) == len(theirs) == 18
    for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        same = (isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr() and torch.equal(a, b)
                if isinstance(a, torch.Tensor) else type(a) is type(b) and a == b)
        assert same, f"argument {i}: GPTQModel passes {a!r}, llmopt {b!r}"


def test_gptq_packing_round_trips_and_matches_the_grid():
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (16, 64), generator=g)
        packed = pack_gptq(codes, bits)
        assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 16)
        assert torch.equal(unpack_gptq(packed, bits).t(), codes)
    weight = QuantizedWeight(torch.tensor([[0, 15, 8, 3]]), torch.tensor([[0.5], [2.0]]).reshape(2, 1), 4, 2)
    assert weight.dequantize().tolist() == [[-4.0, 3.5, 0.0, -10.0]]  # scale * (code - 8), per group of 2


def test_benchmark_records_which_kernel_ran(tiny_model, tmp_path):
    from llmopt.recipe import Benchmark
    from llmopt.stages import benchmark

    artifact = _quantized(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), tiny_model,
                          tmp_path / "q")
    (tmp_path / "b").mkdir()
    ctx = StageContext("cpu", "float32", False, progress=False, cache_root=tmp_path / "cache")
    cfg = Benchmark(stage="benchmark", batch_sizes=[1], input_tokens=8, output_tokens=4, warmup=0, repeats=1)
    result = benchmark.run(cfg, artifact, tmp_path / "b", ctx)
    assert result.info["environment"]["kernel"] == (
        "dequantized (every quantized product is under 262144 weights: on CPU a dense product beats int4pack's call "
        "there; kernel: int4pack runs it anyway)")
    assert result.metrics["kernel/layers"] == result.metrics["kernel/layers_dequantized"] == LAYERS
    assert result.metrics["kernel/build_s"] == 0


def test_auto_on_cpu_runs_small_products_dequantized(tiny_model, ids, tmp_path, caplog):
    """On CPU an integer kernel's call costs more than a dense product on small layers (the tiny
    model's are 64 to 512 wide): `auto` runs those dequantized, exactly the checkpoint's grid in the
    model's float32, and says so. Only the product's rounding differs from GPTQModel's own float32
    kernel: within 1e-4 of the largest logit, where the bf16 kernels are held to 5e-2."""
    from llmopt.kernels.linear import DequantizedLinear, kernels_in

    artifact = _quantized(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), tiny_model,
                          tmp_path / "q")
    reference = load_model(artifact, "cpu", "float32")
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        fast, applied = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", "auto", tmp_path)
    assert (applied.kernel, applied.layers, applied.dequantized) == ("dequantized", LAYERS, LAYERS)
    assert "all 56 quantized layers run dequantized" in caplog.text and "kernel: int4pack forces" in caplog.text
    assert kernels_in(fast) == {"dequantized": LAYERS}
    attention = fast.model.layers[2].self_attn
    # each layer its own dense product, as in the base: a shared call's bookkeeping costs more on CPU
    assert all(isinstance(m, DequantizedLinear) for m in (attention.q_proj, attention.k_proj, fast.model.layers[2].mlp.up_proj))
    assert attention.q_proj.weight.dtype == torch.float32 and attention.k_proj.weight.shape == (32, 64)
    prompt = torch.tensor([ids[:32]])
    with torch.no_grad():
        expected, got = reference(prompt).logits, fast(prompt).logits
        greedy = [m.generate(prompt, max_new_tokens=16, do_sample=False)[0, 32:].tolist() for m in (reference, fast)]
    assert relative_error(got, expected) < 1e-4
    assert greedy[0] == greedy[1]


def test_dense_below_splits_a_model_by_product_size(tiny_model, tmp_path):
    """The threshold is per product (a fused group counts its stacked weights): at 20000 weights the
    tiny model's gate/up (2 x 256 x 64 = 32768) keep int4pack as one call, q/k/v (8192: each its own
    dense product), o (4096) and down (16384) run dequantized; the model's logits stay those of
    all-int4pack to bf16's rounding."""
    from llmopt.kernels.linear import kernels_in

    artifact = _quantized(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), tiny_model,
                          tmp_path / "q")
    mixed, everywhere = load_model(artifact, "cpu", "float32"), load_model(artifact, "cpu", "float32")
    assert swap(mixed, read_gptq(artifact.path, "cpu"), "int4pack", "cpu", dense_below=20000) == LAYERS
    swap(everywhere, read_gptq(artifact.path, "cpu"), "int4pack", "cpu")
    assert kernels_in(mixed) == {"int4pack": 16, "dequantized": 40}
    block = mixed.model.layers[0]
    assert [m.kernel for m in (block.self_attn.k_proj, block.self_attn.o_proj, block.mlp.up_proj, block.mlp.down_proj)] \
        == ["dequantized", "dequantized", "int4pack", "dequantized"]
    assert isinstance(block.mlp.up_proj, FusedSlice) and not isinstance(block.self_attn.k_proj, FusedSlice)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(mixed(ids).logits, everywhere(ids).logits) < 3e-2


def test_dequantized_layer_is_the_grid_with_act_order_pre_scale_and_bias():
    """DequantizedLinear computes x @ (W * pre_scale)^T + bias in the input's column order, W the
    grid read through act-order's g_idx: against that formula written out."""
    from llmopt.kernels.linear import DequantizedLinear

    gen = torch.Generator().manual_seed(3)
    n, k = 8, 64
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales, zeros = torch.rand(2, n, generator=gen) + 0.1, torch.randint(0, 16, (2, n), generator=gen)
    g_idx = torch.randperm(k, generator=gen) % 2  # act-order: groups interleaved over the columns
    pre, bias = torch.rand(k, generator=gen) + 0.5, torch.randn(n, generator=gen)
    weight = QuantizedWeight(codes, scales, 4, 32, zeros, g_idx, pre, bias)
    layer = DequantizedLinear(weight, "cpu", torch.float32)
    x = torch.randn(3, k, generator=gen)
    w = torch.stack([scales[g_idx[c], :] * (codes[:, c].float() - zeros[g_idx[c], :].float()) for c in range(k)], 1)
    assert torch.allclose(layer(x), (x * pre) @ w.t() + bias, atol=1e-5)
    assert layer.pre_scale is None and layer.order is None, "the pre-scale is in the weight, applied once"


KERNEL_RECIPE = ("name: k\nmodel: {{embedded: tiny-llama}}\ndevice: {device}\nstages:\n  - stage: quantize\n{quantize}"
                 "  - stage: benchmark\n    runtime: {runtime}\n    kernel: {kernel}\n")
GPTQ = "    method: gptq_rtn\n    bits: 4\n    group_size: 32\n"
GPTQ128 = "    method: gptq_rtn\n    bits: 4\n    group_size: 128\n"  # a grid Machete takes (groups of 64, 128 or a row)
FP8 = f"    method: modelopt\n    format: fp8\n    calibration: {{dataset: {{path: {DATA / 'calibration.jsonl'}}}}}\n"


@pytest.mark.parametrize("device, quantize_text, runtime, kernel, gpu, words", [
    ("cpu", GPTQ, "transformers-eager", "fp8", None,
     "stages[1].kernel: fp8 cannot run quantize gptq_rtn"),
    ("cpu", GPTQ, "transformers-eager", "marlin", None, "nearest valid choice: int4pack"),
    ("cuda", FP8, "transformers-compiled", "fp8", ("A100-SXM4-80GB", 80),
     "stages[1].kernel: fp8 needs compute capability 8.9 or newer and this GPU is 8.0 (A100-SXM4-80GB, sm80); "
     "nearest valid choice: none"),
    ("cuda", GPTQ, "transformers-compiled", "marlin", ("Tesla T4", 75),
     "stages[1].kernel: marlin needs compute capability 8.0 or newer and this GPU is 7.5"),
    ("cpu", GPTQ128, "transformers-eager", "machete", None, "stages[1].kernel: machete cannot run quantize gptq_rtn"),
    ("cuda", GPTQ, "transformers-compiled", "machete", ("NVIDIA H100 80GB HBM3", 90),
     "stages[1].kernel: machete cannot run quantize gptq_rtn ({'bits': 4, 'group_size': 32"),
    ("cuda", GPTQ128, "transformers-compiled", "machete", ("NVIDIA A100-SXM4-80GB", 80),
     "stages[1].kernel: machete needs compute capability 9.0 or newer and this GPU is 8.0 (NVIDIA A100-SXM4-80GB, sm80); "
     "nearest valid choice: marlin"),
    ("cuda", GPTQ128, "transformers-compiled", "machete", ("NVIDIA B200", 100),
     "stages[1].kernel: machete runs on Hopper (compute capability 9.0) only and this GPU is 10.0 (NVIDIA B200, sm100); "
     "nearest valid choice: marlin"),
    ("cuda", GPTQ128, "transformers-compiled", "machete+marlin", ("NVIDIA L40S", 89),
     "stages[1].kernel: machete+marlin needs compute capability 9.0 or newer and this GPU is 8.9 (NVIDIA L40S, sm89); "
     "nearest valid choice: marlin"),
])
def test_kernel_the_machine_cannot_run_exit_2(device, quantize_text, runtime, kernel, gpu, words, workdir, tmp_path,
                                              monkeypatch, capsys):
    from llmopt import machine

    if gpu is not None:
        monkeypatch.setattr(machine, "gpus", lambda: (machine.Gpu(*gpu),))
    recipe = tmp_path / "k.yaml"
    recipe.write_text(KERNEL_RECIPE.format(device=device, quantize=quantize_text, runtime=runtime, kernel=kernel))
    assert run_cli(workdir, "run", str(recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not workdir["cache"].exists() and not workdir["mlruns"].exists(), "nothing written"


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_weights_are_read_back_onto_their_exact_grid(sym):
    from llmopt.methods.rtn import fake_quantize, regrid

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    w[3, :32], w[5, 32:64] = 0, 1e-9  # degenerate groups: all zero, and below the scale's floor
    rounded = fake_quantize(w, bits=4, group_size=32, sym=sym)
    grid = regrid(rounded, 4, 32, sym)
    assert grid.codes.min() >= 0 and grid.codes.max() <= 15
    # to float rounding, every weight, the tiny group's too (no absolute tolerance hides it)
    assert torch.allclose(grid.dequantize(), rounded, rtol=1e-5, atol=0)
    if sym:
        assert rounded[5, 32:64].abs().min() > 0, "the tiny group rounds onto the scale floor's grid, not to zero"
    with pytest.raises(ValueError, match="not on a 4-bit grid"):
        regrid(w, 4, 32, sym)


def test_siblings_reading_one_input_run_as_one_kernel_call(tiny_model, tmp_path):
    """q/k/v and gate/up become one call on their stacked weights (4 kernel calls per decoder layer,
    not 7), in eager and in a compiled graph, with the same logits as the unfused kernels."""
    artifact = _quantized(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), tiny_model,
                          tmp_path / "q")
    fused, _ = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", "int4pack", tmp_path)
    plain = load_model(artifact, "cpu", "float32")
    swap(plain, read_gptq(artifact.path, "cpu"), "int4pack", "cpu", fuse=False)
    calls = []
    for module in fused.modules():
        if getattr(type(module), "kernel", None) == "int4pack":
            module.register_forward_hook(lambda m, i, o: calls.append(o.shape[-1]))
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = plain(ids).logits, fused(ids).logits
    layers = len(fused.model.layers)
    assert len(calls) == 4 * layers, calls
    with torch.no_grad():
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)(ids).logits
    assert sorted(set(calls)) == [64, 64 + 32 + 32, 2 * 256], "o/down, q+k+v, gate+up"
    # the same bf16 kernel on stacked weights: equal here to the last bit, but another CPU may tile a
    # wider product differently; bf16's resolution (2**-8 of the largest logit) bounds that, while a
    # slice taken from the wrong member is off by the logits' own size
    assert relative_error(got, expected) < 2**-8
    assert relative_error(compiled, got) < 2**-8
    assert all(part._shared[0].x is None for part in fused.modules() if isinstance(part, FusedSlice)), "no activation held"


def test_a_fused_member_called_on_another_input_computes_afresh():
    """Never wrong when a model calls a fused member on its own input: the member computes the group's
    call again and takes its slice."""
    torch.manual_seed(0)
    grid = [QuantizedWeight(torch.randint(0, 16, (n, 64), dtype=torch.uint8), torch.rand(2, n) / 10, 4, 32)
            for n in (64, 32)]
    model = torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(64, 64), "up_proj": torch.nn.Linear(64, 32)})
    swap(model, {"gate_proj": grid[0], "up_proj": grid[1]}, "int4pack", "cpu", compare_with_original=False)
    assert isinstance(model["gate_proj"], FusedSlice)
    a, b = torch.randn(2, 64), torch.randn(2, 64)
    with torch.no_grad():
        q, k = model["gate_proj"](a), model["up_proj"](b)  # up on another input than gate
        q_again = model["gate_proj"](a)
    for got, weight, x in ((q, grid[0], a), (k, grid[1], b), (q_again, grid[0], a)):
        assert relative_error(got.float(), x @ weight.dequantize().t()) < 2e-2


def test_weights_that_cannot_share_a_call_stay_apart():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    one = QuantizedWeight(codes, torch.rand(2, 32), 4, 32)
    assert concatenate([one, QuantizedWeight(codes, torch.rand(1, 32), 4, 64)]) is None, "other groups"
    shuffled = QuantizedWeight(codes, torch.rand(2, 32), 4, 32, g_idx=torch.randperm(64) // 32)
    assert concatenate([one, shuffled]) is None, "another act-order"
    both = concatenate([one, QuantizedWeight(codes, torch.rand(2, 32), 4, 32, zeros=torch.full((2, 32), 7))])
    assert both.shape == (64, 64) and both.zero_codes()[:, :32].eq(8).all() and both.zero_codes()[:, 32:].eq(7).all()


def test_the_compiled_runtime_runs_a_dense_model_with_its_siblings_fused(tiny_model, ids):
    """The compiled runtime stacks a dense model's q/k/v and gate/up (as serving stacks and the
    quantized kernels do): one product per group, the same logits and greedy text, the stacked
    weights in place of the members' (no copy kept), and a tag saying so. `fuse=False` leaves the
    model as transformers runs it. (The runtime's CUDA graphs run on the GPU machine only:
    tests/test_gpu_kernels.py; its constructor does not touch the device.)"""
    from llmopt.eval.runtimes.compiled import CompiledRuntime
    from llmopt.kernels.linear import StackedLinear, fuse_dense
    from transformers import AutoModelForCausalLM

    prompt = torch.tensor([ids[:32]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    fused = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    parameters = sum(p.numel() for p in plain.parameters())
    assert CompiledRuntime(plain, "cuda", fuse=False).tags() == {"fused_dense_groups": "0"}
    runtime = CompiledRuntime(fused, "cuda")
    layers = len(fused.model.layers)
    assert runtime.tags() == {"fused_dense_groups": str(2 * layers)}
    stacked = [m for m in fused.modules() if isinstance(m, StackedLinear)]
    assert sorted({m.out_features for m in stacked}) == [64 + 32 + 32, 2 * 256] and len(stacked) == 2 * layers
    assert sum(p.numel() for p in fused.parameters()) == parameters, "the members' weights are gone, not kept beside"
    calls = []
    for module in stacked:
        module.register_forward_hook(lambda m, i, o: calls.append(m.out_features))
    with torch.no_grad():
        expected, got = plain(prompt).logits, fused(prompt).logits
        assert len(calls) == 2 * layers, calls  # one call a group
        text = [m.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 32:] for m in (plain, fused)]
    # float32 products of stacked weights: the same sums, up to the tiling of a wider product
    assert relative_error(got, expected) < 1e-5
    assert torch.equal(text[0], text[1])
    assert fuse_dense(fused) == 0, "already fused"


def test_dense_siblings_that_cannot_share_a_product_stay_apart():
    """Members that read different widths or hold different dtypes are left as they are."""
    from llmopt.kernels.linear import fuse_dense

    block = torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(64, 32), "up_proj": torch.nn.Linear(64, 32)})
    mixed = torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(64, 32), "up_proj": torch.nn.Linear(64, 32).double()})
    assert fuse_dense(mixed) == 0 and type(mixed["up_proj"]) is torch.nn.Linear
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = [block[name](x) for name in ("gate_proj", "up_proj")]
        assert fuse_dense(block) == 1 and isinstance(block["up_proj"], FusedSlice)
        got = [block[name](x) for name in ("gate_proj", "up_proj")]
    assert all(torch.allclose(g, e, rtol=0, atol=1e-6) for g, e in zip(got, expected, strict=True)), "biases stacked too"


def _mha_copy(tiny_model: Path, dest: Path) -> Path:
    """The tiny Llama's shape with one value head per query head (as Llama-2 7B/13B), random weights
    (seed 0), and its tokenizer: where AWQ's o_proj scale can fold into v_proj."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, dest / name)
    return dest


@pytest.mark.parametrize("attention", ["grouped", "one-value-head-per-query-head"])
def test_awq_pre_scales_fold_into_the_producers_scales(attention, tiny_model, ids, tmp_path, monkeypatch):
    """ModelOpt's INT4-AWQ export keeps a pre-quant scale on o_proj and down_proj. The fast path folds
    it into v_proj's and up_proj's quantization scales (no multiply left on the activations), where the
    model's structure allows: down_proj always; o_proj only where each value head serves one query head
    or its query heads want the same scale (the tiny Llama's grouped heads do not). The logits are the
    unfolded path's, to float rounding of the scales (the same sums, scaled before instead of after)."""
    from llmopt.methods import modelopt as method

    model_path = tiny_model if attention == "grouped" else _mha_copy(tiny_model, tmp_path / "mha")
    cfg = ModeloptQuantize(stage="quantize", method="modelopt", format="int4_awq", group_size=64, calibration=CALIBRATION)
    artifact = _quantized(cfg, model_path, tmp_path / "q")
    if attention != "grouped":  # scales as a bf16 model's export holds them (a float32 model's are float32)
        read = method.read_export
        monkeypatch.setattr(method, "read_export", lambda path: {
            prefix: {leaf: t.bfloat16() if leaf == "weight_scale" else t for leaf, t in tensors.items()}
            for prefix, tensors in read(path).items()})
    prompt = torch.tensor([ids[:48]])
    fold = method.fold_pre_scales
    folded_names = []
    monkeypatch.setattr(method, "fold_pre_scales", lambda *a: folded_names.extend(fold(*a)) or folded_names)
    folded, _ = method.Modelopt.fast_path(load_model(artifact, "cpu", "float32"), artifact, "cpu", "int4pack")
    monkeypatch.setattr(method, "fold_pre_scales", lambda *a: [])
    plain, _ = method.Modelopt.fast_path(load_model(artifact, "cpu", "float32"), artifact, "cpu", "int4pack")
    layers = len(folded.model.layers)
    scaled = {name for name, m in folded.named_modules() if getattr(m, "pre_scale", None) is not None}
    if attention == "grouped":
        assert folded_names == [f"model.layers.{i}.mlp.down_proj" for i in range(layers)]
        assert scaled == {f"model.layers.{i}.self_attn.o_proj" for i in range(layers)}
    else:
        assert len(folded_names) == 2 * layers and scaled == set()
    assert len({name for name, m in plain.named_modules() if getattr(m, "pre_scale", None) is not None}) == 2 * layers
    for block in folded.model.layers:  # the folded producers still share their siblings' one call
        assert block.self_attn.v_proj._shared[0] is block.self_attn.q_proj._shared[0]
        assert block.mlp.up_proj._shared[0] is block.mlp.gate_proj._shared[0]
    with torch.no_grad():
        got, expected = folded(prompt).logits, plain(prompt).logits
    # both run the int4 kernel in bf16: the scale applied to the weights instead of the input rounds
    # differently (about 2**-8 of a value), far below what a misplaced scale does (the scale itself, ~1)
    assert relative_error(got, expected) < 2e-2
    # greedy agrees wherever the unfolded path's top two logits stand further apart than the two paths
    # differ (on the trained tiny model some positions are within 0.008 of a tie, closer than bf16's
    # rounding here, 0.02: which way those fall depends on the CPU's kernels)
    top = expected[0].topk(2, -1).values
    clear = (top[:, 0] - top[:, 1]) > 2 * (got - expected).abs().max()
    assert clear.sum() >= expected.shape[1] // 2, "most positions are clear of a tie"
    assert torch.equal(got[0, clear].argmax(-1), expected[0, clear].argmax(-1))


def test_pre_scales_stay_on_the_activations_where_scaling_does_not_commute(tiny_model, tmp_path, monkeypatch, caplog):
    """The structure check: were gate_proj taken as down_proj's producer (silu is not linear), scaling
    its outputs does not scale down_proj's inputs; nothing is folded, and the warning says so."""
    from llmopt.methods import modelopt as method

    cfg = ModeloptQuantize(stage="quantize", method="modelopt", format="int4_awq", group_size=64, calibration=CALIBRATION)
    artifact = _quantized(cfg, tiny_model, tmp_path / "q")
    monkeypatch.setattr(method, "FOLDS", (("mlp.gate_proj", "mlp.down_proj"),))
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        fast, _ = method.Modelopt.fast_path(load_model(artifact, "cpu", "float32"), artifact, "cpu", "int4pack")
    assert "AWQ pre-quant scales left on the activations" in caplog.text
    assert all(fast.get_submodule(f"model.layers.{i}.mlp.down_proj").pre_scale is not None
               for i in range(len(fast.model.layers)))


def test_the_opaque_kernel_ops_hold_their_layers_weakly():
    """The custom op finds a Marlin layer by index; the index must not keep the layer (and its model's
    packed weights) alive: a base measured after its int4 candidate in one process counted ~3.9 GB of
    the candidate's weights in its peak memory while it did."""
    import gc

    from llmopt.kernels.linear import register_layer, registered_layer

    class Layer:
        pass

    layer = Layer()
    index = register_layer(layer)
    assert registered_layer(index) is layer
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match=f"kernel layer {index} was freed: its model is gone"):
        registered_layer(index)


def test_modelopt_quantizes_in_a_process_of_its_own(tiny_model, tmp_path):
    """ModelOpt's calibration and export run in a child (llmopt.isolated): nothing of its model stays in
    the pipeline's process (no quantizer module alive after the stage, without a collection), and the
    artifact and its metrics come back."""
    import gc

    from modelopt.torch.quantization.nn import TensorQuantizer

    def quantizers() -> int:
        return sum(isinstance(o, TensorQuantizer) for o in gc.get_objects())

    before = quantizers()  # other tests' fake-quantized models may still be around
    cfg = ModeloptQuantize(stage="quantize", method="modelopt", format="fp8", calibration=CALIBRATION)
    artifact = _quantized(cfg, tiny_model, tmp_path / "q")
    assert artifact.info["modelopt_format"] == "fp8" and artifact.metrics["quantize/calibration_windows"] > 0
    assert any(artifact.path.glob("*.safetensors"))
    assert quantizers() == before


# a module that keeps an exception it caught while importing, as GPTQModel keeps llama_cpp's import error
KEEPS_ITS_IMPORT_ERROR = """
try:
    import llmopt_test_no_such_module
except ImportError as e:
    KEPT = e
"""


def test_a_library_that_keeps_its_import_error_pins_its_importer_unless_imported_detached(tmp_path, monkeypatch):
    """The kept traceback's frames reach, through f_back, every frame that was on the stack below the
    import, each with its locals as it returned: a loader that imported such a library kept its
    model alive. `import_detached` imports on a thread of its own, so the loader's model is freed."""
    import gc
    import importlib
    import sys
    import weakref

    from llmopt.models import import_detached

    for name in ("keeps_plain", "keeps_detached"):
        (tmp_path / f"{name}.py").write_text(KEEPS_ITS_IMPORT_ERROR)
        monkeypatch.delitem(sys.modules, name, raising=False)  # restored (removed) after the test
    monkeypatch.syspath_prepend(str(tmp_path))

    class Model:
        pass

    def load(importer) -> weakref.ref:
        model = Model()
        importer()
        return weakref.ref(model)

    plain = load(lambda: importlib.import_module("keeps_plain"))
    detached = load(lambda: import_detached("keeps_detached"))
    gc.collect()
    assert plain() is not None, "the premise: a plain import from the loader pins the loader's locals"
    assert detached() is None
    assert isinstance(sys.modules["keeps_detached"].KEPT, ImportError)  # imported all the same
    with pytest.raises(ModuleNotFoundError, match="llmopt_test_no_such_module"):
        import_detached("llmopt_test_no_such_module")


LOAD_AND_DROP = """
import gc, json, sys, weakref
from pathlib import Path
from llmopt import kernels
from llmopt.cache import Artifact

path, info, cache = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
libraries = ("gptqmodel", "modelopt")
before = [m for m in libraries if m in sys.modules]
model, applied = kernels.load_accelerated(Artifact(Path(path), "hf-checkpoint", {}, info), "cpu", "float32", False,
                                          "auto", cache)
model_ref = weakref.ref(model)
del model, applied
gc.collect()
print(json.dumps({"before": before, "after": [m for m in libraries if m in sys.modules], "alive": model_ref() is not None}))
"""


@pytest.mark.parametrize("case", ["gptq_rtn", "modelopt-fp8"])
def test_the_first_model_a_process_loads_is_freed_when_dropped(case, tiny_model, tmp_path):
    """In a fresh process (the library not yet imported, as in a pipeline's benchmark stage), the
    first quantized model loaded is gone once its last reference is dropped. Before the fix the
    library's kept import traceback held the loader's frames, and so the model: on an H100 the bf16
    base, benchmarked after its candidate in one process, counted the candidate's batch-1 peak in
    its own (17.55 GB for 13.48 GB of weights)."""
    import json
    import subprocess
    import sys

    cfg = (GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32) if case == "gptq_rtn" else
           ModeloptQuantize(stage="quantize", method="modelopt", format="fp8", calibration=CALIBRATION))
    artifact = _quantized(cfg, tiny_model, tmp_path / "q")
    done = subprocess.run([sys.executable, "-c", LOAD_AND_DROP, str(artifact.path), json.dumps(artifact.info),
                           str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    library = "gptqmodel" if case == "gptq_rtn" else "modelopt"
    assert library not in seen["before"] and library in seen["after"], seen  # the load imported it
    assert seen["alive"] is False


def _random_weight(bits: int, n: int, k: int, group: int, asym: bool, act_order: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = k // group
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(groups, n, generator=g) * 0.02 + 0.001
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g, dtype=torch.int32) if asym else None
    g_idx = torch.randperm(k, generator=g) % groups if act_order else None
    return QuantizedWeight(codes, scales, bits, group, zeros, g_idx, bias=torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("kernel, bits, group, asym, act_order", [
    ("int4pack", 4, 32, False, False), ("int4pack", 4, 64, True, False), ("int4pack", 4, 32, True, True),
    ("int8pack", 8, 256, False, False)])
def test_dense_prefill_runs_the_kept_codes_dense_and_short_products_on_the_kernel(kernel, bits, group, asym, act_order,
                                                                                  monkeypatch):
    """`keep_dense`: the kept codes dequantize to exactly the weight's grid (`dequantize`), whatever
    the packing (two 4-bit codes a byte), zeros and act-order's column groups; a product of at least
    `min_tokens` rows is that weight's dense product (with bias), and a shorter one runs the kernel,
    which agrees with it to the kernel's bf16 rounding."""
    from llmopt.kernels.linear import dense_copy_bytes, kernel_module, relative_error

    n, k = 96, 256
    weight = _random_weight(bits, n, k, group, asym, act_order)
    module = kernel_module(kernel, weight, "cpu", torch.float32)
    module.keep_dense(weight, 16, "cpu", torch.float32)
    reference = weight.dequantize()
    assert torch.equal(module.dense_weight(torch.float32), reference)
    kept = n * k * bits // 8 + n * (k // group) * 4 + (n * (k // group) if asym else 0) + (k * 4 if act_order else 0)
    assert dense_copy_bytes(torch.nn.Sequential(module)) == kept
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(1))
    calls = []
    kernel_mm = module._mm
    monkeypatch.setattr(module, "_mm", lambda x: calls.append(x.shape[0]) or kernel_mm(x))
    with torch.no_grad():
        dense = module(x)
        short = module(x[:15])
    assert calls == [15], "16 rows ran dense, 15 on the kernel"
    expected = x @ reference.t() + weight.bias
    assert torch.allclose(dense, expected, rtol=1e-5, atol=1e-5)
    assert relative_error(short, expected[:15]) < 3e-2


def test_dense_prefill_is_kept_by_the_fast_path_and_reported(tiny_model, tmp_path):
    """Through `accelerate`: every kernel module keeps its codes, the run's metrics say from how
    many rows and how much memory the copy costs (0.5 byte a 4-bit weight, plus scales), the tag
    says so; without it nothing is kept and no such metric is logged."""
    from llmopt.kernels.linear import QuantLinear

    artifact = _quantized(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), tiny_model,
                          tmp_path / "q")
    model, applied = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", "int4pack", tmp_path,
                                        dense_prefill_tokens=64)
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert modules and all(m.dense_tokens == 64 for m in modules)
    weights = sum(m.in_features * m.out_features for m in modules)
    scales = sum(m.out_features * m.in_features // 32 for m in modules) * 4  # float32 on CPU
    assert applied.metrics()["kernel/dense_prefill_tokens"] == 64
    assert applied.metrics()["kernel/dense_copy_gb"] == pytest.approx((weights // 2 + scales) / 1e9)
    assert "products of 64+ rows dense" in applied.tag()
    plain, without = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", "int4pack", tmp_path)
    assert "kernel/dense_prefill_tokens" not in without.metrics()
    assert not any(getattr(m, "dense_tokens", 0) for m in plain.modules())


def test_the_engine_prefills_dense_and_decodes_on_the_kernel(tiny_model, tmp_path):
    """engine llmopt with `dense_prefill_tokens`: its prefills (batch x width rows: 64 and up) take the
    dense branch, its decode steps (at most 3 rows) the kernel, and every request's tokens are greedy
    decoding's. So that the test sees the wiring and not bf16 rounding, each kernel call here computes
    the same float32 product as the dense branch (the branches' numbers: the test above)."""
    import torch.nn.functional as F
    from conftest import greedy_by_forward_passes
    from llmopt.engine import Engine
    from llmopt.kernels.linear import QuantLinear

    artifact = _quantized(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), tiny_model,
                          tmp_path / "q")
    model, _ = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", "int4pack", tmp_path,
                                  dense_prefill_tokens=60)
    rows = {"dense": [], "kernel": []}
    for module in [m for m in model.modules() if isinstance(m, QuantLinear)]:
        exact = module.dense_weight(torch.float32)
        module.dense_weight = lambda dtype, w=exact: rows["dense"].append(1) or w.to(dtype)
        module._mm = lambda x, w=exact: rows["kernel"].append(x.shape[0]) or F.linear(x, w)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (40, 5, 33, 12)]
    engine = Engine(model, "cpu", slots=3, max_prompt=40, max_new=6, smallest_batch=2).start()
    try:
        got = engine.complete(prompts, [6, 6, 6, 6])
    finally:
        engine.stop()
    assert rows["dense"], "a prefill of 64 rows or more ran dense"
    decode = [r for r in rows["kernel"] if r <= 3]
    assert decode and all(r < 60 for r in rows["kernel"]), "decode steps and short prefills ran the kernel"
    for ids, tokens in zip(prompts, got, strict=True):  # the reference's passes (46 rows at most) run the kernel
        assert tokens == greedy_by_forward_passes(model, ids, 6)


@pytest.mark.parametrize("dense_from", [64, None], ids=["dense faster from 64 rows", "the kernel always faster"])
def test_auto_dense_prefill_times_each_prefill_shape_both_ways_and_keeps_the_faster(dense_from, tiny_model, tmp_path):
    """engine llmopt with `dense_prefill_tokens: auto`: the codes are kept and every product runs the kernel
    until the engine, at start-up, runs each prefill shape (batch x width) both ways and keeps the faster
    (times stand in here for the GPU's: dense faster from `dense_from` rows, or never). Served prefills then
    take the chosen branch, decode steps the kernel, and every token is greedy decoding's; with no shape
    faster dense the kept codes are dropped. As in the test above, both branches compute one float32
    product, so that what is tested is the wiring."""
    import torch.nn.functional as F
    from conftest import greedy_by_forward_passes
    from llmopt.engine import Engine
    from llmopt.kernels.linear import QuantLinear, dense_copy_bytes

    artifact = _quantized(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), tiny_model,
                          tmp_path / "q")
    model, applied = kernels.accelerate(load_model(artifact, "cpu", "float32"), artifact, "cpu", "int4pack", tmp_path,
                                        dense_prefill_tokens="auto")
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert modules and all(m.keeps_dense and m.dense_tokens == 0 for m in modules), "kept, and the kernel until chosen"
    assert "dense_prefill_tokens" not in str(applied.metrics()) and applied.metrics()["kernel/dense_copy_gb"] > 0
    assert "prefills dense where timed faster at start-up (auto)" in applied.tag()
    rows = {"dense": [], "kernel": []}
    for module in modules:
        exact = module.dense_weight(torch.float32)
        module.dense_weight = lambda dtype, w=exact: rows["dense"].append(1) or w.to(dtype)
        module._mm = lambda x, w=exact: rows["kernel"].append(x.shape[0]) or F.linear(x, w)
    engine = Engine(model, "cpu", slots=3, max_prompt=40, max_new=6, smallest_batch=2, dense_prefill="auto")
    timed = []

    def fake_time(run, shape, dense):  # runs the variant once: it must take the branch it is timed as
        rows["dense"].clear()
        rows["kernel"].clear()
        run()
        if dense:
            assert rows["dense"] and not rows["kernel"], shape
        else:
            assert not rows["dense"] and set(rows["kernel"]) == {shape[0] * shape[1]}, shape
        timed.append((shape, dense))
        faster = dense_from is not None and shape[0] * shape[1] >= dense_from
        return 1.0 if dense == faster else 2.0

    engine._time_prefill = fake_time
    engine.start()
    shapes = [(b, w) for b in (1, 2) for w in (32, 64)]
    assert sorted(timed) == sorted((shape, dense) for shape in shapes for dense in (False, True))
    rows["dense"].clear()
    rows["kernel"].clear()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (40, 5, 33, 12)]
    try:
        got = engine.complete(prompts, [6, 6, 6, 6])
        stats = engine.stats()["engine"]
    finally:
        engine.stop()
    chosen = {k: c["dense"] for k, c in stats["dense_prefill"].items()}
    expected = {f"{b}x{w}": dense_from is not None and b * w >= dense_from for b, w in shapes}
    assert chosen == expected
    prefill_rows = [r for r in rows["kernel"] if r > 3]  # decode steps: 2 or 3 rows
    if dense_from is None:
        assert not rows["dense"] and prefill_rows, "every prefill on the kernel"
        assert stats["dense_codes_kept"] is False and dense_copy_bytes(model) == 0 and not any(m.keeps_dense for m in modules)
    else:
        assert rows["dense"] and set(prefill_rows) <= {32}, "only the 1 x 32 prefill on the kernel"
        assert stats["dense_codes_kept"] is True and dense_copy_bytes(model) > 0
    assert all(m.dense_tokens == 0 for m in modules), "decode steps on the kernel"
    for ids, tokens in zip(prompts, got, strict=True):
        assert tokens == greedy_by_forward_passes(model, ids, 6)
