"""NVIDIA ModelOpt: calibrated TensorRT-LLM-native formats (FP8, INT8 SmoothQuant, INT4-AWQ, W4A8-AWQ, NVFP4).

Quality is measured on the fake-quantized model in memory (transformers cannot reload these
exports); the unified HF checkpoint it exports is what TensorRT-LLM's PyTorch backend loads. The
ModelOpt calls themselves live in llmopt.export.modelopt (the compile stage uses them too).
"""

from __future__ import annotations

import logging
from typing import Literal

from llmopt.methods import Method, Serving
from llmopt.schema import CalibrationSpec, Strict
from pydantic import PositiveInt, model_validator

log = logging.getLogger("llmopt")

AWQ = ("int4_awq", "w4a8_awq")


class ModeloptQuantize(Strict):
    """NVIDIA ModelOpt: calibrated TensorRT-LLM-native formats. Quality is measured on the
    fake-quantized model in memory (transformers cannot reload these exports); the unified HF
    checkpoint it exports is what TensorRT-LLM's PyTorch backend loads."""

    stage: Literal["quantize"]
    method: Literal["modelopt"]
    name: str = "quantize"
    format: Literal["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4"]
    calibration: CalibrationSpec
    batch_size: PositiveInt = 4  # calibration windows per forward pass
    group_size: Literal[64, 128] = 128  # int4 block size of int4_awq / w4a8_awq (TensorRT-LLM's AWQ kernels: 64, 128)
    kv_cache: Literal["fp8"] | None = None  # quantize the KV cache too (needs SM89+ to serve)
    export_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # unquantized tensors in the exports

    @model_validator(mode="after")
    def _group_size_for_awq(self) -> ModeloptQuantize:
        if "group_size" in self.model_fields_set and self.format not in AWQ:
            raise ValueError(f"group_size applies to int4_awq and w4a8_awq only, not to format {self.format}")
        return self


