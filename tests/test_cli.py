"""The metabatch command as a user runs it: help, usage errors, exit codes, summaries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from metabatch.cli import main
from runs_data import runs_table


def invoke(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env or {}, catch_exceptions=False)


def test_every_command_has_help_with_an_example():
    result = invoke("--help")
    assert result.exit_code == 0
    commands = [line.split()[0] for line in result.output.split("Commands:")[1].strip().splitlines()]
    assert {"migrate", "seed", "backfill"} <= set(commands)
    for command in commands:
        sub = invoke(command, "--help")
        assert sub.exit_code == 0, command
        assert "Example" in sub.output, f"`metabatch {command} --help` shows no example"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--w-config", "-1"], "--w-config"),
        (["--w-env", "nan"], "--w-env"),
        (["--w-outcome", "inf"], "--w-outcome"),
        (["--w-config", "abc"], "--w-config"),
        (["--w-config", "0", "--w-env", "0", "--w-outcome", "0"], "--w-config"),
        (["--start", "2025-13-01"], "--start"),
        (["--start", "2025-06-01", "--end", "2025-01-01"], "--start"),
        (["--limit", "-5"], "--limit"),
        (["--batch-size", "0"], "--batch-size"),
        (["--no-such-option"], "--no-such-option"),
    ],
)
def test_usage_errors_exit_2_and_name_the_option(args, message):
    result = invoke("backfill", "--runtime-url", "postgresql://u@127.0.0.1:1/x", *args)
    assert result.exit_code == 2
    assert message in result.output


def test_unreachable_database_is_one_line_without_password():
    result = invoke("backfill", "--runtime-url", "postgresql://u:s3cret@127.0.0.1:1/x")
    assert result.exit_code == 1
    assert "s3cret" not in result.output
    assert "127.0.0.1:1" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_unreachable_historical_database_fails_cleanly_while_runs_are_read(pg_url):
    # the historical store is opened while the first batch is being read
    from metabatch.stores.migrate import migrate
    from metabatch.stores import open_store
    from metabatch.urls import parse_url

    migrate(parse_url(pg_url))
    store = open_store(parse_url(pg_url))
    store.insert_runs(runs_table())
    store.close()
    result = invoke("backfill", "--runtime-url", pg_url, "--historical-url", "postgresql://u:s3cret@127.0.0.1:1/x")
    assert result.exit_code == 1
    assert "127.0.0.1:1" in result.output and "s3cret" not in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_table_says_to_migrate(pg_url):
    result = invoke("backfill", "--runtime-url", pg_url)
    assert result.exit_code == 1
    assert "backtest_runs" in result.output and "metabatch migrate" in result.output


def test_backfill_summary_and_json(pg_url):
    from metabatch.stores.migrate import migrate
    from metabatch.stores import open_store
    from metabatch.urls import parse_url

    migrate(parse_url(pg_url))
    store = open_store(parse_url(pg_url))
    store.insert_runs(runs_table())
    store.close()
    env = {"METABATCH_RUNTIME_URL": pg_url}
    text = invoke("backfill", "--quiet", env=env)
    assert text.exit_code == 0, text.output
    assert "runs read 19, written 12, skipped 3" in text.output
    assert "rejected R011" in text.output
    result = invoke("backfill", "--json", "--limit", "5", env=env)
    summary = json.loads(result.output)
    assert summary["runs_read"] == 5 and summary["written"] + summary["skipped"] + summary["rejected"] == 5
    assert {"read", "unnest", "encode", "combine", "write"} <= set(summary["stage_seconds"])
    assert all(set(r) == {"run_id", "reason"} for r in summary["rejected_runs"])


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "metabatch", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "metabatch" in out.stdout


def test_export_shows_progress_on_a_terminal_and_quiet_silences_it(pg_url, tmp_path, monkeypatch):
    import metabatch.cli as cli
    from metabatch.pipeline.backfill import backfill
    from metabatch.stores.migrate import migrate
    from metabatch.stores import open_store
    from metabatch.urls import parse_url

    migrate(parse_url(pg_url))
    store = open_store(parse_url(pg_url))
    store.insert_runs(runs_table())
    store.close()
    backfill(parse_url(pg_url))
    monkeypatch.setattr(cli, "on_terminal", lambda: True)
    env = {"METABATCH_RUNTIME_URL": pg_url}
    shown = CliRunner().invoke(main, ["export-parquet", "--out", str(tmp_path / "a")], env=env)
    assert shown.exit_code == 0, shown.output
    assert "export: 12 embeddings written" in shown.stderr and "12 embeddings" in shown.stdout
    quiet = CliRunner().invoke(main, ["export-parquet", "--quiet", "--out", str(tmp_path / "b")], env=env)
    assert quiet.exit_code == 0 and quiet.stderr == "" and "12 embeddings" in quiet.stdout
