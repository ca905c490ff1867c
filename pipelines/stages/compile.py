"""The compile stage: a TensorRT-LLM bundle for the current model.

`target: trtllm` (PyTorch backend): the HF-format checkpoint (for ModelOpt formats, the unified
export with `hf_quant_config.json`), the tokenizer, `extra_llm_api_options.yaml` and the exact
`trtllm-serve` / `trtllm-bench` command lines.
`target: trtllm-engine`: a TensorRT-LLM checkpoint exported by ModelOpt from the model in memory
(for ModelOpt formats, the fake-quantized model rebuilt from its calibration), then `trtllm-build`.

Where the launcher reaches TensorRT-LLM the stage builds (engine), loads the bundle with the LLM
API and generates a few tokens, and records the result. Where it does not, the bundle and the
commands are written all the same and the run says `trtllm/built = 0` with the reason: nothing is
pretended. Every bundle gets `manifest.json` (versions, GPU, settings, commands, sha256 of files).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from llmopt.cache import Artifact
from llmopt.export import manifest, support, trtllm
from llmopt.models import load_model, output_to
from llmopt.recipe import Compile
from llmopt.stages import StageContext

LOGS = "logs"


def run(cfg: Compile, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
    import torch

    fmt = support.source_format(src.info)
    sm, gpu = support.target_sm(cfg.gpu)
    engine = cfg.target == "trtllm-engine"
    launcher = trtllm.Launcher(cfg.launcher)
    reach = launcher.reach("trtllm-build" if engine else "trtllm-serve")
    version = cfg.trtllm_version or reach.version or support.DEFAULT_TRTLLM_VERSION
    verdict = support.check(fmt, cfg.target, sm, version)
    if not verdict.ok:  # validation refuses these first; a launcher's own version can still disagree
        raise ValueError(f"{fmt} -> {cfg.target} on sm{sm} with TensorRT-LLM {version}: {verdict.message()}")

    kv_cache = src.info.get("kv_cache")
    commands: dict[str, list[str]] = {}
    if engine:
        trtllm.copy_checkpoint(src.path, out / trtllm.TOKENIZER, trtllm.TOKENIZER_FILES)
        model = load_model(src, ctx.device, ctx.dtype, ctx.trust_remote_code)
        from llmopt.export import modelopt

        export_dtype = getattr(torch, src.info.get("export_dtype", "bfloat16"))
        (out / LOGS).mkdir()
        with output_to(out / LOGS / "export.log"):  # ModelOpt's prints and warnings
            modelopt.export_trtllm(model, out / trtllm.TRTLLM_CHECKPOINT, export_dtype, cfg.tp, cfg.pp)
        del model
        commands["build"] = trtllm.build_command(cfg, trtllm.TRTLLM_CHECKPOINT, trtllm.ENGINE)
        commands["serve"] = trtllm.serve_command(cfg, trtllm.ENGINE)
        smoke_model, smoke_tokenizer = trtllm.ENGINE, trtllm.TOKENIZER
    else:
        trtllm.copy_checkpoint(src.path, out / trtllm.CHECKPOINT)
        options = trtllm.llm_api_options(cfg, kv_cache)
        (out / trtllm.OPTIONS_FILE).write_text(yaml.safe_dump(options, sort_keys=False))
        commands["serve"] = trtllm.serve_command(cfg, trtllm.CHECKPOINT)
        smoke_model, smoke_tokenizer = trtllm.CHECKPOINT, None
    components = out / (trtllm.CHECKPOINT if not engine else trtllm.TOKENIZER)
    model_name = json.loads((components / "config.json").read_text()).get("_name_or_path") or "model"
    commands["bench_prepare"], commands["bench"] = trtllm.bench_commands(cfg, str(model_name))
    commands["smoke"] = trtllm.smoke_command(cfg, smoke_model, smoke_tokenizer)
    (out / "smoke.py").write_text(trtllm.SMOKE_SCRIPT)
    (out / trtllm.COMMANDS_FILE).write_text(
        "#!/bin/sh\n# Run from this directory, where TensorRT-LLM is installed (or inside its container).\nset -e\n"
        + "".join(f"# {name}\n{trtllm.shell_line(c)}\n" for name, c in commands.items()))

    built, reason, smoke = False, reach.reason, None
    if reach.ok:
        built, reason = True, "built and loaded"
        if engine:
            result = launcher.run(commands["build"], out, out / LOGS / "build.log")
            if result.returncode != 0:
                built, reason = False, f"trtllm-build exited {result.returncode} (see {LOGS}/build.log)"
        if built:
            result = launcher.run(commands["smoke"], out, out / LOGS / "smoke.log", timeout=1800)
            line = next((ln for ln in result.stdout.splitlines() if ln.startswith("LLMOPT_SMOKE ")), None)
            if result.returncode != 0 or line is None:
                built, reason = False, f"the smoke test exited {result.returncode} (see {LOGS}/smoke.log)"
            else:
                smoke = json.loads(line.removeprefix("LLMOPT_SMOKE "))
                if smoke["tokens"] != cfg.smoke_tokens:
                    built, reason = False, f"the smoke test generated {smoke['tokens']} tokens, not {cfg.smoke_tokens}"
    build = {"built": built, "reason": reason, "tensorrt_llm": reach.version, "smoke": smoke,
             "settings": cfg.model_dump(mode="json", exclude={"stage", "name", "launcher"}),
             "launcher": cfg.launcher.model_dump(mode="json")}
    quantization = {k: v for k, v in src.info.items() if k != "source"}
    hf_quant = src.path / "hf_quant_config.json"
    if hf_quant.is_file():
        quantization["hf_quant_config"] = json.loads(hf_quant.read_text()).get("quantization")
    if engine:
        quantization["trtllm_checkpoint"] = json.loads((out / trtllm.TRTLLM_CHECKPOINT / "config.json").read_text())[
            "quantization"]
    body = {"target": {"route": cfg.target, "format": fmt, "gpu": gpu, "compute_capability": f"{sm // 10}.{sm % 10}",
                       "trtllm_version": version, "tp": cfg.tp, "pp": cfg.pp, "world_size": cfg.tp * cfg.pp},
            "quantization": quantization, "build": build,
            "commands": {name: trtllm.shell_line(c) for name, c in commands.items()}}
    manifest.write(out, body)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    metrics = {"trtllm/built": float(built), "memory/bundle_gb": size / 1e9}
    if smoke is not None:
        metrics["trtllm/smoke_tokens"] = float(smoke["tokens"])
    tags = {"trtllm.built": str(built).lower(), "trtllm.reason": reason, "trtllm.route": cfg.target,
            "trtllm.target_gpu": f"{gpu} (sm{sm})", "trtllm.version": version}
    state = "built and loaded" if built else f"NOT built: {reason}"
    note = f"{cfg.target} bundle ({fmt}, for {gpu}) at {{path}}; {state}; check it with `llmopt verify {{path}}`"
    return Artifact(out, "trtllm-bundle", metrics, {"format": "trtllm-bundle", "route": cfg.target, "source_format": fmt,
                                                    "kv_cache": kv_cache, "tags": tags, "note": note})
