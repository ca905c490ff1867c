"""The kernel modules: a quantized linear layer's codes and scales (`QuantizedWeight`), turned into a
module that runs one maintained kernel on them. Each module computes the same product as
`QuantizedWeight.dequantize()` (the reference the tests compare against)."""

from __future__ import annotations

import contextlib
import functools
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from llmopt.models import import_detached

FP8_MAX = 448.0  # largest e4m3 value


@dataclass
class QuantizedWeight:
    """An integer weight grid: W[n, k] = scales[g(k), n] * (codes[n, k] - zero[g(k), n]).

    `codes` are unsigned, in [0, 2**bits); `zeros` None means the symmetric midpoint 2**(bits-1);
    `g_idx[k]` is column k's group (None: k // group_size; act-order checkpoints give their own);
    `pre_scale` multiplies the input first (AWQ's smoothing); `bias` is added last."""

    codes: torch.Tensor  # [N, K] unsigned integers (uint8 keeps a 7B's codes at 6.7 GB)
    scales: torch.Tensor  # [G, N] float
    bits: int
    group_size: int  # columns per group; K for one group per row
    zeros: torch.Tensor | None = None  # [G, N] int codes
    g_idx: torch.Tensor | None = None  # [K] int
    pre_scale: torch.Tensor | None = None  # [K]
    bias: torch.Tensor | None = None  # [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def gptq_group(self) -> int:
        """The group size as GPTQ (and GPTQModel's layers) write it: -1 for one group per row."""
        return -1 if self.group_size >= self.codes.shape[1] else self.group_size

    def groups(self) -> torch.Tensor:
        k = self.codes.shape[1]
        return self.g_idx.long() if self.g_idx is not None else torch.arange(k, device=self.codes.device) // self.group_size

    def zero_codes(self) -> torch.Tensor:
        if self.zeros is not None:
            return self.zeros
        return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.int32)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None or bool((self.zeros == 2 ** (self.bits - 1)).all())

    @property
    def act_order(self) -> bool:
        if self.g_idx is None:
            return False
        return not torch.equal(self.g_idx.long(), torch.arange(self.codes.shape[1], device=self.g_idx.device)
                               // self.group_size)

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in float32: the reference every kernel module is compared against."""
        g = self.groups()
        scales = self.scales.float()[g].t()  # [N, K]
        zeros = self.zero_codes().float()[g].t()
        return scales * (self.codes.float() - zeros)

    def contiguous_groups(self) -> tuple[QuantizedWeight, torch.Tensor | None]:
        """The same weight with its input columns reordered so that groups are contiguous (act-order),
        and the order (None when already contiguous): x[..., order] @ W'[N, K]^T == x @ W^T."""
        if not self.act_order:
            return self, None
        order = torch.argsort(self.g_idx.long(), stable=True)
        # the pre-scale stays in the input's own order: QuantLinear applies it before reordering
        reordered = QuantizedWeight(self.codes[:, order], self.scales, self.bits, self.group_size, self.zeros, None,
                                    self.pre_scale, self.bias)
        return reordered, order


class QuantLinear(torch.nn.Module):
    """Base of the kernel modules: input reordering and AWQ's pre-scale, then `_mm`, then bias."""

    kernel = "?"

    def __init__(self, weight: QuantizedWeight, order: torch.Tensor | None, dtype: torch.dtype, device: str):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("order", None if order is None else order.to(device), persistent=False)
        self.register_buffer("pre_scale", None if weight.pre_scale is None else weight.pre_scale.to(device, dtype),
                             persistent=False)
        self.register_buffer("bias", None if weight.bias is None else weight.bias.to(device, dtype), persistent=False)

    dense_tokens = 0  # keep_dense: products of at least this many rows run dense (0: never)
    check_rows: tuple[int, ...] = (3,)  # the row counts `check_module` checks: one per layout the module runs

    def keep_dense(self, weight: QuantizedWeight, min_tokens: int, device: str, dtype: torch.dtype) -> None:
        """Keep a compact copy of the weight's codes (two 4-bit codes a byte; one 8-bit code), with its
        scales and zeros, beside the kernel's layout: a product of at least `min_tokens` rows (a
        prefill's batch x width) dequantizes it to the input's dtype and runs one dense matrix product
        (cuBLAS on CUDA), where a weight-only kernel computes slower than the dense product (Marlin's
        prefill of 8 x 128 tokens: 50.1 against bf16's 30.5 ms on an H100). Costs 0.5 (4-bit) or 1
        (8-bit) byte a weight more in memory; decode steps (fewer rows) keep the kernel."""
        if weight.bits not in (4, 8):
            raise ValueError(f"dense prefill keeps 4- or 8-bit codes, not {weight.bits}-bit")
        n, k = weight.shape
        codes = weight.codes.to(torch.uint8)
        if weight.bits == 4:
            codes = codes[:, 0::2] | codes[:, 1::2] << 4  # low nibble: the even column
        self.dense_bits, self.dense_tokens = weight.bits, int(min_tokens)
        self.register_buffer("dense_codes", codes.contiguous().to(device), persistent=False)
        self.register_buffer("dense_scales", weight.scales.t().contiguous().to(device, dtype), persistent=False)  # [N, G]
        self.register_buffer("dense_zeros", None if weight.symmetric else
                             weight.zero_codes().t().contiguous().to(device, torch.uint8), persistent=False)
        self.register_buffer("dense_groups", weight.groups().to(device, torch.int32) if weight.act_order else None,
                             persistent=False)

    @property
    def keeps_dense(self) -> bool:
        """Whether `keep_dense` kept the codes (whatever `dense_tokens` now says)."""
        return getattr(self, "dense_codes", None) is not None

    def drop_dense(self) -> None:
        """Give back the codes `keep_dense` kept: every product runs the kernel."""
        for name in ("dense_codes", "dense_scales", "dense_zeros", "dense_groups"):
            setattr(self, name, None)
        self.dense_tokens = 0

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The kept codes dequantized, W [N, K] in `dtype` (input columns in their own order)."""
        fn = _dense_weight_compiled() if self.dense_codes.is_cuda else dense_weight
        return fn(self.dense_codes, self.dense_scales, self.dense_zeros, self.dense_groups, self.dense_bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.pre_scale is not None:
            x = x * self.pre_scale
        if self.dense_tokens and x.shape[0] >= self.dense_tokens:  # a static shape: decided once per graph
            y = F.linear(x, self.dense_weight(x.dtype))  # the kept codes are in the input's own column order
        else:
            if self.order is not None:
                x = x.index_select(-1, self.order)
            y = self._mm(x)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.kernel}, in={self.in_features}, out={self.out_features}"


def dense_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, groups: torch.Tensor | None,
                 bits: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] = scale * (code - zero) from `QuantLinear.keep_dense`'s copy: codes [N, K] (4-bit: [N, K/2],
    two a byte, the even column low), scales [N, G], zeros [N, G] codes or None (the midpoint), groups
    [K] (act-order) or None (contiguous groups of K / G columns). The integers are exact in bf16."""
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), -1).reshape(codes.shape[0], -1)
    n, k = codes.shape
    q = codes.to(dtype)
    zero = zeros.to(dtype) if zeros is not None else torch.full_like(scales, 2 ** (bits - 1), dtype=dtype)
    if groups is None:
        g = scales.shape[1]
        return ((q.view(n, g, k // g) - zero[..., None]) * scales.to(dtype)[..., None]).reshape(n, k)
    return (q - zero[:, groups]) * scales.to(dtype)[:, groups]


@functools.cache
def _dense_weight_compiled():
    """`dense_weight` as one fused kernel per weight shape (inductor), for CUDA: it reads 0.5 byte a
    4-bit weight and writes 2; eagerly the unpacking, subtraction and scaling would each pass over
    the whole bf16 weight. Made on first use (torch.compile imports dynamo)."""
    return torch.compile(dense_weight, dynamic=False)


class Int4PackLinear(QuantLinear):
    """torch's int4 weight-only matmul: tinygemm (`_weight_int4pack_mm`, bf16) on CUDA,
    `_weight_int4pack_mm_for_cpu` on CPU. Its grid is w = (q - 8) * scale + zero with a float zero,
    so asymmetric and symmetric codes both map exactly; groups of 32/64/128/256 (one group per row
    becomes repeated groups of the largest size that divides K)."""

    kernel = "int4pack"

    def __init__(self, weight: QuantizedWeight, device: str, dtype: torch.dtype):
        if weight.bits != 4:
            raise ValueError(f"int4pack runs 4-bit weights, not {weight.bits}-bit")
        weight, order = weight.contiguous_groups()
        super().__init__(weight, order, dtype, device)
        n, k = weight.shape
        group = weight.group_size if weight.group_size < k else next((g for g in (256, 128, 64, 32) if k % g == 0), None)
        if group not in (32, 64, 128, 256) or k % group:
            raise ValueError(f"int4pack needs groups of 32, 64, 128 or 256 columns dividing {k}; got {weight.group_size}")
        repeat = (k // group) // weight.scales.shape[0]  # 1, or K / group for one group per row
        scales = weight.scales.float().repeat_interleave(repeat, 0)
        zeros = weight.zero_codes().float().repeat_interleave(repeat, 0)
        self.group = group
        self.cuda_kernel = device.startswith("cuda")
        codes = weight.codes.to(torch.int32)
        if self.cuda_kernel:
            tiles = 8 if k % 128 == 0 else (4 if k % 64 == 0 else 2)
            packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device),
                                                                tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
        # both kernels compute in bf16: tinygemm only takes bf16, and the CPU kernel's float32 path is
        # not vectorised (measured 30x slower than its bf16 path on SmolLM2's shapes, 14x slower than
        # a dense float32 product); the output goes back to the model's dtype
        dtype = torch.bfloat16
        # tinygemm: w = (q - 8) * scale + zero  ==  scale * (q - z)  with  zero = (8 - z) * scale
        table = torch.stack([scales, (8 - zeros) * scales], -1).to(device=device, dtype=dtype).contiguous()
        self.register_buffer("packed", packed.to(device), persistent=False)
        self.register_buffer("scales_and_zeros", table, persistent=False)

    def _mm(self, x):
        op = torch.ops.aten._weight_int4pack_mm if self.cuda_kernel else torch.ops.aten._weight_int4pack_mm_for_cpu
        return op(x.to(torch.bfloat16), self.packed, self.group, self.scales_and_zeros).to(x.dtype)


class Int8PackLinear(QuantLinear):
    """torch's `_weight_int8pack_mm`: symmetric int8 weights with one scale per output channel."""

    kernel = "int8pack"

    def __init__(self, weight: QuantizedWeight, device: str, dtype: torch.dtype):
        if weight.bits != 8 or weight.scales.shape[0] != 1 or not weight.symmetric or weight.act_order:
            raise ValueError("int8pack runs symmetric 8-bit weights with one scale per output channel")
        super().__init__(weight, None, dtype, device)
        self.register_buffer("weight_int8", (weight.codes.to(torch.int32) - 128).to(torch.int8).to(device),
                             persistent=False)
        # bf16, as int4pack's CPU kernel: its float32 path measured 15x slower
        self.register_buffer("channel_scales", weight.scales[0].to(device=device, dtype=torch.bfloat16), persistent=False)

    def _mm(self, x):
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight_int8, self.channel_scales).to(x.dtype)


class Fp8Linear(QuantLinear):
    """Real FP8 products (`torch._scaled_mm`): e4m3 weights with a per-tensor scale, the input
    quantized to e4m3 with its static per-tensor scale (ModelOpt's FP8 calibrates both), rows padded
    to a multiple of 16 as cuBLASLt wants. Under torch.compile the input's quantization fuses into
    the kernel that produced it. A fused group (q/k/v share ModelOpt's input scale, not the weight
    scale) passes one weight scale per output row, applied to the product's output."""

    kernel = "fp8"

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                 bias: torch.Tensor | None, pre_scale: torch.Tensor | None, device: str, dtype: torch.dtype):
        n, k = weight_fp8.shape
        shell = QuantizedWeight(torch.empty(n, k, dtype=torch.int8), torch.empty(1, n), 8, k, bias=bias, pre_scale=pre_scale)
        super().__init__(shell, None, dtype, device)
        self.dtype = dtype
        self.register_buffer("weight_t", weight_fp8.to(device).t(), persistent=False)  # column-major [K, N]
        per_row = weight_scale.numel() > 1
        if per_row and weight_scale.numel() != n:
            raise ValueError(f"an FP8 weight scale is one value or one per output row ({n}), not {weight_scale.numel()}")
        scale = weight_scale.float().reshape(n if per_row else ()).to(device)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("row_scale", scale.to(dtype) if per_row else None, persistent=False)
        self.register_buffer("one", torch.ones((), device=device), persistent=False)
        self.register_buffer("input_scale", input_scale.float().reshape(()).to(device), persistent=False)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same product in float32: the input rounded to e4m3 and the weights dequantized."""
        xq = (x.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * self.input_scale
        scale = self.weight_scale[:, None] if self.row_scale is not None else self.weight_scale
        return F.linear(xq, self.weight_t.t().float() * scale)

    def check(self) -> float:
        """Largest |kernel - reference| / max |reference| on a random input."""
        x = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0)).to(self.weight_t.device, self.dtype)
        with torch.no_grad():
            got = self(x).float()
            reference = self.reference(x.float() * (self.pre_scale.float() if self.pre_scale is not None else 1))
            if self.bias is not None:
                reference = reference + self.bias.float()
        return relative_error(got, reference)

    def _mm(self, x):
        m = x.shape[0]
        xq = (x.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if m % 16:
            xq = torch.cat([xq, xq.new_zeros(16 - m % 16, xq.shape[1])])
        if self.row_scale is None:
            y = torch._scaled_mm(xq, self.weight_t, scale_a=self.input_scale, scale_b=self.weight_scale, out_dtype=x.dtype)
            return y[:m]
        # float32 out: the unscaled sums, then each row's weight scale (a pointwise op torch.compile fuses)
        y = torch._scaled_mm(xq, self.weight_t, scale_a=self.input_scale, scale_b=self.one, out_dtype=torch.float32)
        return (y[:m] * self.row_scale.float()).to(x.dtype)


# --- extension kernels (GPTQModel): Marlin, Machete; CUDA -----------------------------------------

# the custom op below finds its layer by index (a module is not an op argument). Weak references: a
# strong list kept every Marlin model's packed weights alive after the model was gone, and a 7B
# base measured after its int4 candidate in one process counted their ~3.9 GB in its peak memory
_OPAQUE_LAYERS: list[weakref.ref] = []


def register_layer(layer) -> int:
    """A kernel layer's index for `kernel_mm`, held weakly (the model owns the layer)."""
    _OPAQUE_LAYERS.append(weakref.ref(layer))
    return len(_OPAQUE_LAYERS) - 1


def registered_layer(index: int):
    layer = _OPAQUE_LAYERS[index]()
    if layer is None:
        raise RuntimeError(f"kernel layer {index} was freed: its model is gone, and a graph or a module still calls it")
    return layer


@torch.library.custom_op("llmopt::kernel_mm", mutates_args=())
def kernel_mm(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    """One extension kernel layer's product (Marlin's, Machete's), opaque to torch.compile (GPTQModel's
    Python wrappers read a ContextVar, which dynamo cannot trace), so a compiled step captures the
    kernel's launch in its CUDA graph whole."""
    return registered_layer(layer).product(x)


@kernel_mm.register_fake
def _(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class OpaqueLinear(QuantLinear):
    """A layer whose product (`product`: x [M, K] bf16, contiguous) is an extension's op: called
    directly in eager code, through `kernel_mm` where torch.compile traces."""

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _mm(self, x):
        a = x.to(torch.bfloat16).contiguous()
        # the custom op only where torch.compile traces: in eager code its dispatch is host time for nothing
        y = kernel_mm(a, self.index, self.out_features) if torch.compiler.is_compiling() else self.product(a)
        return y.to(x.dtype)


class MarlinLinear(OpaqueLinear):
    """GPTQModel's Marlin GEMM on a symmetric 4/8-bit grid (groups -1/32/64/128, act-order kept as
    its own sort). The grid is written in GPTQ's packing and repacked by GPTQModel itself."""

    kernel = "marlin"

    def __init__(self, weight: QuantizedWeight, device: str, dtype: torch.dtype):
        marlin_refusal(weight)
        super().__init__(weight, None, torch.bfloat16, device)
        # a submodule, so that the model's buffers (the benchmark's weight bytes) and `.to()` see its packed
        # weights; the forward reaches it through `product` only
        self.marlin, self.gemm = marlin_layer(weight, device)
        self.index = register_layer(self)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return marlin_product(self.marlin, self.gemm, x)


def marlin_refusal(weight: QuantizedWeight) -> None:
    """ValueError where Marlin cannot run the grid (before GPTQModel is touched)."""
    if weight.bits not in (4, 8) or not weight.symmetric:
        raise ValueError("marlin runs symmetric 4- or 8-bit weights")
    n, k = weight.shape
    if weight.gptq_group not in (-1, 32, 64, 128):
        raise ValueError(f"marlin takes groups of 32, 64, 128 or one per row, not {weight.group_size}")
    # GPTQModel's own limits (MarlinLinear._validate): whole int32 words along N and K, and for
    # act-order a thread-tile-aligned shape (the others are padded to a tile on each call)
    per = 32 // weight.bits
    if n % per or k % per:
        raise ValueError(f"marlin packs {per} codes per int32: a {n}x{k} layer does not divide")
    if weight.act_order and not (n % 64 == 0 and k % 128 == 0 or n % 128 == 0 and k % 64 == 0):
        raise ValueError(f"marlin runs act-order weights on tile-aligned shapes only, not {n}x{k}")


def marlin_layer(weight: QuantizedWeight, device: str):
    """GPTQModel's Marlin layer on the grid (written in GPTQ's packing, repacked by GPTQModel's
    post_init), and the op its forward ends in (None where its forward must run: `marlin_gemm_op`)."""
    from llmopt.methods.gptq import quiet_gptqmodel

    quiet_gptqmodel()  # imported detached: from this frame's stack it would pin the model being swapped
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear as GptqModelMarlin

    n, k = weight.shape
    layer = GptqModelMarlin(bits=weight.bits, group_size=weight.gptq_group, desc_act=weight.act_order, sym=True,
                            in_features=k, out_features=n, bias=False, register_buffers=True, dtype=torch.bfloat16)
    qweight, qzeros = pack_gptq(weight.codes, weight.bits), pack_gptq(weight.zero_codes() - 1, weight.bits).t()
    layer.qweight.data, layer.qzeros.data = qweight.to(device), qzeros.contiguous().to(device)
    layer.scales.data = weight.scales.to(device=device, dtype=torch.bfloat16)
    layer.g_idx.data = weight.groups().to(device=device, dtype=torch.int32)
    layer = layer.to(device)
    layer.post_init()
    return layer, marlin_gemm_op(layer)


def marlin_product(m, gemm, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16, contiguous, through GPTQModel's Marlin layer `m`: its GEMM called as GPTQModel's
    `apply_gptq_marlin_linear` calls it, without its per-call Python (an extension lookup under a lock,
    a scratch context, reshapes): an H200 profile of a 7B's eager prefill found ~80 us of host time a
    call around a 49 us kernel, which made int4's TTFT about twice bf16's. Layers GPTQModel pads to a
    tile (`gemm` None) go through its forward."""
    if gemm is None:
        return m(x)
    return gemm(x, None, m.qweight, None, m.scales, None, m.qzeros, m.g_idx, m.g_idx_sort_indices, m.workspace,
                m.weight_type.id, x.shape[0], m.out_features, m.in_features, m.is_k_full, False, m.fp32, False)


class MacheteLinear(OpaqueLinear):
    """Machete (llmopt.kernels.machete), vLLM's mixed-input GEMM for Hopper, on a symmetric 4-bit
    grid (groups of 64 or 128, or one per row; no act-order), bf16 activations. GPTQModel's layer
    prepacks the codes (written in GPTQ's packing) into Machete's layout; the product is its op,
    called directly. Its heuristic picks a tile shape per product shape (rows, out, in)."""

    kernel = "machete"

    def __init__(self, weight: QuantizedWeight, device: str, dtype: torch.dtype):
        machete_refusal(weight)
        super().__init__(weight, None, torch.bfloat16, device)
        self.machete = machete_layer(weight, device)
        self.type_id = self.machete.weight_type.id
        self.group = weight.gptq_group if weight.gptq_group != -1 else weight.shape[1]  # Machete's: columns a group
        self.index = register_layer(self)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] bf16, contiguous: Machete's op as GPTQModel's forward calls it, without its Python."""
        m = self.machete
        return torch.ops.gptqmodel_machete.machete_mm(x, m.qweight, self.type_id, None, m.scales, None, self.group,
                                                      None, None, None)


def machete_refusal(weight: QuantizedWeight) -> None:
    """ValueError where Machete cannot run the grid (before GPTQModel is touched)."""
    n, k = weight.shape
    if weight.bits != 4 or not weight.symmetric:
        raise ValueError("machete runs symmetric 4-bit weights (8-bit and zero points run on marlin)")
    if weight.gptq_group not in (-1, 64, 128):
        raise ValueError(f"machete takes groups of 64 or 128 or one per row, not {weight.group_size}")
    if weight.act_order:
        raise ValueError("machete runs weights without act-order (marlin runs act-order)")
    if k % 64 or n % 128:
        raise ValueError(f"machete needs inputs in multiples of 64 and outputs of 128, not a {n}x{k} layer")


def machete_layer(weight: QuantizedWeight, device: str):
    """GPTQModel's Machete layer on the grid, prepacked into Machete's layout by its post_init."""
    from llmopt.methods.gptq import quiet_gptqmodel

    quiet_gptqmodel()
    from gptqmodel.nn_modules.qlinear.machete import MacheteLinear as GptqModelMachete

    n, k = weight.shape
    layer = GptqModelMachete(bits=4, group_size=weight.gptq_group, desc_act=False, sym=True, in_features=k,
                             out_features=n, bias=False)
    layer.qweight.data = pack_gptq(weight.codes, 4).to(device)
    layer.scales.data = weight.scales.to(device=device, dtype=torch.bfloat16)
    layer.g_idx.data = weight.groups().to(device=device, dtype=torch.int32)
    layer.qzeros.data = pack_gptq(weight.zero_codes() - 1, 4).t().contiguous().to(device)
    layer = layer.to(device)
    layer.post_init()  # GPTQModel's prepack into Machete's layout (machete_prepack_B)
    return layer


# products of this many rows or more run Machete in `machete+marlin`, fewer Marlin: on an H100
# (benchmarks/machete_probe.py, a 7B layer's four products) Marlin took 65.4 us at 16 rows against
# Machete's 87.5, Machete 83.8 at 32 against Marlin's 91.0 (and 0.93x bf16 at prefills, Marlin 0.5x)
MACHETE_FROM_ROWS = 32


class MacheteMarlinLinear(MacheteLinear):
    """Both layouts of one grid: products of at least `MACHETE_FROM_ROWS` rows (decode batches of 32
    and more, prefills) run Machete, smaller ones (decode at low load) Marlin, each where it was
    measured faster. Costs Marlin's packed weights on top of Machete's (0.5 byte a 4-bit weight).
    The choice reads the input's row count: fixed within a CUDA graph, which captures one kernel."""

    kernel = "machete+marlin"
    check_rows = (3, MACHETE_FROM_ROWS)  # Marlin's layout, then Machete's

    def __init__(self, weight: QuantizedWeight, device: str, dtype: torch.dtype):
        super().__init__(weight, device, dtype)  # refuses first what Machete cannot run (a subset of Marlin's grids)
        marlin_refusal(weight)
        self.marlin, self.gemm = marlin_layer(weight, device)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < MACHETE_FROM_ROWS:
            return marlin_product(self.marlin, self.gemm, x)
        return super().product(x)


def marlin_gemm_op(layer):
    """The torch op GPTQModel's wrapper ends in, for a layer it runs unpadded and without an adapter;
    None for the others (they keep GPTQModel's forward)."""
    if getattr(layer, "_marlin_tile_padding", None) is not None or getattr(layer, "adapter", None) is not None:
        return None
    from llmopt.methods.gptq import quiet_gptqmodel

    quiet_gptqmodel()
    from gptqmodel import extension

    return extension.op("marlin_bf16", "gptq_marlin_gemm_bf16")


def pack_gptq(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's packing of unsigned codes [N, K] into int32 [K * bits / 32, N] (low bits first along K).
    Zeros [G, N] pack along N: `pack_gptq(zeros, bits).t()` is GPTQ's qzeros [G, N * bits / 32]."""
    per = 32 // bits
    c = codes.t().to(torch.int64)  # [K, N]
    k = c.shape[0]
    if k % per:
        raise ValueError(f"{k} columns do not pack {per} to an int32")
    packed = torch.zeros(k // per, c.shape[1], dtype=torch.int64, device=codes.device)
    for j in range(per):
        packed |= (c[j::per] & (2**bits - 1)) << (bits * j)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, as signed


def unpack_gptq(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_gptq`: int32 [K * bits / 32, N] -> codes [K, N]."""
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    rows = [(p >> (bits * j)) & (2**bits - 1) for j in range(per)]
    return torch.stack(rows, 1).reshape(-1, packed.shape[1])


def build_marlin(cache_root) -> float:
    """Build (or load the cached build of) GPTQModel's Marlin extension under
    `<cache root>/torch-extensions`; seconds spent. A failed build raises KernelBuildError naming
    the log it wrote."""
    from llmopt.kernels import BUILD_DIR, KernelBuildError
    from llmopt.models import output_to

    folder = Path(cache_root) / BUILD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(folder.resolve()))
    log_file = folder / "marlin-build.log"
    started = time.perf_counter()
    try:
        with output_to(log_file), contextlib.suppress(ImportError):
            import_detached("gptqmodel")
            from gptqmodel.utils.marlin import prewarm_marlin_extension

            built = prewarm_marlin_extension(torch.bfloat16)
    except Exception as e:  # the build's own error, kept with the log
        detail = " ".join(f"{type(e).__name__}: {e}".split())  # one line
        raise KernelBuildError(f"kernel marlin failed to build ({detail}); build log: {log_file}") from e
    if not built:
        raise KernelBuildError(f"kernel marlin failed to build; build log: {log_file}")
    return time.perf_counter() - started


class DequantizedLinear(QuantLinear):
    """The reference weight (`QuantizedWeight.dequantize`) in the model's dtype, run as one dense
    product, AWQ's pre-scale folded into its columns: what `auto` runs on CPU for products under
    `llmopt.kernels.CPU_DENSE_BELOW` weights, where an integer kernel's call costs more than the
    dense product (the artifact keeps its format; only the loaded model holds these unpacked)."""

    kernel = "dequantized"

    def __init__(self, weight: QuantizedWeight, device: str, dtype: torch.dtype):
        super().__init__(weight, None, dtype, device)
        dense = weight.dequantize()  # columns in the input's own order (act-order's g_idx applied)
        if weight.pre_scale is not None:
            dense = dense * weight.pre_scale.float().to(dense.device)
        self.pre_scale = None
        self.register_buffer("weight", dense.to(device=device, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def kernel_module(name: str, weight: QuantizedWeight, device: str, dtype: torch.dtype) -> QuantLinear:
    return {"int4pack": Int4PackLinear, "int8pack": Int8PackLinear, "marlin": MarlinLinear,
            "machete": MacheteLinear, "machete+marlin": MacheteMarlinLinear}[name](weight, device, dtype)


def kernels_in(model) -> dict[str, int]:
    """Layers per kernel among the swapped ones: each `QuantLinear` that replaced a layer, and each
    member of a fused group (not the group's shared module, which its first member owns)."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedSlice) or (isinstance(module, QuantLinear) and not name.endswith(".fused")):
            counts[module.kernel] = counts.get(module.kernel, 0) + 1
    return counts


def dense_copy_bytes(model) -> int:
    """Bytes of the codes, scales and zeros the model's kernel modules keep for dense products
    (`QuantLinear.keep_dense`; `modules()` yields a fused group's module once)."""
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, QuantLinear) and m.keeps_dense
               for t in (m.dense_codes, m.dense_scales, m.dense_zeros, m.dense_groups) if t is not None)


def check_module(module: QuantLinear, weight: QuantizedWeight, dtype: torch.dtype, device: str) -> float:
    """Largest |kernel - reference| / max |reference| on random inputs of each of the module's
    `check_rows` row counts (one per layout it runs from): the repack's sanity check."""
    k = weight.shape[1]
    dense = weight.dequantize().to(device)
    scale = weight.pre_scale.float().to(device) if weight.pre_scale is not None else 1
    bias = weight.bias.float().to(device) if weight.bias is not None else 0
    errors = []
    for rows in module.check_rows:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        reference = F.linear(x.float() * scale, dense) + bias
        with torch.no_grad():
            errors.append(relative_error(module(x).float(), reference))
    return max(errors)


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |got - reference| as a fraction of the largest |reference|: how kernels are checked."""
    return ((got - reference).abs().max() / reference.abs().max().clamp(min=1e-12)).item()


def model_dtype(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


# layers a decoder block calls on one and the same input: each group runs as one kernel call
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def sibling_groups(names) -> list[tuple[str, ...]]:
    """The `FUSED` groups whose every member is among `names` (full module names), in order."""
    present, groups = set(names), []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for members in FUSED:
            full = tuple(f"{parent}.{m}" if parent else m for m in members)
            if leaf == members[0] and all(f in present for f in full):
                groups.append(full)
    return groups


def fused_units(items: dict, stack) -> list[tuple[tuple[str, ...], object]]:
    """What to build, as (member names, item): each `FUSED` group whose items `stack` joins into one
    (`stack` returns None for items that cannot share a call), then every other item on its own."""
    units, grouped = [], set()
    for members in sibling_groups(items):
        stacked = stack([items[name] for name in members])
        if stacked is not None:
            units.append((members, stacked))
            grouped.update(members)
    return units + [((name,), item) for name, item in items.items() if name not in grouped]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def concatenate(weights: list[QuantizedWeight]) -> QuantizedWeight | None:
    """The weights stacked along their outputs, as one layer computing all of them; None when they
    cannot share a kernel call (other bits, groups, input order or pre-scale). Layers that read the
    same input share GPTQ's act-order (one Hessian) and ModelOpt's resmoothed AWQ pre-scale."""
    first = weights[0]
    if not all(w.bits == first.bits and w.shape[1] == first.shape[1] and w.group_size == first.group_size
               and w.scales.dtype == first.scales.dtype and _same(w.g_idx, first.g_idx)
               and _same(w.pre_scale, first.pre_scale) and (w.bias is None) == (first.bias is None) for w in weights):
        return None
    zeros = None if all(w.zeros is None for w in weights) else torch.cat([w.zero_codes().to(torch.int32) for w in weights], 1)
    return QuantizedWeight(torch.cat([w.codes for w in weights]), torch.cat([w.scales for w in weights], 1), first.bits,
                           first.group_size, zeros, first.g_idx, first.pre_scale,
                           None if first.bias is None else torch.cat([w.bias for w in weights]))


class _SharedCall:
    """One kernel call for layers that read the same input (q/k/v, gate/up): the first of them to run
    computes every member's output, and each member takes its own slice once. A member called on
    another tensor than the one last computed (or twice on it) computes afresh: never wrong, only
    slower. Under torch.compile the identity test is resolved while tracing, so the compiled step
    holds one call per group."""

    def __init__(self, module: QuantLinear, sizes: list[int]):
        self.module, self.sizes = module, sizes
        self.x: torch.Tensor | None = None
        self.parts: list[torch.Tensor | None] | None = None

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.x is not x or self.parts is None or self.parts[index] is None:
            self.parts, self.x = list(self.module(x).split(self.sizes, -1)), x
        out, self.parts[index] = self.parts[index], None
        if all(p is None for p in self.parts):  # all taken: hold no activation past the block
            self.parts = self.x = None
        return out


class FusedSlice(torch.nn.Module):
    """One member of a fused group: the layer's output, a slice of the group's one kernel call.
    The group's first member owns the fused module (so the model's `.to()` and `named_modules` see it once)."""

    def __init__(self, shared: _SharedCall, index: int):
        super().__init__()
        if index == 0:
            self.fused = shared.module
        self._shared = (shared,)  # a tuple, not a submodule: registered once, by the owner
        self.index = index
        self.in_features, self.out_features = shared.module.in_features, shared.sizes[index]

    @property
    def kernel(self) -> str:
        return self._shared[0].module.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared[0].take(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.kernel}, part {self.index} of a fused call, in={self.in_features}, out={self.out_features}"


def swap(model, weights: dict[str, QuantizedWeight], kernel: str, device: str,
         compare_with_original: bool = True, fuse: bool = True, dense_below: int = 0,
         dense_prefill_tokens: int | str = 0) -> int:
    """Replace each named layer by `kernel`'s module for its weight, after checking that the module
    reproduces the weight (against `dequantize`) and, where asked, the layer it replaces (the format's
    own library on the same input): a repack that misreads the checkpoint fails loudly here.

    With `fuse`, sibling layers that read one input (`FUSED`: q/k/v, gate/up) become one kernel call on
    their stacked weights: at decode a kernel call on a small product is latency-bound (Marlin: 9.1 µs
    for 4096x4096, 11.7 for 11008x4096 on an H200), so three calls cost nearly three times one.
    A product (fused or not) with fewer than `dense_below` weights runs `DequantizedLinear` instead.
    With `dense_prefill_tokens`, each kernel module also keeps its codes for products of that many
    rows or more (`QuantLinear.keep_dense`), checked against `dequantize` as the kernel is; with "auto"
    the codes are kept and every product runs the kernel until the engine sets a prefill's choice."""
    dtype = model_dtype(model)
    # every integer kernel computes in bf16: they agree with float32 to the activations' rounding
    tolerance = 3e-2
    units = fused_units(weights, concatenate) if fuse else [((name,), weight) for name, weight in weights.items()]
    # a group that runs dequantized runs as its members, each one dense product: a shared call saves
    # a kernel's launch cost, and on CPU its slices' bookkeeping cost more than it saved (the tiny
    # model, all dequantized, with generate in turns beside its base: 0.97x / 0.93x at batch 1 / 4
    # fused, 1.00x / 1.03x unfused)
    def small(weight: QuantizedWeight) -> bool:
        return weight.shape[0] * weight.shape[1] < dense_below

    units = [unit for members, weight in units for unit in
             ([((name,), weights[name]) for name in members] if len(members) > 1 and small(weight)
              else [(members, weight)])]
    built: dict[str, torch.nn.Module] = {}
    for members, weight in units:
        module = DequantizedLinear(weight, device, dtype) if small(weight) else kernel_module(kernel, weight, device, dtype)
        error = check_module(module, weight, dtype, device)
        if dense_prefill_tokens and not small(weight):
            module.keep_dense(weight, 0 if dense_prefill_tokens == "auto" else dense_prefill_tokens, device, dtype)
            error = max(error, relative_error(module.dense_weight(dtype).float(), weight.dequantize().to(device)))
        if compare_with_original:
            x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
            with torch.no_grad():
                expected = torch.cat([model.get_submodule(name)(x).float() for name in members], -1)
                error = max(error, relative_error(module(x).float(), expected))
        if error > tolerance:
            raise RuntimeError(f"{', '.join(members)}: kernel {module.kernel} differs from the checkpoint's layer by "
                               f"{error:.2%} of its largest output (tolerance {tolerance:.1%}); the weights were not read "
                               "as written")
        built.update(members_of(module, members, [weights[name].shape[0] for name in members]))
    return install(model, built)


def members_of(module: torch.nn.Module, members: tuple[str, ...], sizes: list[int]) -> dict[str, torch.nn.Module]:
    """The modules that replace `members`: `module` itself for one layer, its slices for a group."""
    if len(members) == 1:
        return {members[0]: module}
    shared = _SharedCall(module, sizes)
    return {name: FusedSlice(shared, i) for i, name in enumerate(members)}


def install(model, built: dict[str, torch.nn.Module]) -> int:
    """Put the built modules in place; called once every one was built and checked (all or none)."""
    for name, module in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    return len(built)


class StackedLinear(torch.nn.Module):
    """Dense sibling layers (q/k/v, gate/up of an unquantized model) as one product on their stacked
    weights: the same arithmetic in fewer, larger cuBLAS calls, as serving stacks run them."""

    kernel = "dense"

    def __init__(self, parts: list[torch.nn.Linear]):
        super().__init__()
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        with torch.no_grad():
            self.weight = torch.nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
            self.bias = None if parts[0].bias is None else torch.nn.Parameter(torch.cat([p.bias for p in parts]),
                                                                               requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"dense, in={self.in_features}, out={self.out_features}"


def _stackable(parts: list[torch.nn.Linear]) -> list[torch.nn.Linear] | None:
    first = parts[0]
    same = all(p.in_features == first.in_features and p.weight.dtype == first.weight.dtype
               and p.weight.device == first.weight.device and (p.bias is None) == (first.bias is None) for p in parts)
    return parts if same else None


def fuse_dense(model) -> int:
    """Run each `FUSED` group of plain `nn.Linear` layers (the unquantized model, or layers a
    quantized one left dense) as one `StackedLinear` call; the number of groups fused. The stacked
    weight replaces the members' (one group's weights are held twice while it is built)."""
    plain = {name: module for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    groups = 0
    for members, parts in fused_units(plain, _stackable):
        if len(members) > 1:
            install(model, members_of(StackedLinear(parts), members, [p.out_features for p in parts]))
            groups += 1
    return groups
