"""engine llmopt (llmopt.engine): continuous batching over a static cache of rows, on CPU with the
shipped tiny Llama. What it must get right: each row's own positions, mask and left padding, rows
reused by later requests, and the same greedy tokens as `generate` for every request however the
requests overlap."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import greedy_by_forward_passes
from llmopt.engine import KV_BLOCK, Detokenizer, Engine, Request, decode_batches, prefill_widths, row_blocks
from llmopt.models import load_plain, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_plain(tiny_model, "cpu", "float32"), load_tokenizer(tiny_model)


def test_rows_decode_what_generate_decodes(tiny):
    """7 requests of different prompt lengths (padded to 32 and 64) and output lengths on 3 rows:
    prefilled in batches (prompts of different lengths padded to one width), rows taken, freed and
    taken again mid-stream, decode steps of 3 rows and of 2 (two rows gathered, or one and a free
    row), and every request's tokens equal greedy decoding's by whole forward passes."""
    model, _ = tiny
    engine = Engine(model, "cpu", slots=3, max_prompt=50, max_new=24, smallest_batch=2).start()
    try:
        assert engine.widths == [32, 64] and engine.max_len == 128, "64 + 24 keys, in whole blocks of 64"
        g = torch.Generator().manual_seed(0)
        lengths = [5, 31, 32, 33, 50, 1, 17]
        prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
        outputs = [24, 3, 10, 1, 24, 7, 12]
        got = engine.complete(prompts, outputs)
        assert engine.peak_rows == 3 and engine.prefills == 7, "all three rows in use, every request prefilled once"
        assert engine.batches == [1, 2] and engine.prefill_calls < 7, "the first three prefilled as a batch of 2 and 1"
        assert engine.decode_sizes == [2, 3] and min(engine.steps_by_batch.values()) > 0
        assert engine.idle_steps > 0 and engine.idle_s > 0, "the time between decode steps is counted"
        padded = engine.padded_steps
        [alone] = engine.complete([prompts[0]], [9])
        assert engine.padded_steps == padded + 8, "a lone request's 8 decode steps ran as a batch of 2 with a free row"
    finally:
        engine.stop()
    assert alone == got[0][:9]
    assert model.config._attn_implementation == "sdpa", "the model's own attention given back by stop()"
    for ids, n, tokens in zip(prompts, outputs, got, strict=True):
        assert tokens == greedy_by_forward_passes(model, ids, n), f"prompt of {len(ids)} tokens, {n} out"


def test_requests_waiting_together_are_prefilled_by_length(tiny):
    """Three requests waiting together (prompts of 40, 5 and 6 tokens) on 3 rows are prefilled as a batch
    of 2 and one of 1: by length, the 5 and 6 share a width of 32 and the 40 has 64 to itself (128
    tokens computed); in arrival order the 40 and 5 would pad to 64 together (160). Each request's
    tokens stay greedy decoding's."""
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (40, 5, 6)]
    out: list[list[int]] = [[], [], []]
    engine = Engine(model, "cpu", slots=3, max_prompt=40, max_new=4)
    for i, ids in enumerate(prompts):  # all waiting before the loop starts
        engine.submit(Request(ids=ids, max_new=4, deliver=lambda t, i=i: t is not None and out[i].append(t)))
    started = time.monotonic()
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while any(len(o) < 4 for o in out) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert (engine.prefill_calls, engine.prefill_tokens, engine.prefill_padded_tokens) == (2, 51, 128)
    assert out == [greedy_by_forward_passes(model, ids, 4) for ids in prompts]
    # the time in prefills and in decode steps, counted apart: one loop runs both, one after the other
    assert engine.prefill_s > 0 and engine.decode_s > 0 and engine.steps == 3
    assert engine.prefill_s + engine.decode_s < time.monotonic() - started


def test_a_request_ends_at_eos_unless_it_ignores_it(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (12,), generator=g).tolist()
    expected = greedy_by_forward_passes(model, ids, 8)
    engine = Engine(model, "cpu", slots=2, max_prompt=16, max_new=8).start()
    try:
        stop_at = expected[3]
        [ended] = engine.complete([ids], [8], eos=frozenset({stop_at}))
        [full] = engine.complete([ids], [8])
    finally:
        engine.stop()
    assert ended == expected[:expected.index(stop_at) + 1] and full == expected


