"""ModelOpt quantization and TensorRT-LLM bundles, on CPU without TensorRT-LLM: the fake-quantized
model rebuilt exactly, the preflight table, manifests and checksums, checkpoint schemas, the
command lines against the documented flags, and the recipes end to end (honest about not building).

One test runs a MOCKED trtllm-build / python3 (shell scripts in a launcher's bin_dir): it checks
llmopt's command lines and bookkeeping when a launcher is reachable, never that an engine works."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import RECIPES, run_cli
from llmopt.cache import Artifact
from llmopt.export import checkpoint, manifest, modelopt, support, trtllm
from llmopt.models import load_model
from llmopt.recipe import Compile

# --- the fake-quantized model, rebuilt in another process -----------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "int8_sq", "w4a8_awq"])
def test_fake_quantized_model_is_rebuilt_exactly(fmt, tiny_model, tmp_path):
    """AWQ and SmoothQuant rescale weights during calibration: the saved state must carry them."""
    base = Artifact(tiny_model, "hf-checkpoint")
    model = load_model(base, "cpu", "float32")
    ids = torch.randint(3, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    before = modelopt.fingerprints(model)
    model = modelopt.quantize(model, fmt, 64, None, [ids[i:i + 2] for i in range(0, 8, 2)])
    probe = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        expected = model(probe).logits
        reference = load_model(base, "cpu", "float32")(probe).logits
    modelopt.save_state(model, tmp_path / "state", {"format": fmt, "group_size": 64, "kv_cache": None}, before)
    rebuilt = modelopt.restore(load_model(base, "cpu", "float32"), tmp_path / "state")
    with torch.no_grad():
        got = rebuilt(probe).logits
    assert (expected - reference).abs().max() > 1e-3, "quantization changed the model"
    assert torch.equal(got, expected)


# --- preflight -----------------------------------------------------------------------------------


def test_preflight_accepts_every_supported_route_at_its_minimum_gpu():
    for fmt in support.FORMATS:
        for target in support.TARGETS:
            if (fmt, target) in support.UNSUPPORTED:
                continue
            need = support.MIN_SM[fmt]
            assert support.check(fmt, target, need, "1.2.0").ok, (fmt, target)
            assert support.check(fmt, target, 120, "1.2.0").ok, (fmt, target)
            refused = support.check(fmt, target, need - 1, "1.2.0")
            assert not refused.ok and "compute capability" in refused.reason and refused.alternative


@pytest.mark.parametrize(("fmt", "target", "sm", "version", "reason", "alternative"), [
    ("bnb", "trtllm", 90, "1.2.0", "bitsandbytes", "modelopt"),
    ("bnb", "trtllm-engine", 90, "1.2.0", "bitsandbytes", "int4_awq"),
    ("nvfp4", "trtllm", 90, "1.2.0", "needs compute capability 10.0", "fp8"),
    ("int8_sq", "trtllm", 90, "1.2.0", "engine", "trtllm-engine"),
    ("gptq_desc_act", "trtllm-engine", 90, "1.2.0", "desc_act", "desc_act: false"),
    ("fp8", "trtllm", 80, "1.2.0", "8.9", "int4_awq"),
    ("w4a8_awq", "trtllm-engine", 86, "1.2.0", "8.9", "int4_awq"),
    ("int4_awq", "trtllm-engine", 90, "1.3.0", "no engine route", "target: trtllm"),
    ("fp8", "trtllm", 90, "0.21.0", "PyTorch backend", "1.0"),
])
def test_preflight_refuses_with_reason_and_alternative(fmt, target, sm, version, reason, alternative):
    verdict = support.check(fmt, target, sm, version)
    assert not verdict.ok and reason in verdict.reason and alternative in verdict.alternative


def test_valid_routes_on_current_gpus():
    assert support.check("int8_sq", "trtllm-engine", 80, "1.2.0").ok
    assert support.check("nvfp4", "trtllm", 100, "1.2.0").ok
    assert support.check("gptq", "trtllm", 80, "1.2.0").ok
    assert support.check("bf16", "trtllm-engine", 80, "1.0.0").ok


def test_gpu_names_and_capabilities():
    assert support.parse_sm("H100") == support.parse_sm("h100-sxm") == support.parse_sm("sm_90") == 90
    assert support.parse_sm("8.9") == support.parse_sm("L40S") == 89
    with pytest.raises(ValueError, match="unknown GPU"):
        support.parse_sm("Voodoo5")


_RECIPE = """name: bad
model: {{embedded: tiny-llama}}
stages:
  - stage: quantize
{quantize}{rest}"""
CAL = "    calibration: {dataset: {embedded: tiny-stories}, num_samples: 8, seq_len: 32}\n"

BAD = {
    "bnb to trtllm": ("    method: bnb\n    bits: 4\n", "  - stage: compile\n    gpu: H100\n",
                      "stages[1].target", "bitsandbytes checkpoints do not load"),
    "nvfp4 on H100": ("    method: modelopt\n    format: nvfp4\n" + CAL, "  - stage: compile\n    gpu: H100\n",
                      "stages[1].target", "nearest valid route: format: fp8"),
    "int8_sq on pytorch backend": ("    method: modelopt\n    format: int8_sq\n" + CAL, "  - stage: compile\n    gpu: A100\n",
                                   "stages[1].target", "target: trtllm-engine"),
    "gptq desc_act to engine": ("    method: gptq\n    bits: 4\n    desc_act: true\n" + CAL,
                                "  - stage: compile\n    target: trtllm-engine\n    gpu: H100\n",
                                "stages[1].target", "desc_act"),
    "fp8 kv cache on A100": ("    method: modelopt\n    format: int4_awq\n    group_size: 64\n    kv_cache: fp8\n" + CAL,
                             "  - stage: compile\n    gpu: A100\n", "stages[1].gpu", "kv_cache: fp8 needs"),
    "group size wider than the model": ("    method: modelopt\n    format: int4_awq\n" + CAL, "",
                                        "stages[0].group_size", "does not divide the model's hidden_size"),
    "timing fake quantization": ("    method: modelopt\n    format: fp8\n" + CAL, "  - stage: benchmark\n",
                                 "stages[1].runtime", "fake quantization"),
    "evaluate after compile": ("    method: modelopt\n    format: fp8\n" + CAL,
                               "  - stage: compile\n    gpu: H100\n  - stage: evaluate\n"
                               "    perplexity: {dataset: {embedded: tiny-stories}}\n",
                               "stages", "compile makes"),
    "unknown gpu": ("    method: modelopt\n    format: fp8\n" + CAL, "  - stage: compile\n    gpu: Voodoo5\n",
                    "stages[1].gpu", "unknown GPU"),
    "tp wider than the kv heads": ("    method: modelopt\n    format: fp8\n" + CAL,
                                   "  - stage: compile\n    gpu: H100\n    tp: 4\n",
                                   "stages[1].tp", "does not divide the model's 2 key-value heads"),
    "sequence longer than the context": ("    method: modelopt\n    format: fp8\n" + CAL,
                                         "  - stage: compile\n    gpu: H100\n    max_input_len: 512\n    max_seq_len: 1024\n",
                                         "stages[1].max_seq_len", "exceeds the model's context"),
}


@pytest.mark.parametrize("case", sorted(BAD), ids=str)
def test_bad_compile_recipe_exit_2_nothing_written(case, workdir, tmp_path, capsys):
    quantize, rest, field, words = BAD[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(_RECIPE.format(quantize=quantize, rest=rest))
    assert run_cli(workdir, "run", str(recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(recipe) in err and field in err and words in err, err
    assert not workdir["mlruns"].exists() and not workdir["cache"].exists()


# --- command lines -------------------------------------------------------------------------------


def _flags(command: list[str]) -> set[str]:
    return {part for part in command[1:] if part.startswith("-") or part in trtllm.DOCUMENTED_FLAGS[command[0]]}


@pytest.mark.parametrize("target", ["trtllm", "trtllm-engine"])
def test_command_lines_use_documented_flags_only(target):
    cfg = Compile(stage="compile", target=target, gpu="H100", tp=2, max_batch_size=32, max_num_tokens=4096,
                  cuda_graph_batch_sizes=[1, 8, 32])
    commands = [trtllm.serve_command(cfg, "checkpoint"), *trtllm.bench_commands(cfg, "m")]
    if target == "trtllm-engine":
        commands.append(trtllm.build_command(cfg, trtllm.TRTLLM_CHECKPOINT, trtllm.ENGINE))
    for command in commands:
        unknown = _flags(command) - trtllm.DOCUMENTED_FLAGS[command[0]]
        assert not unknown, (command[0], unknown)
    serve = commands[0]
    assert serve[serve.index("--backend") + 1] == ("pytorch" if target == "trtllm" else "tensorrt")
    if target == "trtllm":
        assert serve[serve.index("--tp_size") + 1] == "2" and serve[serve.index("--max_num_tokens") + 1] == "4096"
        assert serve[serve.index("--extra_llm_api_options") + 1] == trtllm.OPTIONS_FILE
        options = trtllm.llm_api_options(cfg, "fp8")
        assert options["tensor_parallel_size"] == 2 and options["kv_cache_config"]["dtype"] == "fp8"
        assert options["cuda_graph_config"]["batch_sizes"] == [1, 8, 32]
    else:
        build = commands[-1]
        assert build[build.index("--checkpoint_dir") + 1] == trtllm.TRTLLM_CHECKPOINT
        assert build[build.index("--max_batch_size") + 1] == "32" and build[build.index("--kv_cache_type") + 1] == "paged"


# --- the recipes end to end, manifests, verify ----------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """tiny-fp8-trtllm and tiny-int4awq-trtllm run once (no TensorRT-LLM here): their bundle paths."""
    work = tmp_path_factory.mktemp("trtllm")
    dirs = {"cache": work / "cache", "mlruns": work / "mlruns"}
    out = {"mlruns": dirs["mlruns"]}
    for name in ("tiny-fp8-trtllm", "tiny-int4awq-trtllm"):
        assert run_cli(dirs, "run", str(RECIPES / f"{name}.yaml")) == 0
        client = mlflow.MlflowClient(f"sqlite:///{dirs['mlruns'] / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(name)
        (stage,) = client.search_runs([experiment.experiment_id], "tags.`llmopt.stage` = 'compile'")
        out[name] = dirs["cache"] / "stages" / stage.data.tags["llmopt.cache_key"]
        out[f"{name}/run"] = stage
    return out


def test_recipes_write_bundles_and_say_nothing_was_built(bundles):
    fp8 = bundles["tiny-fp8-trtllm/run"]
    assert fp8.data.metrics["trtllm/built"] == 0 and "not installed here" in fp8.data.tags["trtllm.reason"]
    awq = bundles["tiny-int4awq-trtllm/run"]
    assert awq.data.metrics["trtllm/built"] == 0 and "release:1.2.0" in awq.data.tags["trtllm.reason"]
    pytorch_bundle, engine_bundle = bundles["tiny-fp8-trtllm"], bundles["tiny-int4awq-trtllm"]
    quant = json.loads((pytorch_bundle / trtllm.CHECKPOINT / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8" and quant["kv_cache_quant_algo"] == "FP8"
    config = json.loads((engine_bundle / trtllm.TRTLLM_CHECKPOINT / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W4A16_AWQ" and config["quantization"]["group_size"] == 64
    assert not (engine_bundle / trtllm.ENGINE).exists(), "no engine without TensorRT-LLM"
    for bundle in (pytorch_bundle, engine_bundle):
        m = json.loads((bundle / manifest.MANIFEST).read_text())
        assert m["build"]["built"] is False and m["target"]["compute_capability"] == "9.0"
        assert set(m["files"]) == set(manifest.file_digests(bundle))
        assert m["producer"]["versions"]["nvidia-modelopt"] == "0.47.0"
        script = (bundle / trtllm.COMMANDS_FILE).read_text()
        assert all(line in script for line in m["commands"].values())
    client = mlflow.MlflowClient(f"sqlite:///{bundles['mlruns'] / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(fp8.info.run_id, "candidate")}
    assert {"candidate/manifest.json", "candidate/commands.sh", "candidate/extra_llm_api_options.yaml"} <= logged


def test_quality_is_measured_on_the_fake_quantized_model(bundles):
    client = mlflow.MlflowClient(f"sqlite:///{bundles['mlruns'] / 'mlflow.db'}")
    run = bundles["tiny-fp8-trtllm/run"]
    (evaluate,) = client.search_runs([run.info.experiment_id], "tags.`llmopt.stage` = 'evaluate'")
    m = evaluate.data.metrics
    # near the base, not equal to it (the quantizers act), and nowhere near a garbage reload
    assert 0 < abs(m["quality/ppl_delta_pct"]) < 5 and m["quality/kl_base"] > 0
    assert m["quality/tiny_sums/acc"] > 0.8


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(bundle, dest)
    return dest


def test_verify_passes_a_fresh_bundle_and_catches_a_flipped_byte(bundles, tmp_path, capsys):
    from llmopt.cli import main

    bundle = _copy(bundles["tiny-int4awq-trtllm"], tmp_path)
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "files match" in out and "cannot load on this machine" in out and "tensorrt_llm is not installed" in out
    assert main(["verify", str(bundle), "--require-loadable"]) == 1
    weights = bundle / trtllm.TRTLLM_CHECKPOINT / "rank0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["verify", str(bundle)]) == 1
    assert "trtllm-checkpoint/rank0.safetensors: sha256" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "absent")]) == 2


def _header_flipped(raw: bytes) -> bytes:
    """One bit flipped inside the JSON header (the quote before the first `dtype`): invalid JSON."""
    (length,) = struct.unpack("<Q", raw[:8])
    at = 8 + raw[8:8 + length].index(b'"dtype"')
    assert at < 8 + length
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


CORRUPT = {
    "flipped header byte": _header_flipped,
    "truncated in the header": lambda raw: raw[:8 + struct.unpack("<Q", raw[:8])[0] // 2],
    "absurd header length": lambda raw: struct.pack("<Q", 2**62) + raw[8:],
}


@pytest.mark.parametrize("corrupt", sorted(CORRUPT), ids=str)
@pytest.mark.parametrize(("recipe", "shard"), [("tiny-int4awq-trtllm", "trtllm-checkpoint/rank0.safetensors"),
                                               ("tiny-fp8-trtllm", "checkpoint/model.safetensors")], ids=["engine", "pytorch"])
def test_verify_reports_a_corrupt_safetensors_header_as_damage(recipe, shard, corrupt, bundles, tmp_path, capsys):
    """A header that does not parse is a finding naming the file (exit 1), not a traceback."""
    from llmopt.cli import main

    bundle = _copy(bundles[recipe], tmp_path)
    path = bundle / shard
    path.write_bytes(CORRUPT[corrupt](path.read_bytes()))
    assert main(["verify", str(bundle)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"DAMAGED  {bundle}"
    assert f"    {shard}: sha256 does not match the manifest" in "\n".join(out)
    (finding,) = [line for line in out if "not a readable safetensors file" in line]
    assert finding.startswith(f"    {shard}: not a readable safetensors file (Error while deserializing header")
    assert not any("is missing" in line for line in out), "an unreadable shard is reported once, not per tensor"


@pytest.mark.parametrize("name", ["trtllm-checkpoint/config.json", manifest.MANIFEST])
def test_verify_reports_corrupt_json_as_damage(name, bundles, tmp_path, capsys):
    from llmopt.cli import main

    bundle = _copy(bundles["tiny-int4awq-trtllm"], tmp_path)
    raw = (bundle / name).read_bytes()
    (bundle / name).write_bytes(raw[:1] + bytes([raw[1] ^ 0x80]) + raw[2:])  # not UTF-8 any more
    assert main(["verify", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"DAMAGED  {bundle}\n") and f"    {name}: not valid JSON (" in out


def test_verify_reports_added_and_missing_files(bundles, tmp_path):
    bundle = _copy(bundles["tiny-fp8-trtllm"], tmp_path)
    (bundle / "extra.txt").write_text("x")
    (bundle / trtllm.CHECKPOINT / "tokenizer.json").unlink()
    problems = manifest.verify(bundle).structure
    assert any("extra.txt: not in the manifest" in p for p in problems)
    assert any("tokenizer.json: listed in the manifest but missing" in p for p in problems)


def test_schema_catches_a_wrong_quant_algo(bundles, tmp_path):
    ckpt = _copy(bundles["tiny-int4awq-trtllm"], tmp_path) / trtllm.TRTLLM_CHECKPOINT
    assert checkpoint.check_trtllm_checkpoint(ckpt) == []
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization"]["quant_algo"] = "W4A16_AWQQ"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert checkpoint.check_trtllm_checkpoint(ckpt) == [
        "config.json: quantization.quant_algo 'W4A16_AWQQ' is not a TensorRT-LLM QuantAlgo"]


def _drop_tensor(path: Path, name: str) -> None:
    """Rewrite a safetensors file without one tensor: a well-formed file (header and data agree), as
    an export that left the tensor out would write."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata)


