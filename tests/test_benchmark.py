"""The benchmark stage on CPU: the mechanics (figures are not meaningful here). Structure,
internal consistency of the timings, forced output length, memory arithmetic, what lands in
MLflow, and bad input refused before anything runs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import run_cli
from llmopt.cache import Artifact
from llmopt.eval import bench
from llmopt.eval.runtimes.eager import EagerRuntime
from llmopt.models import load_model
from llmopt.recipe import Benchmark
from llmopt.stages import StageContext, benchmark


def _cfg(**fields) -> Benchmark:
    return Benchmark.model_validate({"stage": "benchmark", "batch_sizes": [1, 3], "input_tokens": 24,
                                     "output_tokens": 12, "warmup": 1, "repeats": 3, "gpu_hourly_usd": 2.5,
                                     "memory_budget_gb": 0.01, **fields})


def test_metrics_are_consistent_with_each_other(tiny_model, tmp_path):
    ctx = StageContext("cpu", "float32", False, progress=False, cache_root=tmp_path / "cache")
    cfg = _cfg()
    artifact = benchmark.run(cfg, Artifact(tiny_model, "hf-checkpoint"), tmp_path, ctx)
    m = artifact.metrics
    config = load_model(Artifact(tiny_model, "hf-checkpoint"), "cpu", "float32").config
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    assert m["memory/kv_bytes_per_token"] == kv
    assert m["memory/kv_tokens_in_budget"] == (0.01e9 - m["memory/weights_gb"] * 1e9) // kv
    for bs in (1, 3):
        b = {k.split("/")[1]: v for k, v in m.items() if k.startswith("bench/") and k.endswith(f"/bs{bs}")}
        assert b["ttft_ms"] < b["e2e_ms"] <= b["e2e_ms_p90"] <= b["e2e_ms_p99"]
        assert b["itl_ms"] <= b["itl_ms_p90"] <= b["itl_ms_p99"]
        # the decode after the first token takes (output - 1) steps of about TPOT each
        assert b["ttft_ms"] + 11 * b["tpot_ms"] == pytest.approx(b["e2e_ms"], rel=0.25)
        assert b["output_tok_s"] * b["e2e_ms"] / 1000 == pytest.approx(bs * 12, rel=1e-9)
        assert b["total_tok_s"] / b["output_tok_s"] == pytest.approx((24 + 12) / 12)
        assert b["usd_per_1m_output_tokens"] == pytest.approx(2.5 / 3600 / b["output_tok_s"] * 1e6)
        assert 0 < b["roofline_fraction"] == pytest.approx(b["decode_bandwidth_gb_s"] / m["bench/bandwidth_measured_gb_s"])
    assert "bench/overhead_pct/bs1" in m and "bench/overhead_pct/bs3" not in m
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report["batches"]) == ["1", "3"] and len(report["batches"]["1"]["samples_s"]) == 3
    assert (tmp_path / "cache" / f"{benchmark.BANDWIDTH}.json").is_file(), "measured once per device, then reused"


class WholeCallsOnly(EagerRuntime):
    """A runtime that gets whole-call times only (as a non-streaming API would): the eager runtime
    timed without its per-token stamps, declaring the request metrics alone."""

    measures = bench.REQUEST_METRICS

    def run(self, batch, output_tokens, stamped=True):
        return super().run(batch, output_tokens, stamped=False)


def test_a_runtime_that_times_whole_calls_reports_no_token_metrics(tiny_model, tmp_path, monkeypatch):
    """No TTFT, ITL, TPOT or roofline from a runtime that did not see tokens arrive: in the metrics,
    report.json, and the table and plots `pair` makes."""
    monkeypatch.setattr(EagerRuntime, "open", classmethod(lambda cls, model, path, device, info: WholeCallsOnly(model, device)))
    ctx = StageContext("cpu", "float32", False, progress=False, cache_root=tmp_path / "cache")
    cfg = _cfg()
    artifact = benchmark.run(cfg, Artifact(tiny_model, "hf-checkpoint"), tmp_path, ctx)
    for bs in (1, 3):
        logged = {k.split("/")[1] for k in artifact.metrics if k.startswith("bench/") and k.endswith(f"/bs{bs}")}
        assert logged == {*bench.REQUEST_METRICS, "usd_per_1m_output_tokens"} | ({"overhead_pct"} if bs == 1 else set())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["not_measured"] == list(bench.TOKEN_METRICS) and "ttft_ms" not in report["batches"]["1"]
    paired = benchmark.pair(cfg, artifact, artifact)
    header = paired.files["benchmark.md"].decode().splitlines()[0]
    assert header == "| batch | output_tok_s (base) | e2e_ms (base) | usd_per_1m_output_tokens (base) |"
    assert not any("ttft" in k or "tpot" in k or "roofline" in k for k in paired.metrics)


class Tagged(EagerRuntime):
    """The eager runtime saying what it did to the model, as the compiled one does (fused groups)."""

    def tags(self):
        return {"fused_dense_groups": "16"}


def test_what_a_runtime_did_to_the_model_reaches_the_run_and_its_report(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(EagerRuntime, "open", classmethod(lambda cls, model, path, device, info: Tagged(model, device)))
    ctx = StageContext("cpu", "float32", False, progress=False, cache_root=tmp_path / "cache")
    artifact = benchmark.run(_cfg(batch_sizes=[1]), Artifact(tiny_model, "hf-checkpoint"), tmp_path, ctx)
    assert artifact.info["environment"]["fused_dense_groups"] == "16"
    assert json.loads((tmp_path / "report.json").read_text())["runtime_tags"] == {"fused_dense_groups": "16"}


def test_one_output_token_has_no_decode_step_to_time(tiny_model, tmp_path):
    """One output token: TTFT is the whole call; no ITL, TPOT or roofline (nothing divides by zero)."""
    ctx = StageContext("cpu", "float32", False, progress=False, cache_root=tmp_path / "cache")
    m = benchmark.run(_cfg(output_tokens=1, batch_sizes=[2]), Artifact(tiny_model, "hf-checkpoint"), tmp_path, ctx).metrics
    logged = {k.split("/")[1] for k in m if k.startswith("bench/") and k.endswith("/bs2")}
    assert logged == {*bench.REQUEST_METRICS, "ttft_ms", "ttft_ms_p90", "ttft_ms_p99", "usd_per_1m_output_tokens",
                      "overhead_pct"}
    assert m["bench/ttft_ms/bs2"] == m["bench/e2e_ms/bs2"]


def test_summarize_refuses_per_token_metrics_without_per_token_stamps():
    whole = [bench.Sample(0.0, [0.5], 8), bench.Sample(0.0, [0.6], 8)]
    assert set(bench.summarize(whole, 1, 4, 8, bench.REQUEST_METRICS)) == set(bench.REQUEST_METRICS)
    with pytest.raises(ValueError, match=r"one stamp per token: \[1, 1\] stamps for 8 tokens"):
        bench.summarize(whole, 1, 4, 8, bench.REQUEST_METRICS + bench.TOKEN_METRICS)


def test_output_length_is_forced_past_eos(tiny_model):
    """A model that always prefers EOS still generates the asked-for number of tokens."""
    model = load_model(Artifact(tiny_model, "hf-checkpoint"), "cpu", "float32")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[model.config.eos_token_id] = 10.0
    runtime = EagerRuntime(model, "cpu")
    sample = runtime.run(bench.prompts(2, 8, model.config.vocab_size, 0), 9)
    assert sample.new_tokens == 9 and len(sample.stamps) == 9 and sample.stamps == sorted(sample.stamps)


def test_a_short_generation_is_refused():
    class Short:
        name = "short"

        def prepare(self, batch, output_tokens):
            pass

        def run(self, batch, output_tokens, stamped=True):
            return bench.Sample(0.0, [0.1], output_tokens - 1)

    with pytest.raises(RuntimeError, match="generated 7 tokens, not the forced 8"):
        bench.measure(Short(), [[1, 2]], 8, warmup=0, repeats=2)


def test_energy_per_token_is_the_energy_of_the_timed_calls_only(monkeypatch):
    """Energy is read around each timed call (warm-up excluded): per output token and as mean power.
    The meter is llmopt's NVML reader over a board whose counter (millijoules) the calls advance."""
    import pynvml
    from llmopt.eval import nvml

    class Steady:  # each call takes 2 s and the board draws 300 W, so 600 J per call
        name = "steady"
        joules = 0.0

        def prepare(self, batch, output_tokens):
            pass

        def run(self, batch, output_tokens, stamped=True):
            Steady.joules += 600.0
            return bench.Sample(0.0, [2.0 * (i + 1) / output_tokens for i in range(output_tokens)], output_tokens)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", lambda handle: round(Steady.joules * 1000))
    samples = bench.measure(Steady(), [[1, 2]] * 4, 10, warmup=2, repeats=3, gpu=nvml.Gpu(pynvml.c_nvmlDevice_t()))
    assert [s.extra["energy_j"] for s in samples] == [600.0] * 3
    row = bench.summarize(samples, 4, 2, 10)
    assert row["energy_j_per_output_token"] == pytest.approx(600 / 40)
    assert row["power_w"] == pytest.approx(300)
    assert "energy_j_per_output_token" not in bench.summarize(bench.measure(Steady(), [[1]], 10, 0, 2), 1, 1, 10)