def test_a_row_ended_at_eos_runs_one_step_more_and_serves_the_next_request(tiny):
    """Steps overlap the host's turn: step k + 1 is launched before step k's tokens are read, so a row
    whose request step k ends at EOS runs step k + 1 too, its token dropped (one wasted row), while a
    request ended by its length is planned no further (none wasted). On one row, the next request then
    takes that row, which the wasted step wrote one position past the EOS; its tokens stay greedy
    decoding's (the prefill rewrites the row, and a decode step writes each position before reading it)."""
    model, _ = tiny
    g = torch.Generator().manual_seed(4)
    first, second = (torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (30, 6))
    expected = greedy_by_forward_passes(model, first, 10)
    stop_at = expected[4]
    assert stop_at not in expected[:4], "the test's EOS ends the first request at its fifth token"
    engine = Engine(model, "cpu", slots=1, max_prompt=32, max_new=10, smallest_batch=1).start()
    try:
        [by_length] = engine.complete([first], [10])
        assert (engine.wasted_rows, engine.steps) == (0, 9), "ended by its length: 9 decode steps, none wasted"
        ended, after = engine.complete([first, second], [10, 10], eos=frozenset({stop_at}))
    finally:
        engine.stop()  # the loop reads the steps still in flight before it ends: the counts are whole
    eos_again = 1 < len(after) < 10  # the second request may meet the same EOS at a decode step: one more wasted row
    assert engine.wasted_rows == 1 + eos_again, "the first request's row decoded one step past its EOS"
    assert engine.steps == 9 + (4 + 1) + (len(after) - 1 + eos_again), "4 decode steps to the EOS, 1 wasted"
    assert by_length == expected and ended == expected[:5]
    assert after == greedy_by_forward_passes(model, second, len(after)) and (len(after) == 10 or after[-1] == stop_at)


def test_a_client_that_leaves_frees_its_row_for_the_next_request(tiny):
    """A request cancelled mid-stream (its client gone: the HTTP side sets `cancelled`) ends at the step
    that sees it, its row's in-flight step wasted, and the request waiting for that one row is served
    with greedy decoding's tokens."""
    model, _ = tiny
    g = torch.Generator().manual_seed(5)
    first, second = (torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (9, 14))
    got: list[list[int]] = [[], []]
    ended = [threading.Event(), threading.Event()]

    def deliver(i, request_of):
        def take(token):
            if token is None:
                ended[i].set()
                return
            got[i].append(token)
            if i == 0 and len(got[0]) == 3:
                request_of[0].cancelled = True  # the client leaves after its third token
        return take

    holder: list[Request] = []
    leaving = Request(ids=first, max_new=20, deliver=deliver(0, holder))
    holder.append(leaving)
    staying = Request(ids=second, max_new=8, deliver=deliver(1, holder))
    engine = Engine(model, "cpu", slots=1, max_prompt=16, max_new=20, smallest_batch=1).start()
    try:
        engine.submit(leaving)
        engine.submit(staying)
        assert all(e.wait(60) for e in ended)
    finally:
        engine.stop()
    assert got[0] == greedy_by_forward_passes(model, first, 3) and leaving.ended
    assert got[1] == greedy_by_forward_passes(model, second, 8)
    assert engine.wasted_rows == 1 and engine.steps == 2 + 1 + 7, "2 steps to the third token, 1 wasted, 7 for the next"


def test_decode_batches_grow_by_powers_of_two_to_the_rows():
    assert decode_batches(64) == [16, 32, 64] and decode_batches(100) == [16, 32, 64, 100]
    assert decode_batches(16) == [16] and decode_batches(3) == [3] and decode_batches(5, 1) == [1, 2, 4, 5]


def test_requests_that_do_not_fit_are_refused(tiny):
    model, _ = tiny
    engine = Engine(model, "cpu", slots=1, max_prompt=40, max_new=4)
    with pytest.raises(ValueError, match="the prompt has 65 tokens; this server takes up to 64"):
        engine.submit(Request(ids=[5] * 65, max_new=1, deliver=print))
    with pytest.raises(ValueError, match="max_tokens is 5; this server makes 1 to 4 tokens a request"):
        engine.submit(Request(ids=[5], max_new=5, deliver=print))
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit(Request(ids=[], max_new=1, deliver=print))
    assert prefill_widths(1) == [32] and prefill_widths(64) == [32, 64] and prefill_widths(65) == [32, 64, 96]