def test_schema_catches_a_missing_tensor_and_a_wrong_shape(bundles, tmp_path):
    ckpt = _copy(bundles["tiny-int4awq-trtllm"], tmp_path) / trtllm.TRTLLM_CHECKPOINT
    _drop_tensor(ckpt / "rank0.safetensors", "transformer.layers.3.mlp.proj.weight")
    assert checkpoint.check_trtllm_checkpoint(ckpt) == [
        "rank0.safetensors: tensor transformer.layers.3.mlp.proj.weight is missing"]
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 128  # the header's MLP weights are 256 wide
    (ckpt / "config.json").write_text(json.dumps(config))
    assert any("mlp.fc.weight has shape [128, 64], expected [64, 64]" in p
               for p in checkpoint.check_trtllm_checkpoint(ckpt))


def test_hf_checkpoint_schema(bundles, tmp_path):
    ckpt = _copy(bundles["tiny-fp8-trtllm"], tmp_path) / trtllm.CHECKPOINT
    assert checkpoint.check_hf_checkpoint(ckpt) == []
    _drop_tensor(ckpt / "model.safetensors", "model.layers.2.self_attn.k_proj.weight")
    assert checkpoint.check_hf_checkpoint(ckpt) == ["checkpoint: tensor model.layers.2.self_attn.k_proj.weight is missing"]