def test_no_nvml_figures_off_cuda():
    from llmopt.eval import nvml

    assert nvml.open_gpu("cpu") is None


def test_no_nvml_figures_without_the_driver_library(monkeypatch):
    """No libnvidia-ml (CPU machines, CI): no GPU handle, no driver version, and so no energy figures."""
    import pynvml
    from llmopt.eval import nvml

    def missing():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    assert nvml.open_gpu("cuda") is None and nvml.open_gpu("cuda:0") is None
    assert nvml.driver_version() is None


def test_a_board_that_does_not_count_energy_gives_no_energy_figures(monkeypatch):
    import pynvml
    from llmopt.eval import nvml

    def not_supported(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", not_supported)
    gpu = nvml.Gpu(pynvml.c_nvmlDevice_t())
    assert gpu.energy_j() is None

    class OneToken:
        name = "one-token"

        def prepare(self, batch, output_tokens):
            pass

        def run(self, batch, output_tokens, stamped=True):
            return bench.Sample(0.0, [1.0], output_tokens)

    samples = bench.measure(OneToken(), [[1]], 1, warmup=0, repeats=2, gpu=gpu)
    assert all("energy_j" not in s.extra for s in samples)
    assert "energy_j_per_output_token" not in bench.summarize(samples, 1, 1, 1)


def test_percentiles():
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == pytest.approx(50.5)
    assert bench.percentile(values, 99) == pytest.approx(99.01)
    assert bench.percentile([3.0], 90) == 3.0


def test_prompt_lengths_follow_the_distribution():
    spec = Benchmark.model_validate({"stage": "benchmark", "input_tokens": {"mean": 40, "stdev": 5}}).input_tokens
    lengths = [len(p) for p in bench.prompts(400, spec, 1000, 0)]
    assert 38 < sum(lengths) / len(lengths) < 42 and len(set(lengths)) > 5
    assert bench.prompts(3, 16, 1000, 0) == bench.prompts(3, 16, 1000, 0), "seeded"


def test_benchmark_in_the_pipeline_lands_in_mlflow(tiny_workdir, tmp_path):
    import mlflow

    recipe = tmp_path / "b.yaml"
    recipe.write_text("name: b\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: quantize\n    method: rtn\n"
                      "    bits: 4\n    group_size: 32\n  - stage: benchmark\n    batch_sizes: [1, 2]\n    input_tokens: 16\n"
                      "    output_tokens: 8\n    warmup: 1\n    repeats: 2\n")
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    client = mlflow.MlflowClient(f"sqlite:///{tiny_workdir['mlruns'] / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("b").experiment_id],
                                filter_string="tags.llmopt.stage = 'benchmark'")
    m = run.data.metrics
    for name in ("output_tok_s", "ttft_ms", "tpot_ms", "itl_ms_p99", "e2e_ms_p90", "requests_s", "roofline_fraction"):
        assert f"bench/{name}/bs1" in m and f"bench/{name}/bs2_base" in m, name
    assert "memory/kv_bytes_per_token" in m and "memory/weights_gb_base" in m
    tags = run.data.tags
    assert tags["env.runtime"] == "transformers-eager" and tags["env.torch"] == torch.__version__
    assert tags["env.cpu_threads"] == str(torch.get_num_threads())  # CPU figures depend on it
    # how the base ran, where it differs from the candidate: its kernel; shared settings are not repeated
    # auto on CPU runs the tiny model's small products dequantized (tests/test_kernels.py), and says so
    assert tags["env.kernel"].startswith("dequantized (every quantized product is under 262144 weights")
    assert tags["env.base.kernel"] == "none (not quantized)"
    assert "env.base.torch" not in tags and "env.base.runtime" not in tags
    files = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert files == {"plots/latency_vs_batch.png", "plots/throughput_vs_batch.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"benchmark.md", "candidate", "base"}
    # the run log says where the stage is, bars or not: each model loaded, each batch size measured (candidate, base)
    (log_file,) = (tiny_workdir["cache"] / "logs").glob("*-b.log")
    said = log_file.read_text()
    assert said.count("INFO benchmark: ") == 2 and "kernel dequantized (" in said
    for bs in (1, 2):
        lines = [line for line in said.splitlines() if f"benchmark transformers-eager batch {bs}: " in line]
        assert len(lines) == 2, said
        assert f"{m[f'bench/output_tok_s/bs{bs}']:.1f} output tok/s" in lines[0]


BAD = {
    "batch size 0": ("batch_sizes: [0, 4]", "stages[0].batch_sizes", "batch size 0: every batch size must be at least 1"),
    "output beyond context": ("output_tokens: 500", "stages[0].output_tokens",
                              "500 output after 128 input tokens exceed the model's context of 512"),
    "runtime not installed": ("runtime: trtllm", "stages[0]", "needs tensorrt_llm, which is not installed"),
    "negative price": ("gpu_hourly_usd: -1.0", "stages[0].gpu_hourly_usd", "is negative"),
    "cuda-only runtime on cpu": ("runtime: transformers-compiled", "stages[0].runtime", "runs on CUDA only"),
}


def test_compiled_runtime_over_bitsandbytes_is_refused(workdir, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nmodel: {embedded: tiny-llama}\nstages:\n  - stage: quantize\n    method: bnb\n"
                      "    bits: 4\n  - stage: benchmark\n    runtime: transformers-compiled\n")
    assert run_cli(workdir, "run", str(recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert "stages[1].runtime: transformers-compiled over a bitsandbytes model is not supported" in err
    assert not workdir["mlruns"].exists() and not workdir["cache"].exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA-only cases need a machine without CUDA")
@pytest.mark.parametrize("case", sorted(BAD), ids=str)
def test_bad_benchmark_input_exit_2_nothing_written(case, workdir, tmp_path, capsys):
    body, field, words = BAD[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: bad\nmodel: {{embedded: tiny-llama}}\nstages:\n  - stage: benchmark\n    {body}\n")
    assert run_cli(workdir, "run", str(recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err and words in err, err
    assert not workdir["mlruns"].exists() and not workdir["cache"].exists()


def test_the_random_llama_decodes_to_text_token_by_token(tmp_path):
    """The benchmarks' random Llama (32000 rows, a tokenizer of some 500 tokens) greedily picks only tokens that
    decode to text, so a server streams it token by token (its TTFT and ITL are then per token)."""
    from llmopt.eval.random_llama import random_llama, visible
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = random_llama(tmp_path / "m", device="cpu", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    size = len(tokenizer)
    assert model.config.vocab_size == 32000 and 256 < size < 32000
    rows = model.lm_head.weight.abs().sum(dim=1)
    assert (rows[size:] == 0).all() and (rows[:2] == 0).all()  # past the tokenizer, and <s> </s>
    assert (rows[:size] > 0).sum() > 0.5 * size  # the visible tokens keep their random rows
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    new = model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert max(new) < size and len(set(new)) > 1
    assert all(visible(tokenizer.decode([t])) for t in new)
    # a streaming detokenizer's text grows with every token
    lengths = [len(tokenizer.decode(new[:i])) for i in range(1, len(new) + 1)]
    assert all(b > a for a, b in zip(lengths, lengths[1:], strict=False)), lengths


@pytest.mark.parametrize("lengths", [(16, 16), (16, 9)], ids=["no padding", "left padding"])
def test_the_compiled_prefill_is_given_the_mask_the_model_would_make(tiny_model, lengths, monkeypatch):
    """The compiled runtime captures its prefill in a CUDA graph (CUDA only; tests/test_gpu_kernels.py
    checks its tokens against `generate`), so it makes the prefill's 4D mask itself, beforehand.
    On CPU: given `prefill_inputs`, the model makes no mask of its own (a captured call cannot: the
    mask maker is made to fail here), its last logits equal the 2D-mask prefill's, and greedy decoding
    from the cache it filled gives the same tokens."""
    import transformers.masking_utils as masking
    from llmopt.eval.bench import _left_padded
    from llmopt.eval.runtimes.compiled import EagerPrefill, prefill_inputs
    from transformers import AutoModelForCausalLM, StaticCache

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = [[(7 * i + 3 * row) % 500 + 3 for i in range(n)] for row, n in enumerate(lengths)]
    ids, prompt_mask = _left_padded(batch, model.config.pad_token_id, "cpu")
    width, out = ids.shape[1], 8

    def prefill_and_decode(four_d: bool):
        cache = StaticCache(config=model.config, max_cache_len=width + out)
        with torch.no_grad():
            if four_d:
                inputs, capturable = prefill_inputs(model, cache, ids, prompt_mask)
                assert capturable
                with monkeypatch.context() as m:
                    m.setitem(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa",
                              lambda *a, **k: pytest.fail("the model made its own mask"))
                    logits = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            else:
                logits = model(input_ids=ids, attention_mask=prompt_mask, position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
                               cache_position=torch.arange(width), past_key_values=cache, use_cache=True).logits[:, -1]
            mask = torch.cat([prompt_mask, torch.ones(len(batch), out, dtype=torch.long)], 1)
            token, tokens = logits.argmax(-1, keepdim=True), []
            for i in range(out):
                tokens.append(token)
                step = model(input_ids=token, position_ids=prompt_mask.sum(-1, keepdim=True) + i,
                             cache_position=torch.tensor([width + i]), attention_mask=mask, past_key_values=cache,
                             use_cache=True).logits[:, -1]
                token = step.argmax(-1, keepdim=True)
        return logits, torch.cat(tokens, 1)

    inputs, _ = prefill_inputs(model, StaticCache(config=model.config, max_cache_len=width + out), ids, prompt_mask)
    assert inputs["attention_mask"].shape == (len(batch), 1, width, width + out)
    expected_logits, expected_tokens = prefill_and_decode(False)
    logits, tokens = prefill_and_decode(True)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
    # the eager prefill (attentions without a 4D mask: the inputs with the 2D mask) picks the 2D-mask prefill's first tokens
    with torch.no_grad():
        first = EagerPrefill(model, StaticCache(config=model.config, max_cache_len=width + out),
                             {**inputs, "attention_mask": prompt_mask}).replay()
    assert torch.equal(first, expected_tokens[:, :1])


@pytest.mark.parametrize("change, named", [({"_attn_implementation": "flash_attention_2"}, "'flash_attention_2'"),
                                           ({"sliding_window": 32}, "'sdpa, with a sliding window'")],
                         ids=["flash attention", "sliding window"])
def test_a_model_without_one_causal_mask_keeps_the_prefill_eager_and_says_so(tiny_model, caplog, change, named):
    """Flash attention takes the 2D mask, and a sliding-window model makes its own kind of mask:
    `prefill_inputs` says the call cannot be captured and keeps the 2D mask (the runtime then runs the
    eager prefill), and warns that TTFT includes the prefill's launches."""
    from llmopt.eval.bench import _left_padded
    from llmopt.eval.runtimes.compiled import _eager_prefill_warning, prefill_inputs
    from transformers import AutoModelForCausalLM, StaticCache

    _eager_prefill_warning.cache_clear()  # it warns once per attention implementation and process
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for name, value in change.items():  # only the mask is made: flash-attn need not be installed
        setattr(model.config, name, value)
    ids, prompt_mask = _left_padded([[5, 6, 7, 8], [9, 10]], model.config.pad_token_id, "cpu")
    with caplog.at_level(logging.WARNING, logger="llmopt"):
        inputs, capturable = prefill_inputs(model, StaticCache(config=model.config, max_cache_len=12), ids, prompt_mask)
    assert not capturable and inputs["attention_mask"] is prompt_mask
    assert f"attention {named}: no single 4D causal mask, so the compiled runtime's prefill runs eagerly" in caplog.text
