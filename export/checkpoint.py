"""Structural checks of checkpoints without a GPU and without reading weights: a TensorRT-LLM
checkpoint's `config.json` against the schema TensorRT-LLM reads, and every rank's safetensors
header (names, dtypes, shapes) against what that config implies for Llama; an HF checkpoint's
header against its config.

Sources (read 2026-11): the checkpoint layout and config fields,
https://nvidia.github.io/TensorRT-LLM/architecture/checkpoint.html ; the QuantAlgo enum,
tensorrt_llm/quantization/mode.py (`class QuantAlgo(StrEnum)`).
"""

from __future__ import annotations

import json
from pathlib import Path

QUANT_ALGOS = {  # tensorrt_llm.quantization.mode.QuantAlgo
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "INT8", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
}
KV_CACHE_ALGOS = {"FP8", "INT8", "NVFP4"}
DTYPES = {"float16", "bfloat16", "float32"}
LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}
HEADER_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


class Unreadable(ValueError):
    """A checkpoint file that does not parse (corrupt JSON, a truncated or damaged safetensors file): a
    finding about the bundle, never a crash. The message starts with the file's name."""


def read_header(path: Path) -> dict:
    """A safetensors file's tensors: {name: {dtype, shape}}, from its header (the data is not read).
    safetensors validates the header: JSON, its length, and offsets that cover the file exactly, so a
    damaged or truncated file raises Unreadable rather than giving names that are not there."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            names = f.keys()  # not a dict: the opened file has no __iter__
            return {name: {"dtype": f.get_slice(name).get_dtype(), "shape": f.get_slice(name).get_shape()} for name in names}
    except (SafetensorError, OSError) as e:
        raise Unreadable(f"{path.name}: not a readable safetensors file ({e})") from e


def read_json(path: Path) -> dict:
    """A JSON object file (config.json, hf_quant_config.json, manifest.json), or Unreadable."""
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Unreadable(f"{path.name}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise Unreadable(f"{path.name}: not a JSON object")
    return value


def check_trtllm_config(config: dict) -> list[str]:
    """Problems with a TensorRT-LLM checkpoint config (empty: valid)."""
    problems = []
    for key in ("architecture", "dtype", "num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size",
                "mapping", "quantization"):
        if key not in config:
            problems.append(f"config.json: `{key}` is missing")
    if problems:
        return problems
    if config["dtype"] not in DTYPES:
        problems.append(f"config.json: dtype {config['dtype']!r} is not one of {sorted(DTYPES)}")
    mapping = config["mapping"]
    tp, pp, world = mapping.get("tp_size", 1), mapping.get("pp_size", 1), mapping.get("world_size")
    if world != tp * pp:
        problems.append(f"config.json: mapping.world_size {world} != tp_size {tp} x pp_size {pp}")
    quant = config["quantization"] or {}
    algo = quant.get("quant_algo")
    problems += _check_quantization(quant, "config.json: quantization.")
    if algo in ("W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ") and quant.get("group_size") not in (64, 128):
        problems.append(f"config.json: quantization.group_size {quant.get('group_size')!r} for {algo} (64 or 128)")
    return problems


def expected_llama(config: dict, rank: int) -> dict[str, tuple[set[str], list[int] | None]]:
    """Names of a Llama rank's weights with their allowed dtypes and shapes (None: not checked)."""
    tp = config["mapping"].get("tp_size", 1)
    pp = config["mapping"].get("pp_size", 1)
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head = config.get("head_size") or h // heads
    inter = config["intermediate_size"]
    algo = (config["quantization"] or {}).get("quant_algo")
    act = HEADER_DTYPES[config["dtype"]]
    linear = {"attention.qkv": ((heads + 2 * kv_heads) * head // tp, h), "attention.dense": (h, heads * head // tp),
              "mlp.fc": (inter // tp, h), "mlp.gate": (inter // tp, h), "mlp.proj": (h, inter // tp)}
    out: dict[str, tuple[set[str], list[int] | None]] = {}
    per_stage = layers // pp
    pp_rank = rank // tp
    for i in range(pp_rank * per_stage, (pp_rank + 1) * per_stage):
        prefix = f"transformer.layers.{i}."
        out[prefix + "input_layernorm.weight"] = ({act}, [h])
        out[prefix + "post_layernorm.weight"] = ({act}, [h])
        for name, (rows, cols) in linear.items():
            if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
                out[f"{prefix}{name}.weight"] = ({"F8_E4M3"}, [rows, cols])
                out[f"{prefix}{name}.weights_scaling_factor"] = ({"F32"}, None)
            elif algo in ("W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ", "W4A16"):
                out[f"{prefix}{name}.weight"] = ({"I8"}, [rows // 2, cols])  # two int4 values per byte
                out[f"{prefix}{name}.weights_scaling_factor"] = ({"F32", act}, None)
            elif algo is not None and algo.startswith("W8A8_SQ"):
                out[f"{prefix}{name}.weight"] = ({"I8"}, [rows, cols])
            else:
                out[f"{prefix}{name}.weight"] = ({act}, [rows, cols])
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = ({act}, None)  # padded vocabulary for AWQ
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = ({act}, [h])
        out["lm_head.weight"] = ({act}, None)
    return out


def check_trtllm_checkpoint(directory: Path) -> list[str]:
    """Config schema, then each rank's header against the expected Llama weights."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        return [f"{directory.name}/config.json is missing"]
    try:
        config = read_json(config_file)
    except Unreadable as e:
        return [f"{directory.name}/{e}"]
    problems = check_trtllm_config(config)
    if problems:
        return problems
    if config["architecture"] not in LLAMA_ARCHITECTURES:
        return []  # the config is checked; tensor layouts are known here for Llama only
    vocab = config["vocab_size"]
    for rank in range(config["mapping"]["world_size"]):
        shard = directory / f"rank{rank}.safetensors"
        if not shard.is_file():
            problems.append(f"{directory.name}/{shard.name} is missing (world_size {config['mapping']['world_size']})")
            continue
        try:
            header = read_header(shard)
        except Unreadable as e:
            problems.append(f"{directory.name}/{e}")
            continue
        for name, (dtypes, shape) in expected_llama(config, rank).items():
            if name not in header:
                problems.append(f"{shard.name}: tensor {name} is missing")
            elif header[name]["dtype"] not in dtypes:
                problems.append(f"{shard.name}: {name} has dtype {header[name]['dtype']}, expected {'/'.join(sorted(dtypes))}")
            elif shape is not None and header[name]["shape"] != shape:
                problems.append(f"{shard.name}: {name} has shape {header[name]['shape']}, expected {shape}")
        embedding = header.get("transformer.vocab_embedding.weight")
        if embedding is not None and (embedding["shape"][0] < vocab or embedding["shape"][1] != config["hidden_size"]):
            problems.append(f"{shard.name}: vocab_embedding shape {embedding['shape']} does not hold vocab {vocab} x "
                            f"hidden {config['hidden_size']}")
    return problems


def check_hf_checkpoint(directory: Path) -> list[str]:
    """An HF checkpoint: config present, every decoder layer's weights present in the headers, and a
    ModelOpt `hf_quant_config.json` naming a known algorithm."""
    problems = []
    config_file = directory / "config.json"
    if not config_file.is_file():
        return [f"{directory.name}/config.json is missing"]
    try:
        config = read_json(config_file)
    except Unreadable as e:
        return [f"{directory.name}/{e}"]
    names: set[str] = set()
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        problems.append(f"{directory.name}: no safetensors files")
    unreadable = []
    for shard in shards:
        try:
            names |= set(read_header(shard))
        except Unreadable as e:
            unreadable.append(f"{directory.name}/{e}")
    problems += unreadable
    for i in range(config.get("num_hidden_layers", 0)):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"):
            # a shard that does not read hides its tensors: only the unreadable shard is reported, not each of them
            if shards and not unreadable and f"model.layers.{i}.{part}.weight" not in names:
                problems.append(f"{directory.name}: tensor model.layers.{i}.{part}.weight is missing")
    quant_file = directory / "hf_quant_config.json"
    if quant_file.is_file():
        try:
            quant = read_json(quant_file).get("quantization", {})
        except Unreadable as e:
            return [*problems, f"{directory.name}/{e}"]
        problems += _check_quantization(quant, f"{directory.name}/hf_quant_config.json: ")
    return problems


def _check_quantization(quant: dict, where: str) -> list[str]:
    """A quantization block's algorithms against TensorRT-LLM's enums (`where` prefixes each problem)."""
    problems = []
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is not None and algo not in QUANT_ALGOS:
        problems.append(f"{where}quant_algo {algo!r} is not a TensorRT-LLM QuantAlgo")
    if kv is not None and kv not in KV_CACHE_ALGOS:
        problems.append(f"{where}kv_cache_quant_algo {kv!r} is not one of {sorted(KV_CACHE_ALGOS)}")
    return problems