# --- MOCKED TensorRT-LLM: command lines and bookkeeping only, never an engine ----------------------


def _mock_trtllm(bin_dir: Path, record: Path, smoke_tokens: int) -> None:
    """MOCK: `trtllm-build` records its arguments and writes a placeholder engine directory;
    `python3` answers the version probe and prints the smoke line. Not TensorRT-LLM."""
    bin_dir.mkdir()
    (bin_dir / "trtllm-build").write_text(
        f'#!/bin/sh\necho "$@" > {record}\nmkdir -p engine && echo mock > engine/MOCK_NOT_AN_ENGINE\n')
    smoke = json.dumps({"text": " mock", "tokens": smoke_tokens, "tensorrt_llm": "0.0.0-mock"})
    (bin_dir / "python3").write_text(
        f"#!/bin/sh\nif [ \"$1\" = -c ]; then echo 0.0.0-mock; else echo 'LLMOPT_SMOKE {smoke}'; fi\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


@pytest.mark.parametrize("smoke_tokens", [8, 3], ids=["smoke-ok", "smoke-short"])
def test_mocked_launcher_runs_our_build_and_smoke_commands(smoke_tokens, tiny_workdir, tmp_path):
    """MOCKED trtllm-build: checks the command llmopt runs and what it records, not an engine."""
    bin_dir, record = tmp_path / "bin", tmp_path / "build-args.txt"
    _mock_trtllm(bin_dir, record, smoke_tokens)
    recipe = tmp_path / "mocked.yaml"
    recipe.write_text(_RECIPE.format(
        quantize="    method: modelopt\n    format: int4_awq\n    group_size: 64\n" + CAL,
        rest=f"  - stage: compile\n    target: trtllm-engine\n    gpu: H100\n    max_input_len: 128\n"
             f"    max_seq_len: 256\n    launcher: {{kind: local, bin_dir: {bin_dir}}}\n"))
    assert run_cli(tiny_workdir, "run", str(recipe)) == 0
    client = mlflow.MlflowClient(f"sqlite:///{tiny_workdir['mlruns'] / 'mlflow.db'}")
    (stage,) = client.search_runs([client.get_experiment_by_name("bad").experiment_id],
                                  "tags.`llmopt.stage` = 'compile'")
    bundle = tiny_workdir["cache"] / "stages" / stage.data.tags["llmopt.cache_key"]
    m = json.loads((bundle / manifest.MANIFEST).read_text())
    assert record.read_text().split() == m["commands"]["build"].split()[1:]
    assert (bundle / "logs" / "build.log").is_file() and (bundle / "logs" / "smoke.log").is_file()
    assert m["build"]["tensorrt_llm"] == "0.0.0-mock"
    if smoke_tokens == 8:
        assert stage.data.metrics["trtllm/built"] == 1 and m["build"]["smoke"]["tokens"] == 8
    else:
        assert stage.data.metrics["trtllm/built"] == 0
        assert stage.data.tags["trtllm.reason"] == "the smoke test generated 3 tokens, not 8"


# --- FAKE TensorRT-LLM LLM API: the benchmark's bookkeeping only, never TensorRT-LLM ---------------


class FakeSamplingParams:
    """FAKE of tensorrt_llm.SamplingParams: keeps the arguments llmopt passes."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    """FAKE of tensorrt_llm.LLM, to test llmopt's bookkeeping around the LLM API (which folders it
    loads, how it times streamed tokens, which metrics it reports), not TensorRT-LLM. The first token
    comes after PREFILL_S, then one every STEP_S; a streamed update brings up to two tokens, with
    cumulative `outputs[0].token_ids` as the real RequestOutput has them."""

    PREFILL_S, STEP_S = 0.03, 0.004
    loaded: list[dict] = []

    def __init__(self, model, tokenizer=None):
        FakeLLM.loaded.append({"model": model, "tokenizer": tokenizer})

    @staticmethod
    def _output(tokens: int):
        from types import SimpleNamespace

        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(tokens)))])

    def generate(self, inputs, sampling_params, use_tqdm=True):
        import time

        time.sleep(self.PREFILL_S + self.STEP_S * (sampling_params.max_tokens - 1))
        return [self._output(sampling_params.max_tokens) for _ in inputs]

    async def _stream(self, tokens: int):
        import asyncio

        await asyncio.sleep(self.PREFILL_S)
        yield self._output(1)
        for have in range(3, tokens + 2, 2):  # 1, 3, 5, ...: two tokens an update
            await asyncio.sleep(2 * self.STEP_S)
            yield self._output(min(have, tokens))

    def generate_async(self, inputs, sampling_params, streaming=False):
        assert streaming and set(inputs) == {"prompt_token_ids"}
        return self._stream(sampling_params.max_tokens)


@pytest.fixture
def fake_tensorrt_llm(monkeypatch):
    """A FAKE `tensorrt_llm` module (FakeLLM, FakeSamplingParams) in sys.modules: not TensorRT-LLM."""
    import sys
    from types import ModuleType

    module = ModuleType("tensorrt_llm")
    module.LLM, module.SamplingParams, module.__version__ = FakeLLM, FakeSamplingParams, "0.0.0-fake"
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
    monkeypatch.setattr(FakeLLM, "loaded", [])
    return module


def _bench_trtllm(bundle: Path, out: Path, output_tokens: int = 8):
    from llmopt.recipe import Benchmark
    from llmopt.stages import StageContext, benchmark

    cfg = Benchmark.model_validate({"stage": "benchmark", "runtime": "trtllm", "batch_sizes": [1, 2], "input_tokens": 16,
                                    "output_tokens": output_tokens, "warmup": 1, "repeats": 3, "gpu_hourly_usd": 2.5})
    out.mkdir()
    ctx = StageContext("cpu", "float32", False, progress=False, cache_root=out.parent / "cache")
    return benchmark.run(cfg, Artifact(bundle, "trtllm-bundle"), out, ctx)


@pytest.mark.parametrize("route", ["trtllm", "trtllm-engine"])
def test_fake_llm_api_benchmark_loads_the_bundle_model_and_reports_what_it_measures(route, fake_tensorrt_llm, bundles,
                                                                                   tmp_path):
    """FAKE LLM API: the bundle's model folder is what loads, per-token times come from the stream
    (TTFT before the end), and the metrics are exactly the runtime's declared ones plus those derived
    from them."""
    from llmopt.eval.runtimes.trtllm import TrtllmRuntime

    if route == "trtllm":
        bundle = bundles["tiny-fp8-trtllm"]
        model, tokenizer, weights = bundle / trtllm.CHECKPOINT, None, bundle / trtllm.CHECKPOINT / "model.safetensors"
    else:
        bundle = _copy(bundles["tiny-int4awq-trtllm"], tmp_path)
        with pytest.raises(ValueError, match="a trtllm-engine bundle without engine/: trtllm-build did not run"):
            _bench_trtllm(bundle, tmp_path / "unbuilt")
        (bundle / trtllm.ENGINE).mkdir()  # what trtllm-build would have written (placeholder bytes)
        weights = bundle / trtllm.ENGINE / "rank0.engine"
        weights.write_bytes(b"FAKE ENGINE " * 1000)
        model, tokenizer = bundle / trtllm.ENGINE, str(bundle / trtllm.TOKENIZER)
    artifact = _bench_trtllm(bundle, tmp_path / "out")
    assert FakeLLM.loaded == [{"model": str(model), "tokenizer": tokenizer}]
    m = artifact.metrics
    assert m["memory/weights_gb"] == weights.stat().st_size / 1e9
    derived = {"decode_bandwidth_gb_s", "roofline_fraction", "usd_per_1m_output_tokens"}
    for bs in (1, 2):
        logged = {k.split("/")[1] for k in m if k.startswith("bench/") and k.endswith(f"/bs{bs}")}
        assert logged == set(TrtllmRuntime.measures) | derived | ({"overhead_pct"} if bs == 1 else set())
        b = {name: m[f"bench/{name}/bs{bs}"] for name in logged}
        assert FakeLLM.PREFILL_S * 1000 <= b["ttft_ms"] < b["e2e_ms"]
        assert b["ttft_ms"] + 7 * b["tpot_ms"] == pytest.approx(b["e2e_ms"], rel=0.25)
        assert b["tpot_ms"] >= FakeLLM.STEP_S * 1000 * 0.9 and b["roofline_fraction"] > 0
        assert b["itl_ms"] <= b["itl_ms_p90"] <= b["itl_ms_p99"] and b["ttft_ms"] <= b["ttft_ms_p90"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["measures"] == list(TrtllmRuntime.measures) and report["not_measured"] == []