def test_a_steps_tokens_wake_the_http_loop_once():
    """The engine's thread hands a step's tokens for every stream to the HTTP loop with one wake-up
    (`call_soon_threadsafe`), not one a token; each stream's queue gets its own tokens in order."""
    from llmopt.engine import Mailbox

    class Loop:
        def __init__(self):
            self.calls = []

        def call_soon_threadsafe(self, fn, *args):
            self.calls.append((fn, args))

    class Stream(list):
        put_nowait = list.append

    loop, mailbox, a, b = Loop(), Mailbox(), Stream(), Stream()
    for stream, token in ((a, 1), (b, 7), (a, 2), (b, None), (a, 3)):
        mailbox.put(loop, stream, token)
    assert len(loop.calls) == 1 and a == [] and b == []
    fn, args = loop.calls.pop()
    fn(*args)
    assert a == [1, 2, 3] and b == [7, None]
    mailbox.put(loop, a, None)
    assert len(loop.calls) == 1, "the next step's tokens wake the loop again"


def _trained_tokenizer(kind: str):
    """A small fast tokenizer trained here: byte-level BPE over every byte (a character of several
    bytes is several tokens), or SentencePiece-style (Metaspace, Llama's decoder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["Once upon a time a little fox found a shiny stone.", "naïve café, 東京"] * 20
    special = ["<unk>", "<s>", "</s>"]
    if kind == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([t.replace("東京", "") for t in text], trainer)  # 東京: bytes, not merged
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


@pytest.mark.parametrize("which", ["tiny", "byte-level", "metaspace"])
@pytest.mark.parametrize("path", ["stream", "window"])
def test_detokenizer_streams_the_decoded_text(tiny, which, path):
    """Concatenated, the streamed pieces are the whole decode, a special token skipped and characters
    of several bytes whole (over several byte-level tokens), through the fast tokenizer's incremental
    decoder and through the two-decode window (tokenizers without one)."""
    tokenizer = tiny[1] if which == "tiny" else _trained_tokenizer(which)
    ids = tokenizer.encode("Once upon a time, a little fox found a shiny stone: naïve café, 東京.", add_special_tokens=False)
    ids = ids[:6] + [tokenizer.eos_token_id] + ids[6:]
    detokenizer = Detokenizer(tokenizer)
    assert detokenizer.stream is not None, "a fast tokenizer that cleans up no spaces streams incrementally"
    if path == "window":
        detokenizer.stream = None
    pieces = [detokenizer.add(t) for t in ids]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == whole and "</s>" not in whole
    assert sum(1 for p in pieces if p) > len(ids) // 3, "most tokens stream text of their own"
    if which != "tiny":  # the shipped tiny vocabulary has no bytes beyond its stories' ASCII
        assert "東京" in whole and "naïve" in whole
    if which == "byte-level":
        assert len(tokenizer.encode("東京", add_special_tokens=False)) == 6, "a byte a token: text waits for whole characters"


def test_the_openai_completions_api_streams_token_by_token(tiny):
    """/v1/completions as GuideLLM calls it (streamed, usage at the end, ignore_eos, max_tokens), and
    unstreamed; requests the engine cannot serve get a 400 with the reason; /llmopt/stats reports
    the rows as a KV cache."""
    import json

    from fastapi.testclient import TestClient
    from llmopt.engine import app

    model, tokenizer = tiny
    engine = Engine(model, "cpu", slots=2, max_prompt=40, max_new=12).start()
    try:
        client = TestClient(app(engine, tokenizer, "tiny", lambda: {**engine.stats(), "kernel": "none"}))
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, "stop": None}
        streamed = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
        events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["text"] for c in chunks[:-1])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        prompt_ids = tokenizer.encode("Once upon a time")
        assert chunks[-1]["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 12,
                                       "total_tokens": len(prompt_ids) + 12}
        assert len(chunks) - 1 >= 10, "about one chunk a token"
        whole = client.post("/v1/completions", json=body).json()
        expected = tokenizer.decode(greedy_by_forward_passes(model, prompt_ids, 12), skip_special_tokens=True)
        assert whole["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks) == expected
        too_long = client.post("/v1/completions", json={**body, "prompt": list(range(3, 73))})
        assert too_long.status_code == 400 and "the prompt has 70 tokens; this server takes up to 64" in too_long.text
        garbled = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert garbled.status_code == 400 and "not a completion request's JSON" in garbled.text
        stop = client.post("/v1/completions", json={**body, "stop": ["."]})
        assert stop.status_code == 400 and "stop sequences" in stop.text
        stats = client.get("/llmopt/stats").json()
        assert (stats["kv_blocks"], stats["kv_block_size"], stats["engine"]["sampling"]) == (2, 128, "greedy")
        assert stats["kv_blocks_used_peak"] == 1 and stats["engine"]["prefills"] == 2
    finally:
        engine.stop()


def test_the_decode_step_traces_whole_and_once(tiny):
    """CUDA compiles the decode step (fullgraph, then CUDA graphs): traced here on CPU by torch.compile
    (aot_eager), it is one graph per decode batch (1 and 2 rows), all traced at start-up, that rows
    coming and going never recompile, with the same tokens."""
    model, _ = tiny
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = Engine(model, "cpu", slots=2, max_prompt=20, max_new=9, compile_backend="aot_eager", smallest_batch=1).start()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    try:
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (4, 20, 9)]
        got = engine.complete(prompts, [6, 2, 9])
    finally:
        engine.stop()
    assert got == [greedy_by_forward_passes(model, ids, n) for ids, n in zip(prompts, [6, 2, 9], strict=True)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 and min(engine.steps_by_batch.values()) > 0


def test_the_decode_step_writes_the_cache_in_place(tiny):
    """The decode step as inductor receives it (traced and functionalized by AOT autograd, inference input
    mutations kept, as inductor compiles it): each write to a layer's keys or values is an `index_copy` of
    that layer's tensor itself, copied back into it, which inductor turns into an in-place write of the
    step's rows. A write through a view of the layer (`keys[0].index_copy_`) traced into a `select_scatter`
    of the whole layer, which inductor kept as a copy of the layer and a copy back: four times the
    cache's bytes a step (on an H100 a 7B's decode step took about 27 ms whatever its weights)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    model, _ = tiny
    graphs = []

    def keep_graph(gm, inputs):
        def forward(graph, _):
            graphs.append(graph.graph)
            return make_boxed_func(graph.forward)

        return aot_module_simplified(gm, inputs, fw_compiler=forward, keep_inference_input_mutations=True)

    torch._dynamo.reset()
    engine = Engine(model, "cpu", slots=2, max_prompt=20, max_new=9, compile_backend=keep_graph, smallest_batch=1).start()
    engine.stop()
    torch._dynamo.reset()
    layer_shape = engine.cache.layers[0].keys.shape
    assert len(graphs) == 2  # one decode batch of 1 row, one of 2
    for graph in graphs:
        writes = [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default
                  and n.args[0].op == "placeholder" and n.args[0].meta["val"].shape == layer_shape]
        assert len(writes) == 2 * model.config.num_hidden_layers  # keys and values of every layer
        for write in writes:
            cache, written = write.args
            assert written.target is torch.ops.aten.index_copy.default and written.args[0] is cache, \
                f"{written.target} writes the cache"


