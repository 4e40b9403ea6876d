"""Bad database URLs through the CLI: one error line naming the URL (never its
password), exit status 1, no traceback, no stray file."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from metabatch.cli import main
from metabatch.urls import HISTORICAL_ENV, RUNTIME_ENV, parse_url, redact, resolve_urls


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Invoke `metabatch ...` in an empty folder with no database in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    monkeypatch.delenv(HISTORICAL_ENV, raising=False)

    def invoke(*args, env=None):
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    return invoke


def error_line(result, url_shown: str) -> str:
    """The one error line; checks the exit status and that no password leaks."""
    assert result.exit_code == 1, (result.output, result.stderr)
    everything = result.output + result.stderr
    assert "secret" not in everything
    assert "Traceback" not in everything
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    assert url_shown in errors[0], errors[0]
    return errors[0]


READ_COMMANDS = [["backfill"], ["show"], ["similar", "--run-id", "R001"], ["export-parquet", "--out", "snap"]]


@pytest.mark.parametrize("command", READ_COMMANDS)
@pytest.mark.parametrize(
    "url",
    ["mysql://u:secret@db.example.com/x", "sqlite:///tmp/x.db", "runs.duckdb", "postgresql+psycopg://u:secret@h/x"],
)
def test_unknown_scheme(run, command, url):
    line = error_line(run(*command, "--runtime-url", url), redact(url))
    assert "not a database URL" in line


def test_duckdb_url_without_a_path(run):
    error_line(run("backfill", "--runtime-url", "duckdb://"), "duckdb://")


@pytest.mark.parametrize("command", READ_COMMANDS)
def test_missing_duckdb_file(run, tmp_path, command):
    url = f"duckdb://{tmp_path}/missing.duckdb"
    line = error_line(run(*command, "--runtime-url", url), url)
    assert "does not exist" in line
    assert not (tmp_path / "missing.duckdb").exists()  # the failed command made no file
    assert not (tmp_path / "snap").exists()


def test_missing_duckdb_folder(run, tmp_path):
    url = f"duckdb://{tmp_path}/no/such/folder/runs.duckdb"
    error_line(run("backfill", "--runtime-url", url), url)


def test_file_that_is_not_a_duckdb_database(run, tmp_path):
    (tmp_path / "notes.duckdb").write_text("not a database")
    error_line(run("backfill", "--runtime-url", "duckdb://notes.duckdb"), "duckdb://notes.duckdb")
    assert (tmp_path / "notes.duckdb").read_text() == "not a database"


@pytest.mark.parametrize("command", READ_COMMANDS)
def test_unreachable_host(run, command):
    url = "postgresql://u:secret@127.0.0.1:1/x"
    line = error_line(run(*command, "--runtime-url", url), "postgresql://u:***@127.0.0.1:1/x")
    assert "cannot connect" in line


def test_unreachable_host_from_the_environment(run):
    url = "postgresql://u:secret@127.0.0.1:1/x"
    result = run("backfill", env={RUNTIME_ENV: url})
    error_line(result, "postgresql://u:***@127.0.0.1:1/x")


def test_unreachable_historical_url(run, tmp_path):
    from metabatch.stores.migrate import migrate

    runtime = f"duckdb://{tmp_path}/runs.duckdb"
    migrate(parse_url(runtime))
    result = run("backfill", "--runtime-url", runtime, "--historical-url", "postgresql://u:secret@127.0.0.1:1/x")
    error_line(result, "postgresql://u:***@127.0.0.1:1/x")


def test_default_is_the_embedded_file_and_says_so_once(run, tmp_path):
    result = run("backfill")
    notes = [line for line in result.stderr.splitlines() if "embedded" in line]
    assert len(notes) == 1 and "metabatch.duckdb" in notes[0]
    error_line(result, "duckdb://metabatch.duckdb")
    assert not (tmp_path / "metabatch.duckdb").exists()
    result = run("migrate")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "metabatch.duckdb").exists()


def test_named_database_gives_no_note(run, tmp_path):
    result = run("migrate", "--runtime-url", "duckdb://named.duckdb")
    assert result.exit_code == 0, result.stderr
    assert "embedded" not in result.stderr
    assert (tmp_path / "named.duckdb").exists()


def test_resolve_urls_order(monkeypatch):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    monkeypatch.delenv(HISTORICAL_ENV, raising=False)
    assert resolve_urls(None, None).runtime.raw == "duckdb://metabatch.duckdb"
    assert resolve_urls(None, None).defaulted
    monkeypatch.setenv(RUNTIME_ENV, "duckdb:///env.duckdb")
    resolved = resolve_urls(None, None)
    assert (resolved.runtime.raw, resolved.historical.raw, resolved.defaulted) == ("duckdb:///env.duckdb",) * 2 + (False,)
    resolved = resolve_urls("duckdb://flag.duckdb", None)
    assert resolved.runtime.duckdb_path == "flag.duckdb"
    assert parse_url("duckdb:///abs/x.duckdb").duckdb_path == "/abs/x.duckdb"
    assert "secret" not in repr(parse_url("postgresql://u:secret@h/x"))
