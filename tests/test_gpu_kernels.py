"""GPU machine only (`pytest -m gpu`): every fast decode kernel on CUDA against the format's own
library, on the shipped tiny Llama in bf16 (trained: perplexity and greedy text mean something;
SmolLM2's wheel is too large to travel to the GPU machine).

Tolerances: the kernels and the libraries compute the same products in bf16 with different
accumulation orders (and Marlin pads the tiny model's 64-wide layers to its tiles), so perplexity
may move by rounding: within 1% (on CPU in float32 the same comparisons agree within 0.02%);
greedy decoding must agree on the first 8 tokens of an in-distribution prompt.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import DATA, greedy_by_forward_passes

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CALIBRATION = {"dataset": {"path": str(DATA / "calibration.jsonl")}, "num_samples": 32, "seq_len": 128}
LAYERS = 8 * 7  # the tiny Llama's quantized linear layers


def _configs():
    from llmopt.methods.gptq import GptqQuantize
    from llmopt.methods.gptq_rtn import GptqRtnQuantize
    from llmopt.methods.modelopt import ModeloptQuantize

    return {
        "int4-g32-marlin": (GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), "marlin"),
        "int4-g32-int4pack": (GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32), "int4pack"),
        "int8-marlin": (GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=8), "marlin"),
        # Marlin takes act-order only on tile-aligned shapes (the tiny model's 64 columns are not):
        # auto passes to int4pack, and says why
        "gptq-actorder-auto": (GptqQuantize(stage="quantize", method="gptq", bits=4, group_size=32, desc_act=True,
                                            calibration=CALIBRATION), "auto"),
        "gptq-asym-int4pack": (GptqQuantize(stage="quantize", method="gptq", bits=4, group_size=32, sym=False,
                                            calibration=CALIBRATION), "int4pack"),
        "awq-marlin": (ModeloptQuantize(stage="quantize", method="modelopt", format="int4_awq", group_size=64,
                                        calibration=CALIBRATION), "marlin"),
        "fp8": (ModeloptQuantize(stage="quantize", method="modelopt", format="fp8", calibration=CALIBRATION), "fp8"),
    }


@pytest.fixture(scope="module")
def ids(tiny_model):
    from llmopt.data import load_texts, token_stream
    from llmopt.models import load_tokenizer
    from llmopt.recipe import DatasetSpec

    return token_stream(load_tokenizer(tiny_model), load_texts(DatasetSpec(path=DATA / "validation.jsonl")))[:8192]


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory) -> Path:
    """One cache root for the module (Marlin builds once), or the one the caller names."""
    return Path(os.environ.get("LLMOPT_KERNEL_CACHE") or tmp_path_factory.mktemp("kernel-cache"))


@pytest.mark.parametrize("case", ["int4-g32-marlin", "int4-g32-int4pack", "int8-marlin", "gptq-actorder-auto",
                                  "gptq-asym-int4pack", "awq-marlin", "fp8"])
def test_kernel_matches_the_format_library(case, tiny_model, ids, kernel_cache, tmp_path):
    from llmopt import kernels
    from llmopt.cache import Artifact
    from llmopt.eval.perplexity import perplexity
    from llmopt.models import load_model, load_tokenizer
    from llmopt.stages import StageContext, quantize

    cfg, kernel = _configs()[case]
    ctx = StageContext("cuda", "bfloat16", False, progress=False, cache_root=kernel_cache)
    artifact = quantize.run(cfg, Artifact(tiny_model, "hf-checkpoint"), tmp_path, ctx)
    reference = load_model(artifact, "cuda", "bfloat16")
    fast, applied = kernels.accelerate(load_model(artifact, "cuda", "bfloat16"), artifact, "cuda", kernel, kernel_cache)
    expected = "int4pack" if kernel == "auto" else kernel
    assert applied.kernel == expected and applied.layers == LAYERS, applied
    if expected == "marlin":  # the packed weights are the model's own buffers (the benchmark's weight bytes)
        assert sum(name.endswith("marlin.qweight") for name, _ in fast.named_buffers()) + sum(
            name.endswith("marlin.qweight") for name, _ in fast.named_parameters()) == LAYERS - 8 * 3, "q/k/v+gate/up fused"
    if kernel == "auto":
        assert applied.reason.startswith("marlin: marlin runs act-order weights on tile-aligned shapes only"), applied
    tokenizer = load_tokenizer(tiny_model)
    prompt = torch.tensor([ids[:24]]).cuda()
    with torch.no_grad():
        greedy = reference.generate(prompt, max_new_tokens=8, do_sample=False)
    # the kernel's logits along the library's greedy text: each library token is the kernel's top
    # choice, or within bf16's resolution of it (logits near 10 carry about 0.06 of rounding)
    gap = _greedy_gap(fast, ids[:24], greedy[0, prompt.shape[1]:].tolist())
    ppl = [perplexity(m, ids, 128, 128, 16, False)["ppl"] for m in (reference, fast)]
    print(f"{case}: ppl library {ppl[0]:.4f} kernel {ppl[1]:.4f}; greedy gap {gap:.3f}; build {applied.build_s:.1f} s, "
          f"repack {applied.prepare_s:.1f} s")
    assert abs(ppl[1] / ppl[0] - 1) < 0.01, ppl
    assert gap <= 0.1, (gap, tokenizer.decode(greedy[0, prompt.shape[1]:]))


def test_compiled_runtime_runs_marlin_in_its_cuda_graph(tiny_model, kernel_cache, tmp_path):
    """The compiled decode step (fullgraph, CUDA graphs) captures the Marlin layers (a custom op),
    and the run's tag names the kernel that ran."""
    from llmopt.cache import Artifact
    from llmopt.methods.gptq_rtn import GptqRtnQuantize
    from llmopt.recipe import Benchmark
    from llmopt.stages import StageContext, benchmark, quantize

    ctx = StageContext("cuda", "bfloat16", False, progress=False, cache_root=kernel_cache)
    (tmp_path / "q").mkdir()
    artifact = quantize.run(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32),
                            Artifact(tiny_model, "hf-checkpoint"), tmp_path / "q", ctx)
    cfg = Benchmark(stage="benchmark", runtime="transformers-compiled", batch_sizes=[1, 8], input_tokens=32,
                    output_tokens=32, warmup=1, repeats=2)
    (tmp_path / "b").mkdir()
    result = benchmark.run(cfg, artifact, tmp_path / "b", ctx)
    assert result.info["environment"]["kernel"] == "marlin"
    assert result.metrics["kernel/layers"] == LAYERS and result.metrics["bench/output_tok_s/bs8"] > 0