class Modelopt(Method):
    name = "modelopt"
    Config = ModeloptQuantize
    summary = "NVIDIA ModelOpt: FP8, INT8 SmoothQuant, INT4-AWQ, W4A8-AWQ, NVFP4 for TensorRT-LLM"
    libraries = ("modelopt",)
    extra = "modelopt"
    formats = ("modelopt",)
    # extension_build_s: the JIT build of ModelOpt's CUDA kernels, apart from calibration (0 without CUDA)
    metrics = ("quantize/calibration_windows", "quantize/extension_build_s")
    timed_only_with_kernel = True
    # smallest compute capability per format [M]
    serving = {
        "fp8": Serving(89, below_min="format: int4_awq (SM80+)"),
        "int8_sq": Serving(80, refused={"trtllm": (
            "INT8 SmoothQuant runs only as a TensorRT engine; the PyTorch backend has no W8A8 SmoothQuant path [SQ]",
            "target: trtllm-engine with TensorRT-LLM <= 1.2.x, or format: fp8 (SM89+) on target: trtllm")}),
        "int4_awq": Serving(80),
        "w4a8_awq": Serving(89, below_min="format: int4_awq (SM80+)"),
        "nvfp4": Serving(100, below_min="format: fp8 (SM89+) or int4_awq (SM80+)"),
    }

    @classmethod
    def serving_format(cls, cfg) -> str:
        return cfg.format

    @classmethod
    def describe(cls, cfg) -> str:
        return f"modelopt {cfg.format}"

    @classmethod
    def check(cls, cfg, model_config: dict) -> tuple[str, str] | None:
        if cfg.format in AWQ:
            for field in ("hidden_size", "intermediate_size"):
                if field in model_config and model_config[field] % cfg.group_size:
                    return "group_size", (f"{cfg.group_size} does not divide the model's {field} ({model_config[field]}); "
                                          "TensorRT-LLM's AWQ kernels take 64 or 128")
        return None

    @classmethod
    def refuse_runtime(cls, cfg, runtime: str, kernel: str) -> str | None:
        """Only a real kernel (or TensorRT-LLM) times the format; ModelOpt's fake quantization does not."""
        real = cls.kernel_candidates(cls.kernel_spec(cfg), "cuda")
        if runtime != "trtllm" and (kernel == "none" or not real):
            return (f"{runtime} over a ModelOpt {cfg.format} model would time ModelOpt's fake quantization, not the "
                    "format" + (f"; use kernel: {real[0]} (or auto)" if real else "; add a compile stage and benchmark "
                                "with runtime: trtllm, or benchmark the base model"))
        return None

    @classmethod
    def serve_check(cls, cfg, sm: int, gpu: str) -> tuple[str, str] | None:
        if cfg.kv_cache == "fp8" and sm < 89:
            return "gpu", (f"kv_cache: fp8 needs compute capability 8.9 or newer and {gpu} is {sm // 10}.{sm % 10}; "
                           "drop kv_cache from the quantize stage")
        return None

    @classmethod
    def quantize(cls, cfg: ModeloptQuantize, src, out, ctx):
        """Calibrate, keep the quantizer state (to rebuild the fake-quantized model for evaluation),
        then export the unified HF checkpoint for TensorRT-LLM's PyTorch backend (export last: it
        mutates the model). In a child process of its own (llmopt.isolated), as GPTQModel's: on an
        H100 and an H200, the FP8 and INT4-AWQ benchmarks that followed an in-process ModelOpt
        quantize held about their export's size in GPU memory beyond their weights and cache (FP8:
        14.2 GB at batch 1 for 7.0 GB of weights), where int4 and int8 from llmopt's own RTN did not;
        a child's memory is gone with it, whatever ModelOpt keeps."""
        from llmopt.isolated import run_isolated

        return run_isolated(_modelopt_quantize, cfg, src, out, ctx, label=f"modelopt {cfg.format}")

    @classmethod
    def import_libraries(cls) -> None:
        from llmopt.models import import_detached

        import_detached("modelopt.torch.quantization", "modelopt.torch.export")

    @classmethod
    def load(cls, artifact, device, dtype, trust_remote_code):
        """transformers cannot reload ModelOpt's exports: rebuild the fake-quantized model from its
        source and the calibrated quantizer state the quantize stage kept."""
        from llmopt.export import modelopt
        from llmopt.models import load_model

        model = load_model(_source(artifact), device, dtype, trust_remote_code)
        if device == "cuda":
            modelopt.build_extensions(artifact.info["modelopt_format"], artifact.info.get("kv_cache"))
        return modelopt.restore(model, artifact.path / modelopt.STATE_DIR).eval()

    @classmethod
    def load_for_kernel(cls, artifact, device, dtype, trust_remote_code):
        """The plain source model: the fast path copies the export's tensors into it, so restoring the
        fake quantization first (`load`) would only be thrown away. Without remote code, as the fast
        path loads it: ModelOpt's formats are for stock architectures."""
        from llmopt.models import load_model

        return load_model(_source(artifact), device, dtype, False)

    @classmethod
    def kernel_spec(cls, cfg) -> dict:
        return {"format": cfg.format, "group_size": cfg.group_size if cfg.format in AWQ else None, "kv_cache": cfg.kv_cache}

    @classmethod
    def kernel_candidates(cls, spec: dict, device: str) -> tuple[str, ...]:
        """The exported integer or FP8 weights run as such: INT4-AWQ on Marlin (or torch's int4pack),
        FP8 on `_scaled_mm`; on Hopper, named, INT4-AWQ of groups 64 or 128 also on Machete. An FP8 KV
        cache, W4A8, INT8 SmoothQuant and NVFP4 have no kernel in llmopt's runtime (TensorRT-LLM serves them)."""
        if spec.get("kv_cache"):
            return ()
        if spec.get("format") == "int4_awq":
            if device != "cuda":
                return ("int4pack",)
            hopper = ("machete", "machete+marlin") if spec.get("group_size") in (64, 128) else ()
            return ("marlin", *hopper, "int4pack")
        if spec.get("format") == "fp8":
            return ("fp8",)
        return ()

    @classmethod
    def no_kernel_reason(cls, spec: dict, device: str, sm: int | None) -> str:
        if spec.get("kv_cache"):
            return "an FP8 KV cache runs in TensorRT-LLM only; timing the fake-quantized model says nothing of it"
        return super().no_kernel_reason(spec, device, sm)

    @classmethod
    def fast_path(cls, model, artifact, device: str, kernel: str, dense_below: int = 0, dense_prefill_tokens: int | str = 0):
        """Run the exported checkpoint's real weights (not the fake quantization): every quantized
        layer from its packed int4 or FP8 tensors and scales, every other exported tensor (norms that
        absorbed AWQ's pre-quant scales) copied into a plain model of the source, which replaces the
        fake-quantized one (loaded without remote code: ModelOpt's formats are for stock architectures)."""
        import torch
        from llmopt.kernels.linear import QuantizedWeight, install, model_dtype, swap
        from llmopt.models import load_pretrained

        tensors = read_export(artifact.path)
        quantized = {p for p, t in tensors.items() if "weight_scale" in t}
        dtype = model_dtype(model)
        # a plain model of the source to swap into: ModelOpt's wrappers stay out of compiled steps.
        # Each kernel is checked against the exported weights it runs; those are what serving stacks
        # load, and they differ from the fake quantization where the export dtype rounds the weights
        # before they are quantized (a float32 model exported in bf16). load_for_kernel gives that
        # plain model; a fake-quantized one (from `load`) is replaced by it
        if any("quantizer" in name for name, _ in model.named_modules()):
            del model
            model = load_pretrained(artifact.info["source"]["path"], device, False, dtype=dtype)
        with torch.no_grad():
            for prefix, t in tensors.items():
                if prefix in quantized:
                    continue
                for leaf, value in t.items():
                    target = model.get_parameter(f"{prefix}.{leaf}") if prefix else None
                    target.copy_(value.to(target.dtype))
        if kernel == "fp8":
            return model, install(model, _fp8_modules(tensors, quantized, device, dtype))
        weights = {}
        for prefix in quantized:
            t = tensors[prefix]
            packed = t["weight"].to(device)  # [N / 2, K] uint8: rows 2j (low nibble) and 2j + 1 (high)
            signed = torch.stack([packed & 0x0F, packed >> 4], 1).reshape(-1, packed.shape[1]).to(torch.int32)
            codes = (torch.where(signed >= 8, signed - 16, signed) + 8).to(torch.uint8)  # [-8, 7] -> [0, 15], zero at 8
            scale = t["weight_scale"].to(device)  # [N, K / group]
            weights[prefix] = QuantizedWeight(codes, scale.t().contiguous(), 4, codes.shape[1] // scale.shape[1],
                                              pre_scale=t.get("pre_quant_scale"), bias=t.get("bias"))
        fold_pre_scales(model, weights)
        # the fake-quantized layers apply the pre-quant scale of q/k/v and gate/up themselves, where
        # the export folded it into the norms: compare the kernels with the weights, not with those
        return model, swap(model, weights, kernel, device, compare_with_original=False, dense_below=dense_below,
                           dense_prefill_tokens=dense_prefill_tokens)

    @classmethod
    def card(cls, info: dict) -> list[str]:
        return ["A ModelOpt unified checkpoint (`hf_quant_config.json`): serve `model/` with TensorRT-LLM's PyTorch "
                "backend (`trtllm-serve model --backend pytorch`). transformers cannot load it correctly."]

    @classmethod
    def limits(cls, info: dict) -> list[str]:
        return ["- Quality was measured in llmopt's runtime, not on a TensorRT-LLM engine: on the exported weights where a "
                "fast kernel runs them (the run's `env.kernel` tag names it), else on ModelOpt's fake quantization."]


