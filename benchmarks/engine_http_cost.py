"""What engine llmopt's HTTP side costs a streamed token, on the host's CPU: its OpenAI-compatible app
(llmopt.engine.app, under uvicorn, as `llmopt.serve` runs it) in front of a stand-in engine that makes
one token for every active request each STEP_MS, streamed to concurrent clients (httpx, in this
process, a core of their own). The figure is the server process's CPU seconds (its HTTP thread and
the stand-in, which does next to nothing) over the tokens it delivered. Not a test: a figure.

    python benchmarks/engine_http_cost.py TOKENIZER_DIR [STREAMS] [TOKENS] [ROUNDS]

On the project's 2-core machine (2026-12-06), SmolLM2's tokenizer, 64 streams of 128 tokens, 3 rounds,
10 ms steps: 43.5-52.1 us a token over three runs (about 3 ms of a 64-stream step), most of it
Starlette's and uvicorn's streaming.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path


def serve(tokenizer_dir: str, port: int, step_s: float) -> None:
    import uvicorn
    from llmopt.engine import app
    from llmopt.models import load_tokenizer

    vocab = list(range(100, 400))

    class StandIn:
        """Each step, one token for every active request (ids that decode to text), then its end."""

        def __init__(self):
            self.model = types.SimpleNamespace(generation_config=None)
            self.failed, self.active, self.lock, self.tokens = None, [], threading.Lock(), 0
            threading.Thread(target=self.loop, daemon=True).start()

        def submit(self, request):
            request.made = 1
            request.deliver(vocab[len(request.ids) % len(vocab)])
            with self.lock:
                self.active.append(request)

        def loop(self):
            while True:
                time.sleep(step_s)
                with self.lock:
                    active = list(self.active)
                for request in active:
                    request.made += 1
                    self.tokens += 1
                    request.deliver(vocab[request.made * 7 % len(vocab)])
                    if request.made >= request.max_new:
                        request.deliver(None)
                        with self.lock:
                            self.active.remove(request)

    engine = StandIn()
    api = app(engine, load_tokenizer(Path(tokenizer_dir)), "m", lambda: {})
    started = time.process_time()

    def report(*_):
        cpu = time.process_time() - started
        print(f"{engine.tokens} tokens, {cpu:.2f} CPU s: {1e6 * cpu / max(engine.tokens, 1):.1f} us a token", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    sys.setswitchinterval(0.001)  # as llmopt.engine.serve sets it
    uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning")).run()


async def load(port: int, streams: int, tokens: int, rounds: int) -> float:
    import httpx

    body = {"model": "m", "prompt": "hello world " * 20, "max_tokens": tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}

    async def one(client):
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass

    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as client:
        started = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*[one(client) for _ in range(streams)])
        return time.perf_counter() - started


def main(tokenizer_dir: str, streams: int = 64, tokens: int = 128, rounds: int = 3) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", tokenizer_dir, str(port)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "STEP_MS": os.environ.get("STEP_MS", "10")})
    try:
        for _ in range(600):  # the app imports torch and transformers: up to a minute
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            sys.exit("the server did not start")
        took = asyncio.run(load(port, streams, tokens, rounds))
        print(f"{streams} streams x {tokens} tokens x {rounds} rounds in {took:.1f} s")
    finally:
        server.send_signal(signal.SIGTERM)
        print(server.communicate(timeout=30)[0].strip())


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), float(os.environ.get("STEP_MS", "10")) / 1000)
    else:
        main(sys.argv[1], *(int(a) for a in sys.argv[2:5]))