def test_a_benchmarked_model_is_gone_before_the_next_is_measured(tiny_model, kernel_cache, tmp_path):
    """A bf16 base benchmarked after its quantized candidate in one process counted the candidate's
    whole model in its peak memory (7B, H100 and H200: the base's extra was the candidate's own
    batch-1 peak, Marlin and FP8 alike, with Marlin's layer list already weak). After a compiled-runtime
    benchmark stage and the runner's collection, no quantized layer may be alive and CUDA memory must
    be back where it was; on failure the message names what holds a layer, a few referrers deep."""
    import gc

    from llmopt.cache import Artifact
    from llmopt.kernels.linear import QuantLinear
    from llmopt.methods.gptq_rtn import GptqRtnQuantize
    from llmopt.recipe import Benchmark
    from llmopt.runner import release_memory
    from llmopt.stages import StageContext, benchmark, quantize

    ctx = StageContext("cuda", "bfloat16", False, progress=False, cache_root=kernel_cache)
    (tmp_path / "q").mkdir()
    artifact = quantize.run(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32),
                            Artifact(tiny_model, "hf-checkpoint"), tmp_path / "q", ctx)
    release_memory("cuda")
    before = torch.cuda.memory_allocated()
    cfg = Benchmark(stage="benchmark", runtime="transformers-compiled", kernel="marlin", batch_sizes=[1, 4],
                    input_tokens=32, output_tokens=16, warmup=1, repeats=1)
    (tmp_path / "b").mkdir()
    benchmark.run(cfg, artifact, tmp_path / "b", ctx)
    release_memory("cuda")
    alive = [o for o in gc.get_objects() if isinstance(o, QuantLinear)]
    count, first = len(alive), alive[0] if alive else None
    del alive  # not a holder the message should name
    assert not count, f"{count} quantized layers alive; held by: {_holders(first)}"
    assert torch.cuda.memory_allocated() - before < 1e6, (before, torch.cuda.memory_allocated())