# (producer, consumer) in one decoder block: the consumer's input channel is the producer's output
# channel times what does not depend on it (attention's probabilities; the gate's activation)
FOLDS = (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj"))


def fold_pre_scales(model, weights: dict) -> list[str]:
    """Fold AWQ's pre-quant scales of o_proj and down_proj into the quantization scales of v_proj and
    up_proj (in `weights`, in place); the consumers folded. The export folds q/k/v's and gate/up's into
    the norms; these two it keeps, and the kernel modules would multiply every call's input by them (one
    more kernel a layer in the compiled decode step). Scaling output channel n of the producer by s[n]
    scales input channel n of the consumer by s[n] where the block computes o(softmax(qk) v) and
    down(act(gate) * up): exact, and the weights and their codes stay as exported. Where the structure
    holds is checked once on `model` (the plain model, before the swap): every producer's outputs
    scaled by powers of two and its consumer's inputs scaled back must leave the logits as they were;
    otherwise nothing is folded. With grouped-query attention o_proj's scale folds only where it is the
    same for the query heads that share a value head."""
    import dataclasses

    import torch

    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    # consumer -> (producer, the scale on the producer's outputs, the producer channel of each consumer input)
    folds = {}
    for consumer, weight in weights.items():
        for producer_leaf, consumer_leaf in FOLDS:
            producer = consumer[: -len(consumer_leaf)] + producer_leaf
            if weight.pre_scale is None or not consumer.endswith("." + consumer_leaf) or producer not in weights:
                continue
            given = scale = weight.pre_scale.float().cpu()
            source = torch.arange(scale.numel())
            if consumer_leaf.endswith("o_proj"):  # input (head h, dim d) comes from value head h // (heads / kv_heads)
                dim = scale.numel() // heads
                source = ((torch.arange(heads) // (heads // kv_heads))[:, None] * dim + torch.arange(dim)).reshape(-1)
                scale = scale.new_zeros(kv_heads * dim).index_copy_(0, source, scale)  # one of each value head's users
                if not torch.equal(scale[source], given):
                    continue  # the query heads sharing a value head want different scales
            if scale.numel() == weights[producer].shape[0]:
                folds[consumer] = (producer, scale, source)
    if not folds or not _scaling_commutes(model, folds):
        return []
    for consumer, (producer, scale, _) in folds.items():
        p = weights[producer]
        # in the scales' own dtype, so that the producer still stacks with its siblings (q/k/v, gate/up);
        # the kernels round scales to bf16 anyway
        scales = (p.scales.float() * scale.to(p.scales.device)).to(p.scales.dtype)
        weights[producer] = dataclasses.replace(p, scales=scales, bias=None if p.bias is None else p.bias * scale.to(p.bias))
        weights[consumer] = dataclasses.replace(weights[consumer], pre_scale=None)
    log.info("AWQ pre-quant scales of %d layers folded into their producers' scales", len(folds))
    return sorted(folds)


def _scaling_commutes(model, folds: dict) -> bool:
    """Whether scaling each producer's outputs (by 0.5 or 2, exact in floating point) and its
    consumer's inputs back leaves the logits as they were."""
    import torch

    generator = torch.Generator().manual_seed(0)
    factors = {consumer: 2.0 ** (torch.randint(0, 2, (scale.numel(),), generator=generator) * 2 - 1).float()
               for consumer, (_, scale, _) in folds.items()}
    ids = torch.arange(1, 9, device=next(model.parameters()).device)[None]
    hooks = []
    with torch.no_grad():
        expected = model(ids).logits.float()
        try:
            for consumer, (producer, _, source) in folds.items():
                c = factors[consumer].to(ids.device)
                back = c[source.to(ids.device)]
                hooks.append(model.get_submodule(producer).register_forward_hook(
                    lambda m, i, out, c=c: out * c.to(out.dtype)))
                hooks.append(model.get_submodule(consumer).register_forward_pre_hook(
                    lambda m, i, back=back: (i[0] / back.to(i[0].dtype), *i[1:])))
            got = model(ids).logits.float()
        finally:
            for hook in hooks:
                hook.remove()
    same = bool(torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()))
    if not same:
        log.warning("AWQ pre-quant scales left on the activations: scaling %s's outputs does not scale its consumer's "
                    "inputs in this model", next(iter(folds.values()))[0])
    return same


def _source(artifact):
    """The checkpoint ModelOpt quantized (its path and info, kept by the quantize stage)."""
    from pathlib import Path

    from llmopt.cache import Artifact

    source = artifact.info["source"]
    return Artifact(Path(source["path"]), "hf-checkpoint", info=source["info"])


def _modelopt_quantize(cfg: ModeloptQuantize, src, out, ctx):
    """Modelopt.quantize's work, in the child process."""
    import os
    from pathlib import Path

    import torch
    from llmopt.cache import Artifact
    from llmopt.data import calibration_windows, load_texts
    from llmopt.export import modelopt
    from llmopt.models import load_model, load_tokenizer, output_to
    from llmopt.progress import progress_bar

    tokenizer = load_tokenizer(src.path, ctx.trust_remote_code)
    cal = cfg.calibration
    windows = calibration_windows(tokenizer, load_texts(cal.dataset), cal.num_samples, cal.seq_len, cal.seed)
    batches = [torch.tensor(windows[i:i + cfg.batch_size]) for i in range(0, len(windows), cfg.batch_size)]
    model = load_model(src, ctx.device, ctx.dtype, ctx.trust_remote_code)
    before = modelopt.fingerprints(model)
    torch.manual_seed(cal.seed)
    # AWQ runs the calibration data twice (statistics, then the scale search)
    passes = 2 if cfg.format in AWQ else 1
    terminal = os.fdopen(os.dup(1), "w")  # ModelOpt's own prints go to modelopt.log, the bar stays here
    build_s = modelopt.build_extensions(cfg.format, cfg.kv_cache)  # says when it compiles, or waits
    with terminal, progress_bar(passes * len(batches), f"modelopt {cfg.format}: calibrate", enabled=ctx.progress,
                                file=terminal) as advance, output_to(out / "modelopt.log"):
        model = modelopt.quantize(model, cfg.format, cfg.group_size, cfg.kv_cache, batches, on_batch=advance)
        settings = {"format": cfg.format, "group_size": cfg.group_size, "kv_cache": cfg.kv_cache}
        modelopt.save_state(model, out / modelopt.STATE_DIR, settings, before)
        modelopt.export_hf(model, out, getattr(torch, cfg.export_dtype))
    tokenizer.save_pretrained(out)
    info = {"format": "modelopt", "modelopt_format": cfg.format, "kv_cache": cfg.kv_cache,
            **({"group_size": cfg.group_size} if cfg.format in AWQ else {}),
            "export_dtype": cfg.export_dtype,
            "source": {"path": str(Path(src.path).resolve()), "info": src.info}}
    # logged on every device, so that CPU runs check its declaration too
    metrics = {"quantize/calibration_windows": float(len(windows)), "quantize/extension_build_s": build_s}
    return Artifact(out, "hf-checkpoint", metrics, info)


def read_export(path) -> dict[str, dict]:
    """The unified HF checkpoint's tensors, by layer prefix: {prefix: {leaf: tensor}}."""
    from pathlib import Path

    from safetensors import safe_open

    tensors: dict[str, dict] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                prefix, _, leaf = key.rpartition(".")
                tensors.setdefault(prefix, {})[leaf] = f.get_tensor(key)
    return tensors


def _fp8_modules(tensors: dict, quantized: set[str], device: str, dtype) -> dict:
    """FP8 kernel modules for the exported layers, each checked against its exported weights; sibling
    layers that read one input (q/k/v, gate/up) share one `_scaled_mm` where the export gave them the
    same input scale and pre-quant scale (ModelOpt's export does, for TensorRT-LLM's fused layers),
    each keeping its own weight scale (one per output row of the stacked weight)."""
    import torch
    from llmopt.kernels.linear import Fp8Linear, fused_units, members_of

    def same(ts, name):
        return all((name in t) == (name in ts[0]) and (name not in t or torch.equal(t[name], ts[0][name])) for t in ts)

    def stack(ts: list[dict]) -> dict | None:
        if not (same(ts, "input_scale") and same(ts, "pre_quant_scale") and all(("bias" in t) == ("bias" in ts[0]) for t in ts)):
            return None
        stacked = {"weight": torch.cat([t["weight"] for t in ts]), "input_scale": ts[0]["input_scale"],
                   "weight_scale": torch.cat([t["weight_scale"].float().reshape(1).expand(t["weight"].shape[0]) for t in ts])}
        stacked.update({name: ts[0][name] for name in ("pre_quant_scale",) if name in ts[0]})
        if "bias" in ts[0]:
            stacked["bias"] = torch.cat([t["bias"] for t in ts])
        return stacked

    units = fused_units({prefix: tensors[prefix] for prefix in sorted(quantized)}, stack)
    built = {}
    for members, t in units:
        module = Fp8Linear(t["weight"], t["weight_scale"], t["input_scale"], t.get("bias"), t.get("pre_quant_scale"),
                           device, dtype)
        if (error := module.check()) > (1e-3 if dtype == torch.float32 else 3e-2):
            raise RuntimeError(f"{', '.join(members)}: the FP8 kernel differs from the exported weights by {error:.2%}")
        built.update(members_of(module, members, [tensors[name]["weight"].shape[0] for name in members]))
    return built
