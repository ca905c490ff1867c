"""What a run tells its user: a failure's one line (the stage, the log), tables that stay whole in a
file or a pipe, library warnings kept in the run's log, and an MLflow link that opens the runs table."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlflow
import pytest
from conftest import DATA, run_cli


def ppl_recipe(tmp: Path, seq_len: int) -> Path:
    """One evaluate stage on the tiny model (no quantize): a failure there costs seconds."""
    path = tmp / "fails.yaml"
    path.write_text(f"name: fails\nmodel: {{embedded: tiny-llama}}\nstages:\n  - stage: evaluate\n    name: ppl\n"
                    f"    perplexity:\n      dataset: {{path: {DATA / 'validation.jsonl'}}}\n      seq_len: {seq_len}\n"
                    f"      max_samples: 8\n      batch_size: 8\n")
    return path


def last_error(capsys) -> tuple[str, Path]:
    """The error line (libraries may print notices before it) and the log file it names."""
    line = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.fullmatch(r"error: .* \(log: (\S+\.log)\)", line)
    assert found, line
    return line, Path(found[1])


def test_a_failing_stage_names_itself_and_the_runs_log(workdir, tmp_path, monkeypatch, capsys):
    """Exit 1 and one line naming the stage and the run's log (which has the traceback): when the
    stage's work fails, and when what follows it in the runner does (pairing, gates, logging)."""
    from llmopt.stages import evaluate

    assert run_cli(workdir, "run", str(ppl_recipe(tmp_path, 4096))) == 1  # valid; the model's context is 512
    line, log_file = last_error(capsys)
    assert line.startswith("error: stage 'ppl' (evaluate) failed: ValueError: perplexity.seq_len 4096 exceeds"), line
    assert log_file.parent == workdir["cache"].resolve() / "logs" and log_file.name.endswith("-fails.log")
    assert "Traceback" in log_file.read_text()

    def broken_pair(*args):
        raise RuntimeError("pairing broke\nwith a second line")

    monkeypatch.setattr(evaluate, "pair", broken_pair)
    assert run_cli(workdir, "run", str(ppl_recipe(tmp_path, 64))) == 1
    line, log_file = last_error(capsys)
    assert line == f"error: stage 'ppl' (evaluate) failed: RuntimeError: pairing broke [...] (log: {log_file})"
    assert "RuntimeError: pairing broke\nwith a second line" in log_file.read_text()

    def exits(*args):
        raise SystemExit(3)  # a library that calls exit() inside a stage

    monkeypatch.setattr(evaluate, "pair", exits)
    assert run_cli(workdir, "run", str(ppl_recipe(tmp_path, 64))) == 1
    line, log_file = last_error(capsys)
    assert line == f"error: stage 'ppl' (evaluate) failed: SystemExit: 3 (log: {log_file})"

    client = mlflow.MlflowClient(f"sqlite:///{workdir['mlruns'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"}, "parent and stage runs are marked FAILED"


def test_tables_keep_one_row_per_line_when_stdout_is_not_a_terminal(monkeypatch, capsys):
    """Output to a file or a pipe (capsys: not a terminal) is not wrapped at rich's 80 columns, nor
    padded to the wide width; $COLUMNS still sets the width."""
    from llmopt.cli import run_console
    from llmopt.report import print_summary
    from llmopt.runner import RunSummary, StageOutcome

    header = "| batch | output_tok_s (base) | ttft_ms (base) | tpot_ms (base) | e2e_ms (base) | roofline_fraction (base) |"
    row = "| 4 | 300.5 (2104.0) | 19.4 (8.2) | 13.09 (1.69) | 426 (61) | 0.00 (0.05) |"
    stage = StageOutcome("benchmark", "1600509d2e459f52e3dfa0c0", False, 13.6, {"memory/weights_gb": 0.0006}, "child",
                         tables={"benchmark.md": f"{header}\n|---|---|---|---|---|---|\n{row}\n"})
    log_file = Path("/a/long/path/to/the/stage/cache/logs/20261128-084152-a-recipe-with-a-long-name.log")
    summary = RunSummary("a-recipe-with-a-long-name", "a6c372522f0c40218037f98d3ce93695", "1",
                         "make ui, then http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning "
                         "(run a6c372522f0c40218037f98d3ce93695)", log_file, [stage])

    monkeypatch.delenv("COLUMNS", raising=False)
    print_summary(run_console(), summary)
    lines = capsys.readouterr().out.splitlines()
    cells = [[c.strip() for c in text.strip("| ").split(" | ")] for text in (header, row)]
    for wanted in cells:  # each markdown row on one line, every cell whole
        assert any(re.search(r"\s+".join(map(re.escape, wanted)), line) for line in lines), (wanted, lines)
    (closing,) = [line for line in lines if line.startswith("0/1 stages from cache.")]
    assert closing.endswith(f"Log: {log_file}") and len(closing) > 300, "the closing line is not wrapped either"
    assert max(len(line) for line in lines) == len(closing), "no line is padded to the wide width"

    monkeypatch.setenv("COLUMNS", "60")
    print_summary(run_console(), summary)
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 60


def test_torch_recompile_warnings_go_to_the_runs_log_and_errors_still_reach_the_console(tmp_path):
    """GPTQModel's CPU kernel makes torch recompile per layer until it hits the recompile limit,
    which torch reports in ten lines on stderr. During a run they go to the run's log."""
    import torch
    import torch._dynamo
    from llmopt import runner

    reached: list[logging.LogRecord] = []

    class Console(logging.Handler):  # beside torch's own stderr handler, on the logger torch writes through
        def emit(self, record: logging.LogRecord) -> None:
            reached.append(record)

    console = Console()
    logging.getLogger("torch._dynamo").addHandler(console)

    def recompile() -> None:
        torch._dynamo.reset()
        add = torch.compile(lambda x, n: x + n, backend="eager")
        with torch._dynamo.config.patch(recompile_limit=1):
            for n in range(3):
                add(torch.ones(2), n)  # n=1 would need a second compilation: the limit is hit

    try:
        log_file = runner._start_log(tmp_path, "recompiles")
        try:
            recompile()
            logging.getLogger("torch._dynamo.convert_frame").error("a real error")
        finally:
            runner._stop_log()
        assert [r.getMessage() for r in reached] == ["a real error"]
        text = log_file.read_text()
        assert "torch._dynamo hit config.recompile_limit (1)" in text and "a real error" in text

        recompile()  # after the run, torch reports as it always does
        assert "hit config.recompile_limit" in reached[-1].getMessage()
    finally:
        logging.getLogger("torch._dynamo").removeHandler(console)


def test_an_experiment_llmopt_creates_is_marked_for_the_runs_table(tmp_path):
    from llmopt.tracking import Tracker

    tracker = Tracker(tmp_path / "mlruns")
    experiment_id = tracker.experiment("kinds")
    assert tracker.client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracker.experiment("kinds") == experiment_id
    assert tracker.run_url_hint("abc", experiment_id) == (
        f"make ui, then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning (run abc)")


@pytest.mark.parametrize("uri", ["http://mlflow.example:5000/", "http://mlflow.example:5000"])
def test_a_tracking_servers_link_opens_the_runs_table(uri, monkeypatch):
    from llmopt.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert Tracker().run_url_hint("abc", "7") == (
        "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning (run abc)")