def _holders(obj, depth: int = 8) -> list[str]:
    """The types (a dict's keys, a frame's function and line) on a chain of referrers up from `obj`:
    what keeps it alive. A frame counts: a finished frame that something keeps holds its locals
    (GPTQModel's kept import traceback held the loader's frames that way, until import_detached)."""
    import gc
    import inspect

    mine = {"_holders", "test_a_benchmarked_model_is_gone_before_the_next_is_measured"}
    chain, seen = [], {id(obj)}
    for _ in range(depth):
        referrers = [r for r in gc.get_referrers(obj) if id(r) not in seen
                     and not (inspect.isframe(r) and r.f_code.co_name in mine)
                     and not (isinstance(r, list) and any(x is obj for x in r) and len(r) > 50)]
        if not referrers:
            break
        obj = referrers[0]
        seen.add(id(obj))
        if inspect.isframe(obj):
            chain.append(f"frame({obj.f_code.co_name}:{obj.f_lineno})")
        else:
            chain.append(type(obj).__name__ + (f"{sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else ""))
    return chain


def test_compiled_runtime_decodes_what_generate_decodes(tiny_model, ids):
    """The compiled runtime (its decode step one CUDA graph) produces greedy decoding's tokens: the
    first 8 as `generate` (the module's tolerance: inductor's fusions round differently from eager),
    and a second run (graph replays after a cache reset) the first run's 24 exactly."""
    from llmopt.eval.runtimes.compiled import CompiledRuntime
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).to("cuda").eval()
    batch = [list(ids[:16]), list(ids[100:116])]  # equal lengths: no padding, so generate's rows are the same
    with torch.no_grad():
        expected = model.generate(torch.tensor(batch, device="cuda"), max_new_tokens=24, min_new_tokens=24,
                                  do_sample=False)[:, 16:]
    runtime = CompiledRuntime(model, "cuda")
    runtime.prepare(batch, 24)
    runtime.run(batch, 24)
    first = runtime.tokens.clone()
    assert torch.equal(first[:, :8], expected[:, :8]), (first, expected)
    runtime.run(batch, 24)
    assert torch.equal(runtime.tokens, first)


def test_compiled_runtime_decodes_a_left_padded_batch_as_generate_does(tiny_model, ids):
    """Prompts of different lengths, left-padded: the captured prefill's 4D mask and the decode
    step's mask keep each row to its own tokens, so each row's first 8 tokens are `generate`'s on the
    same padded batch."""
    from llmopt.eval.bench import _left_padded
    from llmopt.eval.runtimes.compiled import CompiledRuntime
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).to("cuda").eval()
    batch = [list(ids[:16]), list(ids[100:111])]
    padded, mask = _left_padded(batch, model.config.pad_token_id, "cuda")
    with torch.no_grad():
        expected = model.generate(padded, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                                  do_sample=False)[:, 16:]
    runtime = CompiledRuntime(model, "cuda")
    runtime.prepare(batch, 24)
    runtime.run(batch, 24)
    assert torch.equal(runtime.tokens[:, :8], expected[:, :8]), (runtime.tokens, expected)


