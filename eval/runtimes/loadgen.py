"""`python -m llmopt.eval.runtimes.loadgen`: GuideLLM in one process for a whole serving sweep.

The server runtime sends it one run at a time on stdin, a JSON line each: {"args": GuideLLM's
command line from `run` on, "log": a file}. It runs GuideLLM's own command line in this process,
with stdout and stderr going to that file, and answers on stdout with {"exit": its status}.

Why: a process per run paid GuideLLM's start every time (Python, its imports, the tokenizer):
about 18 s of each run on the H200 machine and 7.5 s on a 2-core CPU, where a run after the first
costs about 2 s beyond its load in one process. A 4-point sweep runs 8 GuideLLM runs a model.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def _run(cli, args: list[str]) -> int:
    """GuideLLM's command line, as its `guidellm` script would run it; its exit status."""
    from click.exceptions import ClickException, Exit

    try:
        cli.main(args=args, prog_name="guidellm", standalone_mode=False)
    except ClickException as e:  # a usage error: said as the script would say it
        e.show()
        return e.exit_code
    except Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception:  # a failed run is its status and its traceback in its log; the next run still runs
        traceback.print_exc()
        return 1
    return 0


def stop_with_group_on_sigterm() -> None:
    """On SIGTERM, take GuideLLM's workers along: they are in this process's group (the server runtime
    starts it as a group's leader), and a worker left without this process would go on loading the
    server. SIGTERM comes from llmopt stopping the sweep, or from llmopt's death (PR_SET_PDEATHSIG,
    which signals this process alone). A process that leads no group of its own only ends itself."""

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGTERM)  # the workers, and this process by the default action
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def main() -> int:
    stop_with_group_on_sigterm()
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # answers keep the real stdout; runs write to their logs
    from guidellm.__main__ import cli
    from llmopt.models import output_to

    for line in sys.stdin:
        job = json.loads(line)
        with output_to(job["log"]):
            code = _run(cli, job["args"])
        reply.write(json.dumps({"exit": code}) + "\n")
        reply.flush()
    return 0


if __name__ == "__main__":  # GuideLLM's workers are spawned: they import this module without running it
    sys.exit(main())
