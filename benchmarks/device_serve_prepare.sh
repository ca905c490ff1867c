#!/usr/bin/env bash
# The GPU machine's wheel set for the serving benchmark (benchmarks/serve_7b.py), under the 64 MiB
# that travels with a call: ../shared/device/prepare's .device/ without the wheels the serving run
# does not import (lm-eval, bitsandbytes, torchao), plus GuideLLM, openai (transformers serve needs
# it) and their dependencies, built for that machine's Python 3.12. Run from the repository root
# after `bash ../shared/device/prepare`; then call the device with carry [".device-serve"] and a
# command starting `source .device-serve/install.sh && ...`.
set -euo pipefail
src=.device
dst=.device-serve
[ -d "$src/wheels" ] || { echo "run bash ../shared/device/prepare first (no $src/wheels)" >&2; exit 2; }
rm -rf "$dst"
cp -r "$src" "$dst"
chmod -R u+w "$dst"
rm -f "$dst"/wheels/lm_eval-* "$dst"/wheels/bitsandbytes-* "$dst"/wheels/torchao-*
pip=.venv/bin/pip
$pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$dst/wheels" \
  guidellm==0.8.1 openai==3.57.0 jiter==0.19.0 distro click==8.4.2 culsans==0.10.0 aiologic eval_type_backport ftfy \
  faker loguru msgpack pydantic-settings sanic sanic-routing html5tagger tracerite httptools ujson uvloop websockets \
  multidict wrapt aiofiles h2 hpack hyperframe httpx2 httpcore2 truststore tabulate sniffio idna anyio h11 typing_extensions \
  yappi==1.7.6  # benchmarks/cb_step_profile.py
du -sh "$dst"