@pytest.mark.parametrize("kernel", ["none", "marlin", "marlin-dense", "marlin-auto"])
def test_engine_rows_decode_what_greedy_decoding_decodes(kernel, tiny_model, ids, kernel_cache, tmp_path):
    """engine llmopt on CUDA: its decode steps (batches of 1 and 2 rows) compiled into CUDA graphs (Marlin's
    custom op inside for int4) and one prefill graph per batch (1, 2) and prompt width (32, 64), all
    captured at start; 5 requests of 5-40 tokens on 2 rows (rows reused, prompts left-padded, the
    keys read by FlexAttention's block lists), then 2 again: each of their 8 tokens is greedy
    decoding's choice, scored by whole forward passes on the same model along the engine's text, or
    within the module's 0.1 of it (bf16 logits near 10 carry about 0.06 of rounding, and the engine's
    attention and batch shapes round differently: on an H100 the Marlin case's second token of one
    request took the runner-up of a near-tie). `marlin-dense`: prefills of 40 rows or more (a 64-wide
    prompt) on the int4 weights dequantized by the compiled `dense_weight` inside the captured graph,
    the rest and every decode step on Marlin. `marlin-auto` (`dense_prefill_tokens: auto`): each of the 4
    prefill shapes captured both ways and timed, the faster kept; both times reported per shape."""
    from llmopt.engine import Engine
    from transformers import AutoModelForCausalLM

    if kernel == "none":
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).to("cuda").eval()
    else:
        from llmopt import kernels
        from llmopt.cache import Artifact
        from llmopt.methods.gptq_rtn import GptqRtnQuantize
        from llmopt.stages import StageContext, quantize

        ctx = StageContext("cuda", "bfloat16", False, progress=False, cache_root=kernel_cache)
        (tmp_path / "q").mkdir()
        artifact = quantize.run(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=32),
                                Artifact(tiny_model, "hf-checkpoint"), tmp_path / "q", ctx)
        dense = {"marlin-dense": 40, "marlin-auto": "auto"}.get(kernel, 0)
        model, applied = kernels.load_accelerated(artifact, "cuda", "bfloat16", False, "marlin", kernel_cache, dense)
        assert applied.kernel == "marlin" and ("products of 40+ rows dense" in applied.tag()) == (dense == 40)
    prompts = [list(ids[start:start + n]) for start, n in ((0, 16), (100, 11), (200, 40), (300, 5), (400, 27))]
    expected = [greedy_by_forward_passes(model, p, 8) for p in prompts]
    auto = kernel == "marlin-auto"
    engine = Engine(model, "cuda", slots=2, max_prompt=40, max_new=8, smallest_batch=1,
                    dense_prefill="auto" if auto else None).start()
    try:
        prefills = len(engine.batches) * len(engine.widths)
        assert engine.graphs_captured == len(engine.decode_sizes) + (2 if auto else 1) * prefills == (10 if auto else 6)
        choices = engine.stats()["engine"]["dense_prefill"]
        assert (choices is not None) == auto and (not auto or (
            len(choices) == prefills and all(c["kernel_ms"] > 0 and c["dense_ms"] > 0 for c in choices.values()))), choices
        if auto:
            print(f"engine marlin-auto prefill choices: {choices}")
        got = engine.complete(prompts, [8] * len(prompts))
        again = engine.complete(prompts[:2], [8, 8])
        assert min(engine.steps_by_batch.values()) > 0, engine.steps_by_batch
    finally:
        engine.stop()
    gaps = [_greedy_gap(model, p, tokens) for p, tokens in zip(prompts + prompts[:2], got + again, strict=True)]
    exact = sum(a == b for a, b in zip(got + again, expected + expected[:2], strict=True))
    print(f"engine {kernel}: {exact}/7 requests as greedy decoding exactly; largest gap {max(gaps):.3f}")
    assert max(gaps) <= 0.1, (gaps, got, expected)


def _greedy_gap(model, prompt: list[int], tokens: list[int]) -> float:
    """How far below the model's top logit each of `tokens` (made after `prompt`) scores, at most:
    0 for greedy decoding's own tokens."""
    seq = torch.tensor([prompt + tokens], device="cuda")
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(-1, seq[0, len(prompt):, None]).squeeze(-1)
    return (logits.max(-1).values - chosen).max().item()