def test_a_decode_step_reads_only_the_blocks_of_each_rows_own_span():
    """The block list FlexAttention's kernel reads (on CPU FlexAttention applies only the mask, so the
    greedy tests above cannot see a wrong list): for each row, exactly the blocks from the one holding
    its first real position to the one holding its current position, and within them the mask keeps
    exactly that span. A row no request holds (start = position = 0) reads one block."""
    max_len = 4 * KV_BLOCK
    spans = [(0, 0), (10, 20), (KV_BLOCK - 1, KV_BLOCK), (70, 4 * KV_BLOCK - 1), (KV_BLOCK, 3 * KV_BLOCK - 1), (0, 3 * KV_BLOCK)]
    start, pos = (torch.tensor(x) for x in zip(*spans, strict=True))
    mask = row_blocks(start, pos, max_len)
    assert mask.shape == (len(spans), 1, 1, max_len)
    read = mask.to_dense()[:, 0, 0].tolist()  # [rows, blocks]: 1 where the kernel reads the block
    expected = [[int(a // KV_BLOCK <= k <= b // KV_BLOCK) for k in range(4)] for a, b in spans]
    assert read == expected
    keys = torch.arange(max_len)
    inside = torch.stack([mask.mask_mod(torch.tensor(r), 0, 0, keys) for r in range(len(spans))])
    assert inside.tolist() == [[a <= k <= b for k in range(max_len)] for a, b in spans]
