"""`server: {engine: llmopt}`: llmopt's own continuous-batching server, the compiled runtime's decode
step serving requests that come and go.

Why: `transformers serve` spends most of a 7B decode step outside the GPU's matrix products (its
batching manager prepares every step on the host, and gathers each layer's paged KV; README,
"Where a step goes"), so quantized weights, which shorten only the products, moved its throughput
at the SLA by 1.20-1.24x where the static compiled loop gives 1.8-1.9x. This engine keeps the
static loop's step and schedules requests around it:

- **slots**: a static KV cache of `slots` rows of `max_len` tokens each (`SlotCache`); a request
  holds one row from its prefill to its last token, then the row serves the next request;
- **a decode step runs the rows that hold a request, not all rows**: gathered into the smallest of
  the decode batches (`decode_batches`: 16, 32, 64, ... up to `slots`) that holds them, padded with
  a free row; each writes its token's keys and values at its own row and position. Running all 64
  rows every step cost a 7B's int4 weights their speed on an H100 (a step of 64 rows: 6.6 ms at
  one stream, where the static loop's batch 1 takes 2.9 ms), and int4 served no faster than bf16;
- **CUDA graphs captured at start-up, none while serving**: one decode step per decode batch
  (compiled by `torch.compile`, as the compiled runtime's, then captured) and one prefill graph per
  batch and prompt width (prompts left-padded to a multiple of `PREFILL_WIDTH`), so no request meets a
  capture (transformers serve captures a graph whenever a step meets a new padded shape);
- waiting requests are prefilled together, up to 8 at once (batches of 1, 2, 4 or 8, each padded
  to its widest prompt), into a scratch cache, and the same graph copies their keys and values
  into their rows; a decode step follows each turn's admissions. A burst of 64 requests is 8
  prefills, not 64, so the last one's TTFT is not 64 prefills long;
- **steps overlapped with the host's turn** (`_loop`): step k + 1 is launched before step k's tokens
  are read, so the host's work between steps (reading and delivering tokens, admitting, planning,
  waiting for the GIL the HTTP side holds while it streams) runs while the GPU decodes;
- greedy decoding (the load generator's requests ask for fixed output lengths; sampling parameters
  are not applied, and `/llmopt/stats` says `sampling: greedy`).

No paging: rows are reserved whole (`slots` x `max_len` tokens), which is what a load of at most
`slots` streams of at most `max_len` tokens needs; the benchmark stage sizes both to the recipe's
load. The rows lie end to end in one sequence of keys per layer, and a decode step's attention
reads only each of its rows' own span, from its first real position to its current one, in blocks
of `KV_BLOCK` keys: FlexAttention over a block list built in the step from the rows' positions
(`row_blocks`), every query against the one shared sequence. A masked dense read of every row's
whole length costs `slots` x `max_len` keys a step whatever the load (18 GB a step for a 7B's 64
rows of 544 tokens, more than its int4 weights' 3.9 GB). Prefills run sdpa with a dense mask
(`ATTENTION`).

`python -m llmopt.serve SPEC.json` runs it when the spec names `"engine": "llmopt"` (`serve`): the
OpenAI-compatible `/v1/completions` (streamed or not, `ignore_eos`, `max_tokens`), `/v1/models`,
`/health` (once the graphs are captured) and `/llmopt/stats`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import statistics
import threading
import time

import torch
from llmopt.eval.bench import kv_shape
from starlette.requests import Request as HttpRequest  # module level: FastAPI resolves the handler's annotation here
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger("llmopt")

PREFILL_WIDTH = 32  # prompts are left-padded to a multiple of this: one prefill graph per width and batch
PREFILL_BATCHES = (1, 2, 4, 8)  # requests prefilled together (waiting ones, oldest first, by the largest that fits)
KV_BLOCK = 64  # keys per block of a decode step's attention (rows are a whole number of blocks; FlexAttention's
# decoding kernel tiles keys by 64 on CUDA, and a row's span wastes half a block at each end on average)
ATTENTION = "llmopt_rows"  # the attention the engine sets on its model: FlexAttention for a BlockMask, else sdpa
DECODE_BATCH_MIN = 16  # the smallest decode batch: a 7B's step of up to 16 rows costs about one row's (Marlin and
# cuBLAS tile 16 rows; the weights' read is the step), so fewer graphs to compile at start-up


def prefill_widths(max_prompt: int) -> list[int]:
    """The padded prompt widths a server of prompts up to `max_prompt` tokens captures."""
    return list(range(PREFILL_WIDTH, -(-max_prompt // PREFILL_WIDTH) * PREFILL_WIDTH + 1, PREFILL_WIDTH))


def decode_batches(slots: int, smallest: int = DECODE_BATCH_MIN) -> list[int]:
    """The decode steps' batch sizes, one compiled graph each: powers of two from `smallest` below
    `slots`, then `slots`. A step runs the smallest that holds every row with a request."""
    sizes, size = [], smallest
    while size < slots:
        sizes.append(size)
        size *= 2
    return [*sizes, slots]


def _attention_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of a decoder of full-attention layers; an error for any other."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None) or any(t != "full_attention" for t in (getattr(text, "layer_types", None) or ())):
        raise ValueError("engine llmopt serves decoders whose every layer attends to the whole sequence; this model has "
                         "sliding-window layers: use engine: transformers")
    return kv_shape(config)


def row_blocks(start: torch.Tensor, pos: torch.Tensor, keys: int) -> BlockMask:
    """For one query a row [rows], its keys from `start` to `pos` (both included) of a sequence of `keys`
    keys, as a FlexAttention BlockMask: the row's blocks of KV_BLOCK keys from the one holding `start`
    to the one holding `pos` (the kernel reads no other), and the mask within them. Tensor operations
    only: it is built inside the compiled decode step, from the positions the engine writes before
    each step."""
    blocks = keys // KV_BLOCK
    first = start // KV_BLOCK
    count = (pos // KV_BLOCK - first + 1).to(torch.int32)
    indices = (first[:, None] + torch.arange(blocks, device=start.device)[None]).clamp(max=blocks - 1).to(torch.int32)

    def inside(b, h, q, kv):
        return (kv >= start[b]) & (kv <= pos[b])

    return BlockMask.from_kv_blocks(count[:, None, None], indices[:, None, None], BLOCK_SIZE=(128, KV_BLOCK),
                                    mask_mod=inside, seq_lengths=(1, keys))


def rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The engine's attention: FlexAttention when the mask is a BlockMask (the decode step's rows),
    sdpa for any other mask (prefills; and the model's own calls, so a model left with it behaves as
    with sdpa)."""
    if isinstance(attention_mask, BlockMask):  # queries [rows, heads, 1, d]; keys [1, KV heads, all rows' keys, d]
        out = flex_attention(query, key, value, block_mask=attention_mask, scale=scaling,
                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(ATTENTION, rows_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _captured(run, pool, warmups: int = 1):
    """`run` (tensors in, at fixed addresses, to a tensor out) captured into a CUDA graph in `pool`,
    after `warmups` runs off the capturing stream (as torch's capture asks); a replay's function that
    returns the graph's output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmups):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), torch.no_grad():
        out = run()
    return lambda: (graph.replay(), out)[1]


class SlotLayer:
    """One layer's rows of a `SlotCache`, end to end in one sequence [1, KV heads, slots x max_len, head
    size]: a decode step writes each of its rows' new key and value at that row's own place in it
    (`SlotCache.write_at`) and attends over the sequence (its own span of it, by the step's mask)."""

    is_compileable, is_sliding, is_initialized = True, False, True

    def __init__(self, owner: SlotCache, keys: torch.Tensor, values: torch.Tensor):
        self.owner, self.keys, self.values = owner, keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        # written into the layer's tensor itself, not through a view of it: compiled, an in-place write through
        # a view (`self.keys[0].index_copy_`) was functionalized into a copy of the whole layer and a copy
        # back, which inductor kept (4 x the cache's bytes a step: a 7B's 64 rows of 576 tokens, 19.3 GB,
        # made every decode step about 27 ms on an H100); `test_the_decode_step_writes_the_cache_in_place`
        at = self.owner.write_at[:key_states.shape[0]]
        self.keys.index_copy_(2, at, key_states[:, :, -1].transpose(0, 1)[None])
        self.values.index_copy_(2, at, value_states[:, :, -1].transpose(0, 1)[None])
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """`slots` rows of `max_len` positions for every layer, end to end (row r holds positions r x max_len
    to (r + 1) x max_len - 1 of the layer's sequence), preallocated at fixed addresses (CUDA graphs
    replay them); `write_at`: where each row of this step's batch writes, filled by the step."""

    def __init__(self, config, slots: int, max_len: int, device, dtype):
        layers, kv_heads, head_dim = _attention_shape(config)
        shape = (1, kv_heads, slots * max_len, head_dim)
        super().__init__(layers=[SlotLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                                           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(layers)])
        self.slots, self.max_len = slots, max_len
        self.write_at = torch.zeros(slots, dtype=torch.long, device=device)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """A layer's keys or values as rows [KV heads, slots, max_len, head size] (a view)."""
        return x[0].view(x.shape[1], self.slots, self.max_len, x.shape[3])

    @property
    def bytes(self) -> int:
        return sum(x.numel() * x.element_size() for layer in self.layers for x in (layer.keys, layer.values))


@dataclasses.dataclass(eq=False)
class Request:
    """One completion: its prompt ids, how many tokens to make, and where they go (`deliver` is called
    on the engine's thread with each new token id, then with None at the end)."""

    ids: list[int]
    max_new: int
    deliver: object
    eos: frozenset = frozenset()
    cancelled: bool = False
    made: int = 0  # tokens delivered
    launched: int = 0  # tokens made or on their way: the prefill's, and one per decode step launched with its row
    ended: bool = False  # its last token (or its end) delivered: a step still in flight with its row is wasted
    finish: str = "length"


@dataclasses.dataclass(eq=False)
class _Step:
    """A decode step launched and not yet read: each active entry's row and request (in the plan's
    order), where its tokens land on the host (`host`, after `done`; on CPU the tokens), and when it
    began and ended (CUDA events; on CPU the host's clock)."""

    entries: list[tuple[int, Request]]
    host: torch.Tensor
    done: torch.cuda.Event | float
    begun: torch.cuda.Event | float
    after_prefill: bool


class Engine:
    """The serving loop over a `SlotCache` (see the module's docstring). `start()` builds the graphs
    (compiles and captures on CUDA; on CPU the steps run eagerly) and starts the loop's thread;
    `submit` queues a request from any thread."""

    def __init__(self, model, device: str, slots: int, max_prompt: int, max_new: int, compile_backend: str | None = None,
                 smallest_batch: int = DECODE_BATCH_MIN, dense_prefill: str | None = None):
        if slots < 1 or max_prompt < 1 or max_new < 1:
            raise ValueError(f"slots, max_prompt and max_new must be positive, not {slots}, {max_prompt}, {max_new}")
        attention = model.config._attn_implementation
        if attention not in ("sdpa", "eager", ATTENTION):
            raise ValueError(f"engine llmopt serves models loaded with sdpa or eager attention, not {attention!r}")
        # on CPU the steps run eagerly unless a torch.compile backend is named (tests trace the decode step
        # with one, as CUDA compiles it); on CUDA the decode step is always compiled into CUDA graphs
        self.model, self.device, self.compile_backend = model, device, compile_backend
        self.loaded_attention = attention  # given back to the model by stop()
        # dense_prefill "auto": the quantized modules keep their codes for dense products (QuantLinear.keep_dense),
        # and each prefill shape runs whichever of the kernel and the dense product was faster at start-up
        if dense_prefill not in (None, "auto"):
            raise ValueError(f"dense_prefill is 'auto' or None, not {dense_prefill!r}")
        from llmopt.kernels.linear import QuantLinear

        self.dense_modules = [m for m in model.modules() if isinstance(m, QuantLinear) and m.keeps_dense]
        self.dense_auto = dense_prefill == "auto" and bool(self.dense_modules)
        self.prefill_choice: dict[tuple[int, int], dict] = {}  # auto: per prefill shape, both times and the choice
        self.dtype = next(model.parameters()).dtype
        self.widths = prefill_widths(max_prompt)
        self.max_prompt, self.max_new = self.widths[-1], max_new
        self.max_len = -(-(self.max_prompt + max_new) // KV_BLOCK) * KV_BLOCK  # whole blocks of keys
        self.cache = SlotCache(model.config, slots, self.max_len, device, self.dtype)
        from transformers import StaticCache

        _, kv_heads, _, head_dim = self.cache.layers[0].keys.shape  # [1, KV heads, slots x max_len, head size]
        self.decode_sizes = decode_batches(slots, smallest_batch)
        self.batches = [b for b in PREFILL_BATCHES if b <= slots]
        self.scratch = {}  # per prefill batch: its prompts' keys and values before they go to their rows
        for b in self.batches:
            self.scratch[b] = StaticCache(config=model.config, max_cache_len=self.max_prompt)
            probe = torch.zeros(b, kv_heads, 1, head_dim, dtype=self.dtype, device=device)
            for layer in self.scratch[b].layers:  # allocated now, outside any graph's memory pool
                layer.lazy_initialization(probe, probe)
        self.last = torch.zeros(slots, dtype=torch.long, device=device)  # each row's latest token: its next input
        cuda = device.startswith("cuda")
        # a decode step's batch [slots, 3]: each entry's row, position and first real position (its first
        # `batch` entries), written through pinned memory before the step
        self.step_plan = torch.zeros(slots, 3, dtype=torch.long, device=device)
        # two of each host buffer: with steps overlapped, step k + 1's plan is written, and step k's tokens
        # are still on their way, while step k's plan may not have been copied yet (see `_loop`)
        self._plans = [torch.zeros(slots, 3, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        # the tokens' way to the host: pinned, copied after the step, then an event waited on without the
        # GIL (.tolist() of a CUDA tensor waits holding it, which would stall the HTTP thread a whole step)
        self._hosts = [torch.zeros(slots, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._host = torch.zeros(slots, dtype=torch.long, pin_memory=cuda)  # a prefill's first tokens
        self._copied = torch.cuda.Event() if cuda else None
        self._launched = 0  # decode steps launched: which of the two host buffers a step uses
        self._steps: list[_Step] = []  # steps launched and not yet read, oldest first (at most two, for a moment)
        self._previous_done = None  # the end of the last step read (an event on CUDA, else the host's clock)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.rows: list[Request | None] = [None] * slots
        self.graphs_captured, self.graph_capture_s, self.peak_rows = 0, 0.0, 0
        self.steps, self.prefills, self.prefill_calls = 0, 0, 0
        self.prefill_tokens, self.prefill_padded_tokens = 0, 0  # prompts' tokens, and the tokens their prefills computed
        self.steps_by_batch = dict.fromkeys(self.decode_sizes, 0)
        self.padded_steps = 0  # steps whose batch carried free rows (fewer active rows than a decode batch)
        self.wasted_rows = 0  # rows decoded a step after their request ended (at EOS, or cancelled): overlap's cost
        # the GPU's idle time between two decode steps with no prefill between (CUDA events; on CPU the
        # host's clock), and how many such gaps: what the host's turn between steps costs the GPU
        self.idle_s, self.idle_steps = 0.0, 0
        # the GPU's time in decode steps (each from its launch to its tokens' copy) and in prefills (each from its
        # launch to its first tokens' copy): CUDA events, on CPU the host's clock. Where a loaded server's time
        # goes: a burst's prefills decide its last TTFT, the steps its ITL
        self.decode_s, self.prefill_s = 0.0, 0.0
        self._stop, self._arrived = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.failed: BaseException | None = None

    @property
    def slots(self) -> int:
        return self.cache.slots

    # --- the steps -------------------------------------------------------------------------------

    def _prefill(self, ids: torch.Tensor, pad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Prompts left-padded to one width [batch, width] (`pad`: each one's padding) into the batch's
        scratch cache, their keys and values copied into `rows` of the slot cache; each one's first new
        token [batch]. Padded positions attend to themselves only (a position with nothing to attend to
        would make NaNs that reach real tokens through their values)."""
        scratch = self.scratch[ids.shape[0]]
        width = ids.shape[1]
        for layer in scratch.layers:
            layer.cumulative_length.zero_()
        query = torch.arange(width, device=ids.device)[:, None]
        key = torch.arange(self.max_prompt, device=ids.device)[None]
        allowed = ((key <= query)[None] & (key[None] >= pad[:, None, None])) | (key == query)[None]
        positions = (torch.arange(width, device=ids.device)[None] - pad[:, None]).clamp(min=0)
        logits = self.model(input_ids=ids, position_ids=positions, attention_mask=allowed[:, None],
                            past_key_values=scratch, use_cache=True, logits_to_keep=1).logits
        for source, target in zip(scratch.layers, self.cache.layers, strict=True):
            for mine, theirs in ((target.keys, source.keys), (target.values, source.values)):
                self.cache.rows(mine)[:, :, :width].index_copy_(1, rows, theirs[:, :, :width].transpose(0, 1))
        first = logits[:, -1].argmax(-1)
        self.last.index_copy_(0, rows, first)
        return first

    def _decode(self, batch: int) -> torch.Tensor:
        """One token for each of the first `batch` rows of the step's plan, each at its own position and
        attending over its own span of keys (`row_blocks`); their next tokens [batch], also kept as the
        rows' latest."""
        cache = self.cache
        rows, pos, start = self.step_plan[:batch].unbind(1)
        offset = rows * cache.max_len  # each row's first key in the layers' sequence
        cache.write_at[:batch].copy_(offset + pos)
        logits = self.model(input_ids=self.last[rows][:, None], position_ids=(pos - start)[:, None],
                            attention_mask=row_blocks(offset + start, offset + pos, cache.slots * cache.max_len),
                            past_key_values=cache, use_cache=True).logits
        made = logits[:, -1].argmax(-1)
        self.last.index_copy_(0, rows, made)
        return made

    def _build(self) -> None:
        """The steps as CUDA graphs on CUDA (the decode compiled, one prefill graph per batch and
        width), all captured now; eager on CPU."""
        shapes = [(b, w) for b in self.batches for w in self.widths]
        self.prefill_inputs = {(b, w): (torch.zeros(b, w, dtype=torch.long, device=self.device),
                                        torch.zeros(b, dtype=torch.long, device=self.device),
                                        torch.arange(b, device=self.device)) for b, w in shapes}
        # one compiled graph per decode batch (the batch is a constant of its graph)
        limit = torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit,
                                                               len(self.decode_sizes)))
        if not self.device.startswith("cuda"):
            self.prefill_run = {shape: (lambda shape=shape: self._prefill(*self.prefill_inputs[shape])) for shape in shapes}
            if self.dense_auto:  # each shape's choice, timed like CUDA's graphs, then set at each eager call
                self.prefill_run = {shape: self._faster(shape, {dense: (lambda run=run, dense=dense: self._in_dense(dense, run))
                                                                for dense in (False, True)})
                                    for shape, run in self.prefill_run.items()}
                self._settle_dense()
                self._clear()
            step = torch.compile(self._decode, backend=self.compile_backend, fullgraph=True, dynamic=False) \
                if self.compile_backend else self._decode
            self.decode_run = {b: (lambda b=b: step(b)) for b in self.decode_sizes}
            if self.compile_backend:  # traced now, as CUDA compiles at start-up
                with limit, torch.no_grad():
                    for run in self.decode_run.values():
                        run()
                self._clear()
            return
        started = time.perf_counter()
        # compiled by inductor without its CUDA graph trees, and captured here like the prefills: the trees
        # keep their state per thread, and refuse a thread other than the one that first imported them
        # (a second engine in one process, on a thread of its own, met that on an H100)
        step = torch.compile(self._decode, fullgraph=True, dynamic=False)
        pool = torch.cuda.graph_pool_handle()
        with limit, self._dense(False) if self.dense_auto else contextlib.nullcontext():
            self.decode_run = {b: _captured(lambda b=b: step(b), pool, warmups=2) for b in self.decode_sizes}

        def capture(shape: tuple[int, int]):
            return _captured(lambda: self._prefill(*self.prefill_inputs[shape]), pool)

        # dense_prefill auto: each shape captured both ways, the slower graph dropped
        self.prefill_run = {shape: self._faster(shape, {dense: self._in_dense(dense, lambda shape=shape: capture(shape))
                                                         for dense in (False, True)}) if self.dense_auto
                            else capture(shape) for shape in shapes}
        torch.cuda.synchronize()
        self.graphs_captured = len(self.decode_sizes) + (2 if self.dense_auto else 1) * len(shapes)
        self.graph_capture_s = time.perf_counter() - started
        self._settle_dense()
        self._clear()

    def _in_dense(self, on: bool, run):
        with self._dense(on):
            return run()

    @contextlib.contextmanager
    def _dense(self, on: bool):
        """dense_prefill auto: every quantized module's products dense (`on`) or on the kernel while inside;
        read where a graph is traced or captured (on CUDA), or at each eager call (on CPU)."""
        for module in self.dense_modules:
            module.dense_tokens = 1 if on else 0
        try:
            yield
        finally:
            for module in self.dense_modules:
                module.dense_tokens = 0

    def _faster(self, shape: tuple[int, int], variants: dict[bool, object]):
        """dense_prefill auto: the faster of a prefill of `shape`'s two `variants` (kernel: False, dense:
        True), timed on this device; both times and the choice are kept for /llmopt/stats."""
        with torch.no_grad():
            times = {dense: self._time_prefill(run, shape, dense) for dense, run in variants.items()}
        dense = times[True] < times[False]
        self.prefill_choice[shape] = {"kernel_ms": times[False], "dense_ms": times[True], "dense": dense}
        return variants[dense]

    def _time_prefill(self, run, shape: tuple[int, int], dense: bool) -> float:
        """Median milliseconds of a prefill `run` (its graph's replay on CUDA, between CUDA events, after two
        warm-up calls; on CPU the host's clock)."""
        for _ in range(2):
            run()
        times = []
        for _ in range(5):
            begun = self._clock()
            run()
            ended = self._clock()
            if isinstance(ended, torch.cuda.Event):
                ended.synchronize()
            times.append(1000 * self._seconds(begun, ended))
        return statistics.median(times)

    def _settle_dense(self) -> None:
        """dense_prefill auto, once every shape is chosen: where no shape runs dense, the kept codes are
        dropped (their memory back); else they stay, and on CPU each eager prefill sets its own choice."""
        if not self.dense_auto or any(c["dense"] for c in self.prefill_choice.values()):
            return
        for module in self.dense_modules:
            module.drop_dense()
        self.dense_modules = []

    def _clear(self) -> None:
        """The warm-up wrote rows that no request owns."""
        for layer in self.cache.layers:
            layer.keys.zero_()
            layer.values.zero_()
        self.last.zero_()

    # --- the loop --------------------------------------------------------------------------------

    def start(self) -> Engine:
        self.model.set_attn_implementation(ATTENTION)
        ready, failed = threading.Event(), []

        def run():
            try:
                self._build()
            except BaseException as e:  # noqa: BLE001 (reported to start(), which raises it)
                failed.append(e)
                ready.set()
                return
            ready.set()
            try:
                with torch.no_grad():
                    self._loop()
            except BaseException as e:  # noqa: BLE001 (kept for /health and the log; requests end with an error)
                self.failed = e
                log.exception("engine llmopt: the serving loop failed")
                self._fail_all()

        self._thread = threading.Thread(target=run, name="llmopt-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self.model.set_attn_implementation(self.loaded_attention)
            raise failed[0]
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.model.set_attn_implementation(self.loaded_attention)

    def submit(self, request: Request) -> None:
        if not request.ids:
            raise ValueError("the prompt is empty: a request needs at least one token")
        if len(request.ids) > self.max_prompt:
            raise ValueError(f"the prompt has {len(request.ids)} tokens; this server takes up to {self.max_prompt}")
        if not 1 <= request.max_new <= self.max_new:
            raise ValueError(f"max_tokens is {request.max_new}; this server makes 1 to {self.max_new} tokens a request")
        if self.failed is not None:
            raise RuntimeError(f"the serving loop failed: {self.failed}")
        self.waiting.put(request)
        self._arrived.set()

    def complete(self, prompts: list[list[int]], lengths: list[int], eos: frozenset = frozenset(),
                 timeout_s: float = 600) -> list[list[int]]:
        """Each prompt's tokens (up to its length, or to `eos`), all submitted at once and served as
        they would be under load: the offline use of the engine, and what its tests compare."""
        out: list[list[int]] = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]

        def deliver(i: int):
            return lambda token: done[i].set() if token is None else out[i].append(token)

        for i, (ids, n) in enumerate(zip(prompts, lengths, strict=True)):
            self.submit(Request(ids=ids, max_new=n, deliver=deliver(i), eos=eos))
        for i, event in enumerate(done):
            if not event.wait(timeout_s):
                raise TimeoutError(f"request {i} did not end within {timeout_s:g} s")
        if self.failed is not None:
            raise RuntimeError(f"the serving loop failed: {self.failed}") from self.failed
        return out

    def _fail_all(self) -> None:
        """The loop failed: every request it holds (in a row, in the step in flight, waiting) ends with an
        error; the in-flight step's tokens are not delivered."""
        held = [r for step in self._steps for _, r in step.entries] + [r for r in self.rows if r is not None]
        self._steps = []
        while not self.waiting.empty():
            held.append(self.waiting.get_nowait())
        self.rows = [None] * self.slots
        for request in dict.fromkeys(held):  # once each, in order
            if not request.ended:
                request.finish, request.ended = "error", True
                request.deliver(None)

    def _read(self, values: torch.Tensor) -> list[int]:
        """Token ids from the device, waiting for them with the GIL released on CUDA."""
        if self._copied is None:
            return values.tolist()
        host = self._host[:values.numel()]
        host.copy_(values, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()
        return host.tolist()

    def _clock(self) -> torch.cuda.Event | float:
        """Now on the engine's stream: a CUDA event recorded on it, on CPU the host's clock."""
        if self._copied is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _seconds(begun: torch.cuda.Event | float, ended: torch.cuda.Event | float) -> float:
        """Seconds between two `_clock` readings (the later one's event complete)."""
        if isinstance(begun, torch.cuda.Event):
            return begun.elapsed_time(ended) / 1000
        return ended - begun

    def _waiting(self, most: int) -> list[Request]:
        """Up to `most` waiting requests, oldest first (cancelled ones ended on the way)."""
        taken: list[Request] = []
        while len(taken) < most:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled:
                request.deliver(None)
            else:
                taken.append(request)
        return taken

    def _admit(self, positions: list[int], starts: list[int]) -> int:
        """Prefill waiting requests into free rows (the oldest first, as many as there are free rows),
        in batches of PREFILL_BATCHES (the largest that the waiting requests fill), each padded to the
        widest prompt of its batch; each request's first token goes out at once. The requests of one
        turn are batched by prompt length, so a batch pads its prompts to a width near their own: a
        burst's prefills are compute-bound, and its last TTFT is the burst's padded tokens. A prefill
        runs after the step in flight (one stream): a row freed while that step still writes it is
        overwritten in order."""
        free = [i for i, request in enumerate(self.rows) if request is None]
        taken = sorted(self._waiting(len(free)), key=lambda r: len(r.ids))
        admitted = len(taken)
        while taken:
            k = max(b for b in self.batches if b <= len(taken))
            batch, taken = taken[:k], taken[k:]
            rows, free = free[:k], free[k:]
            width = next(w for w in self.widths if w >= max(len(r.ids) for r in batch))
            ids, pad, row_ids = self.prefill_inputs[(k, width)]
            ids.copy_(torch.tensor([[0] * (width - len(r.ids)) + r.ids for r in batch]))
            pad.copy_(torch.tensor([width - len(r.ids) for r in batch]))
            row_ids.copy_(torch.tensor(rows))
            begun = self._clock()
            first = self.prefill_run[(k, width)]()
            ended = self._clock()
            self.prefills += k
            self.prefill_calls += 1
            self.prefill_tokens += sum(len(r.ids) for r in batch)
            self.prefill_padded_tokens += k * width
            tokens = self._read(first)  # waits for the prefill: its end is known now
            self.prefill_s += self._seconds(begun, ended)
            for i, request, token in zip(rows, batch, tokens, strict=True):
                request.made = request.launched = 1
                request.deliver(token)
                if request.max_new == 1 or token in request.eos:
                    request.finish = "stop" if token in request.eos and request.max_new > 1 else "length"
                    request.ended = True
                    request.deliver(None)
                    continue
                self.rows[i] = request
                positions[i], starts[i] = width, width - len(request.ids)
        return admitted

    def _launch(self, plan: list[int], positions: list[int], starts: list[int], after_prefill: bool) -> _Step:
        """Launch a decode step for the rows in `plan` (gathered into the smallest decode batch that holds
        them, padded with a row outside the plan), its tokens' copy to the host behind it; advance the
        rows' positions. A row whose request's last token this step makes is free from now: a prefill
        into it runs after this step."""
        cuda = self._copied is not None
        k = self._launched % 2
        self._launched += 1
        batch = next(b for b in self.decode_sizes if b >= len(plan))
        planned = set(plan)
        spare = [next(i for i in range(self.slots) if i not in planned)] * (batch - len(plan)) if batch > len(plan) \
            else []
        self._plans[k][:batch] = torch.tensor([(i, positions[i], starts[i]) for i in plan] + [(i, 0, 0) for i in spare])
        begun = self._clock()
        self.step_plan[:batch].copy_(self._plans[k][:batch], non_blocking=True)
        out = self.decode_run[batch]()
        if cuda:
            host = self._hosts[k][:len(plan)]
            host.copy_(out[:len(plan)], non_blocking=True)
        else:
            host = out[:len(plan)].clone()
        done = self._clock()
        entries = []
        for i in plan:
            request = self.rows[i]
            entries.append((i, request))
            positions[i] += 1
            request.launched += 1
            if request.launched >= request.max_new:
                self.rows[i] = None
        self.steps += 1
        self.steps_by_batch[batch] += 1
        self.padded_steps += bool(spare)
        return _Step(entries, host, done, begun, after_prefill)

    def _finish(self, step: _Step) -> None:
        """Read a launched step's tokens (waiting without the GIL on CUDA) and deliver them; a request
        ends at its length, its EOS or its cancellation, and frees its row if it still holds it."""
        if isinstance(step.done, torch.cuda.Event):
            step.done.synchronize()
        tokens = step.host.tolist()
        self.decode_s += self._seconds(step.begun, step.done)
        if not step.after_prefill and self._previous_done is not None:  # the gap since the previous step's end
            if isinstance(step.begun, torch.cuda.Event):
                self.idle_s += max(self._previous_done.elapsed_time(step.begun), 0.0) / 1000
            else:
                self.idle_s += max(step.begun - self._previous_done, 0.0)
            self.idle_steps += 1
        self._previous_done = step.done
        for (i, request), token in zip(step.entries, tokens, strict=True):
            if request.ended:  # ended at an earlier step's EOS, or failed: this step's row was wasted
                self.wasted_rows += 1
                continue
            request.made += 1
            request.deliver(token)
            eos = token in request.eos
            if request.cancelled or request.made >= request.max_new or eos:
                request.finish = "stop" if eos and request.made < request.max_new else "length"
                request.ended = True
                request.deliver(None)
                if self.rows[i] is request:
                    self.rows[i] = None

    def _loop(self) -> None:
        """Steps overlapped with the host's turn: step k + 1 is launched before step k's tokens are read,
        so the GPU runs step k + 1 while the host reads and delivers step k's tokens, admits requests and
        plans; it idles between steps only when that turn outlasts a step. What step k + 1 cannot know:
        which rows step k ends at EOS (or which clients left). Those rows run one step more, their token
        dropped (`wasted_rows`); a row ended by its length is known at launch and planned no further.
        As vLLM's async scheduling and SGLang's overlap scheduler do."""
        positions, starts = [0] * self.slots, [0] * self.slots
        while not self._stop.is_set():
            prefilled = self._admit(positions, starts)
            plan = [i for i, r in enumerate(self.rows) if r is not None]
            self.peak_rows = max(self.peak_rows, len(plan))
            if plan:
                self._steps.append(self._launch(plan, positions, starts, after_prefill=bool(prefilled) or not self._steps))
            if self._steps and (len(self._steps) > 1 or not plan):
                self._finish(self._steps[0])  # the older step, while the GPU runs the newer one
                self._steps.pop(0)
            elif not plan:
                self._previous_done = None
                self._arrived.wait(0.1)  # idle: wait for a request
                self._arrived.clear()
        while self._steps:
            self._finish(self._steps[0])
            self._steps.pop(0)

    def stats(self) -> dict:
        """The rows as `/llmopt/stats` reports a KV cache: a row is a block of `max_len` tokens."""
        return {"kv_blocks": self.slots, "kv_block_size": self.max_len, "kv_bytes_reserved": self.cache.bytes,
                "kv_blocks_used_peak": self.peak_rows, "kv_bytes_used_peak": self.cache.bytes * self.peak_rows // self.slots,
                "graphs_captured": self.graphs_captured, "graph_capture_s": self.graph_capture_s,
                "engine": {"name": "llmopt", "slots": self.slots, "max_prompt_tokens": self.max_prompt,
                           "max_new_tokens": self.max_new, "prefill_widths": self.widths,
                           "prefill_batches": self.batches, "sampling": "greedy",
                           "attention": {"decode": f"flex, blocks of {KV_BLOCK} keys", "prefill": "sdpa"},
                           "decode_batches": self.decode_sizes, "steps": self.steps,
                           "steps_by_batch": {str(b): n for b, n in self.steps_by_batch.items()},
                           "padded_steps": self.padded_steps, "wasted_rows": self.wasted_rows,
                           "prefills": self.prefills,
                           # the GPU's idle time between two decode steps with no prefill between
                           "idle_ms_between_steps": 1000 * self.idle_s / max(self.idle_steps, 1),
                           "idle_s": self.idle_s, "idle_steps": self.idle_steps,
                           "decode_s": self.decode_s, "prefill_s": self.prefill_s,
                           "prefill_tokens": self.prefill_tokens, "prefill_padded_tokens": self.prefill_padded_tokens,
                           "prefill_calls": self.prefill_calls,
                           # dense_prefill auto: per prefill shape (batch x width), the kernel's and the dense product's
                           # milliseconds at start-up and which runs
                           "dense_prefill": {f"{b}x{w}": c for (b, w), c in self.prefill_choice.items()} if
                           self.dense_auto else None,
                           "dense_codes_kept": bool(self.dense_modules)}}


class Mailbox:
    """Tokens from the engine's thread to the HTTP server's event loop: one wake-up of a loop for all
    that arrive before it runs (a step's tokens for every stream), not one a token."""

    def __init__(self):
        self.lock, self.items = threading.Lock(), {}  # per event loop: the (stream's queue, token) pairs not yet put

    def put(self, loop, stream, token) -> None:
        with self.lock:
            waiting = loop in self.items
            self.items.setdefault(loop, []).append((stream, token))
        if not waiting:
            loop.call_soon_threadsafe(self._drain, loop)

    def _drain(self, loop) -> None:
        with self.lock:
            items = self.items.pop(loop)
        for stream, token in items:
            stream.put_nowait(token)


class Detokenizer:
    """Streamed text, token by token (a byte-level tokenizer may need the next token to finish a
    character; such text waits). A fast tokenizer that cleans up no spaces streams through its own
    incremental decoder (`tokenizers`' DecodeStream, one Rust call a token); others as the difference
    of two decodes over a short window. On this project's 2-core machine the two decodes cost 6 us a
    token with SmolLM2's tokenizer and 16 with the tiny Llama's, the incremental decoder 1.2 and 0.7;
    the HTTP side's whole work was about 50 us a streamed token (64 streams from a stand-in engine),
    most of it Starlette's and uvicorn's streaming, so this is a small part of it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = None
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream

            self.stream, self.backend = DecodeStream(skip_special_tokens=True), backend

    def add(self, token: int) -> str:
        if self.stream is not None:
            return self.stream.step(self.backend, token) or ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


def eos_ids(model, tokenizer) -> frozenset[int]:
    """The tokens that end a request (unless it asks `ignore_eos`): the generation config's and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return frozenset(t for t in [*ids, tokenizer.eos_token_id] if isinstance(t, int))


def app(engine: Engine, tokenizer, model_name: str, stats):
    """The OpenAI-compatible HTTP front of `engine` (FastAPI)."""
    import asyncio
    import json
    import uuid

    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse

    api = FastAPI()
    eos = eos_ids(engine.model, tokenizer)
    mailbox = Mailbox()

    @api.get("/health")
    def health():
        if engine.failed is not None:
            return JSONResponse({"status": "failed", "error": str(engine.failed)}, status_code=503)
        return {"status": "ok"}

    @api.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "llmopt"}]}

    @api.get("/llmopt/stats")
    def llmopt_stats():
        return stats()

    @api.post("/v1/completions")
    async def completions(http: HttpRequest):
        try:
            body = await http.json()
            max_new = int(body.get("max_tokens") or 16)
        except (ValueError, TypeError, AttributeError) as e:
            raise HTTPException(400, f"the body is not a completion request's JSON: {e}") from e
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise HTTPException(400, "prompt: one string or one list of token ids")
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
            raise HTTPException(400, "n, best_of: engine llmopt makes one completion a request")
        if body.get("stop"):
            raise HTTPException(400, "stop: engine llmopt does not take stop sequences")
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
        request = Request(ids=ids, max_new=max_new, deliver=lambda token: mailbox.put(loop, tokens, token),
                          eos=frozenset() if body.get("ignore_eos") else eos)
        try:
            engine.submit(request)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        except RuntimeError as e:
            raise HTTPException(503, str(e)) from e
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": request.made, "total_tokens": len(ids) + request.made}

        def chunk(text: str, finish: str | None, with_usage: bool) -> str:
            data = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            if with_usage:
                data["usage"] = usage()
            return f"data: {json.dumps(data)}\n\n"

        detokenizer = Detokenizer(tokenizer)
        options = body.get("stream_options") or {}
        if body.get("stream"):
            async def events():
                try:
                    while (token := await tokens.get()) is not None:
                        if text := detokenizer.add(token):
                            yield chunk(text, None, bool(options.get("continuous_usage_stats")))
                    if request.finish == "error":
                        yield f"data: {json.dumps({'error': {'message': str(engine.failed), 'type': 'server_error'}})}\n\n"
                        return
                    yield chunk("", request.finish, bool(options.get("include_usage")))
                    yield "data: [DONE]\n\n"
                finally:
                    request.cancelled = True  # a client gone mid-stream frees its row at the next step

            return StreamingResponse(events(), media_type="text/event-stream")
        text = []
        try:
            while (token := await tokens.get()) is not None:
                text.append(detokenizer.add(token))
        finally:
            request.cancelled = True
        if request.finish == "error":
            raise HTTPException(500, f"the serving loop failed: {engine.failed}")
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": request.finish}],
                "usage": usage()}

    return api


def serve(spec: dict, model, tokenizer, stats_extra) -> int:
    """Run the engine behind HTTP until SIGTERM or SIGINT (uvicorn handles both)."""
    import sys

    import uvicorn

    options = spec.get("engine_options", {})
    # the engine's thread and the HTTP thread share the GIL: hand it over within 1 ms, not Python's 5, so
    # that streaming many requests' text does not hold the next step back
    sys.setswitchinterval(0.001)
    started = time.perf_counter()
    dense = options.get("dense_prefill_tokens")
    engine = Engine(model, spec["device"], int(options["slots"]), int(options["max_prompt_tokens"]),
                    int(options["max_new_tokens"]), dense_prefill="auto" if dense == "auto" else None).start()
    print(f"llmopt.engine: {engine.slots} rows of {engine.max_len} tokens ({engine.cache.bytes / 1e9:.2f} GB), prompts "
          f"padded to {engine.widths}; {engine.graphs_captured} CUDA graphs in {time.perf_counter() - started:.1f} s",
          flush=True)
    api = app(engine, tokenizer, spec["model_name"], lambda: {**engine.stats(), **stats_extra()})
    config = uvicorn.Config(api, host=spec.get("host", "127.0.0.1"), port=int(spec["port"]), log_level="warning")
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        engine.stop()
    return 0 if engine.failed is None else 1