def _int4_grid(n: int, k: int, g: torch.Generator):
    """A random symmetric 4-bit grid [n, k] in groups of 128 (scales 0.001-0.021)."""
    from llmopt.kernels.linear import QuantizedWeight

    return QuantizedWeight(torch.randint(0, 16, (n, k), generator=g).to(torch.uint8),
                           torch.rand(k // 128, n, generator=g) * 0.02 + 1e-3, 4, 128)


def test_marlin_dense_prefill_matches_the_kernel_and_the_grid(kernel_cache):
    """`keep_dense` beside Marlin: 512 rows (over the 256 threshold) run the compiled `dense_weight`
    and cuBLAS, and agree with the grid's float32 product to bf16 rounding, as Marlin's own product
    of the same rows does (within the module's 3%)."""
    from llmopt.kernels.linear import build_marlin, kernel_module, relative_error

    build_marlin(kernel_cache)
    g = torch.Generator().manual_seed(0)
    n, k = 512, 1024
    weight = _int4_grid(n, k, g)
    module = kernel_module("marlin", weight, "cuda", torch.bfloat16)
    module.keep_dense(weight, 256, "cuda", torch.bfloat16)
    x = torch.randn(512, k, generator=g).to("cuda", torch.bfloat16)
    with torch.no_grad():
        dense, marlin = module(x).float(), module._mm(x).float()
    reference = x.float() @ weight.dequantize().to("cuda").t()
    assert relative_error(dense, reference) < 1e-2 and relative_error(marlin, reference) < 3e-2


def _machete_or_skip(kernel_cache, kernel="machete"):
    """Machete on a Hopper GPU (the library LLMOPT_MACHETE_LIBRARY names, or llmopt's build), and Marlin's
    build for `machete+marlin`; elsewhere a skip that says why."""
    from llmopt.kernels import prepare, runs_on
    from llmopt.machine import gpus

    why = runs_on(kernel, "cuda", gpus()[0].sm)
    if why:
        pytest.skip(why)
    prepare(kernel, kernel_cache)


@pytest.mark.parametrize("kernel", ["machete", "machete+marlin"])
def test_machete_matches_the_grid_eager_compiled_and_in_a_cuda_graph(kernel, kernel_cache):
    """MacheteLinear (and MacheteMarlinLinear: Marlin at 1 and 16 rows, Machete at 64 and 512) on a
    symmetric 4-bit g128 grid: at a decode step's rows (1, 16, 64) and a prefill's (512) its product
    agrees with the grid's float32 product to bf16 rounding (within the module's 3%, as Marlin's);
    compiled (fullgraph, through the opaque `llmopt::kernel_mm`) and replayed from a CUDA graph it
    gives what it gives eagerly, to bf16 rounding."""
    from llmopt.kernels.linear import kernel_module, relative_error

    _machete_or_skip(kernel_cache, kernel)
    g = torch.Generator().manual_seed(0)
    n, k = 768, 1024
    weight = _int4_grid(n, k, g)
    module = kernel_module(kernel, weight, "cuda", torch.bfloat16)
    reference_weight = weight.dequantize().to("cuda")
    compiled = torch.compile(module, fullgraph=True)
    for m in (1, 16, 64, 512):
        x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        with torch.no_grad():
            eager = module(x).float()
            assert relative_error(eager, x.float() @ reference_weight.t()) < 3e-2, m
            # stream-K tiles may reduce their partial sums in another order from call to call: bf16 rounding apart
            assert relative_error(compiled(x).float(), eager) < 1e-2, m
            static = x.clone()
            graph = torch.cuda.CUDAGraph()
            module(static)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                out = module(static)
            static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert relative_error(out.float(), eager) < 1e-2, m


@pytest.mark.parametrize("kernel", ["machete", "machete+marlin"])
def test_engine_on_machete_decodes_what_greedy_decoding_decodes(kernel, kernel_cache, tmp_path):
    """engine llmopt with `kernel: machete` (or `machete+marlin`: its decode steps of 1-2 rows on Marlin,
    prefills of 32 rows and more on Machete): a random Llama of Machete's shapes (inputs in multiples of
    64, outputs of 128: hidden 256, MLP 512), 4-bit g128 by gptq_rtn, its decode steps and prefills
    captured with the kernels' ops inside; 4 requests on 2 rows, each token within 0.1 of the top logit
    of whole forward passes on the same model (random weights leave near-ties)."""
    from llmopt import kernels
    from llmopt.cache import Artifact
    from llmopt.engine import Engine
    from llmopt.eval.random_llama import random_llama
    from llmopt.methods.gptq_rtn import GptqRtnQuantize
    from llmopt.stages import StageContext, quantize

    _machete_or_skip(kernel_cache, kernel)
    path = random_llama(tmp_path / "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    ctx = StageContext("cuda", "bfloat16", False, progress=False, cache_root=kernel_cache)
    (tmp_path / "q").mkdir()
    artifact = quantize.run(GptqRtnQuantize(stage="quantize", method="gptq_rtn", bits=4, group_size=128),
                            Artifact(path, "hf-checkpoint"), tmp_path / "q", ctx)
    model, applied = kernels.load_accelerated(artifact, "cuda", "bfloat16", False, kernel, kernel_cache)
    assert applied.kernel == kernel and applied.layers == 2 * 7, applied
    prompts = [[1, *range(5 + 7 * i, 5 + 7 * i + n)] for i, n in enumerate((16, 11, 30, 5))]
    engine = Engine(model, "cuda", slots=2, max_prompt=32, max_new=8, smallest_batch=1).start()
    try:
        got = engine.complete(prompts, [8] * len(prompts))
    finally:
        engine.stop()
    gaps = [_greedy_gap(model, p, tokens) for p, tokens in zip(prompts, got, strict=True)]
    print(f"engine {kernel}: largest gap {max(gaps):.3f}")
    assert all(len(t) == 8 for t in got) and max(gaps) <= 0.1, (gaps, got)
