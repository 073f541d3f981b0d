"""The command line refuses out-of-range numbers with one line naming the argument, before any work starts, and
`pgsynapse bench` names the benchmarks there are instead of a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pgsynapse.cli_args import bench_name, build_parser, parse_args
from pgsynapse.errors import PgsynapseError
from pgsynapse.learning.trainer_process import TrainingFailed


@pytest.mark.parametrize(("argv", "message"), [
    (["search", "vacuum", "-k", "0"], "argument -k/--limit: must be at least 1, got 0"),
    (["search", "vacuum", "-k", "many"], "argument -k/--limit: not a number: 'many'"),
    (["ask", "hi", "--timeout", "-1"], "argument --timeout: must be at least 0, got -1"),
    (["sql-ask", "hi", "--timeout", "-5"], "argument --timeout: must be at least 0, got -5"),
    (["demo", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    # 1 to 15 were taken, where the export_sample_chunks setting needs 16: with 10 chunks or fewer every query's
    # top 10 is the whole sample, and any artifact agreed 1.0
    (["model", "export", "--sample", "0"], "argument --sample: must be between 16 and 100000, got 0"),
    (["model", "export", "--sample", "10"], "argument --sample: must be between 16 and 100000, got 10 (as the "
     "export_sample_chunks setting: "),
    (["model", "export", "--sample", "100001"], "argument --sample: must be between 16 and 100000, got 100001"),
    (["model", "export", "--threshold", "1.5"], "argument --threshold: must be between 0 and 1, got 1.5"),
    (["model", "distill", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["model", "add", "/m", "--traffic", "101"], "argument --traffic: must be between 0 and 100, got 101"),
    (["canary", "rebuild", "--size", "-1"], "argument --size: must be between 0 and 100000, got -1"),
    (["image-model", "export", "1", "--sample", "0"], "argument --sample: must be at least 1, got 0"),
    (["feedback", "3", "--rating", "6"], "argument --rating: must be between 1 and 5, got 6"),
    (["feedback", "3", "--source", "0"], "argument --source: must be at least 1, got 0"),
    # a kind that does not exist said "no failed jobs of kind bogus", exit 0
    (["retry-failed", "--kind", "bogus"], "argument --kind: invalid choice: 'bogus' (choose from 'embed', 'answer',"),
    (["ingest", "docs", "--encoding", "base64"], "argument --encoding: not a text encoding Python knows: 'base64'"),
    (["feedback", "3", "--helpful", "--not-helpful"], "argument --not-helpful: not allowed with argument --helpful"),
    # said "traffic must be between 0 and 100" from the registry, exit 1
    (["traffic", "2", "150"], "argument PERCENT: must be between 0 and 100, got 150"),
    (["traffic", "2", "-1"], "argument PERCENT: must be between 0 and 100, got -1"),
    (["sql-model", "traffic", "2", "101"], "argument PERCENT: must be between 0 and 100, got 101"),
    (["ranker", "traffic", "2", "101"], "argument PERCENT: must be between 0 and 100, got 101"),
    # NaN passed every range check: the rule's INSERT broke a CHECK, "database error", exit 69 (retried)
    (["guardrail", "add", "x", "--threshold", "nan"], "argument --threshold: not a number: 'nan'"),
    (["traffic", "2", "NaN"], "argument PERCENT: not a number: 'NaN'"),
    (["ask", "hi", "--timeout", "nan"], "argument --timeout: not a number: 'nan'"),
    # said "invalid setting kinds [PGSYNAPSE_KINDS]" (a variable not set), exit 78, after the migrations had run
    (["run", "--kinds", "embed,bogus"], "argument --kinds: unknown job kind(s) 'bogus' (the kinds: embed, answer,"),
    (["run", "--kinds", " , "], "argument --kinds: no job kind given (the kinds: embed, answer,"),
    # "," asked with an empty allowed_tables, which failed on the row, while "" asked about every table of the
    # schema: a list of the tables to read that names none widens to nothing
    (["sql-ask", "hi", "--tables", ","], "argument --tables: names no table: name the tables it may read"),
    (["sql-ask", "hi", "--tables", ""], "argument --tables: names no table: name the tables it may read"),
    # a blank schema was inserted and its question failed on the row ("target_schema is empty"), exit 1
    (["sql-ask", "hi", "--schema", " "], "argument --schema: is empty: name the schema of the question's tables "
     "(default public)"),
    (["sql-ask", "hi", "--tables", '"Big Orders'], 'argument --tables: "Big Orders has a double quote that is not '
     "closed"),
    # options that contradict each other (the row counted as helpful)
    (["feedback", "3", "--helpful", "--rating", "1"], "--helpful contradicts --rating 1: a rating of 4 or 5 counts "
     "as helpful, 1 to 3 as not helpful (give one of the two, or both agreeing)"),
    (["feedback", "3", "--not-helpful", "--rating", "5"], "--not-helpful contradicts --rating 5: a rating of 4 or 5 "
     "counts as helpful"),
    # no verdict at all: the server was started and connected to, then "feedback says whether the answer helped,
    # or rates it (1 to 5)", exit 1
    (["feedback", "3"], "feedback needs a verdict: --helpful, --not-helpful or --rating N (1 to 5)"),
    (["feedback", "3", "--source", "2", "--comment", "ok"], "feedback needs a verdict: --helpful, --not-helpful or "
     "--rating N"),
    # --size is a rebuilt set's: `canary show --size 5` showed the whole set, exit 0
    (["canary", "--size", "5"], "--size is the size of a rebuilt canary set: pgsynapse canary rebuild --size 5"),
    (["canary", "show", "--size", "5"], "--size is the size of a rebuilt canary set"),
    # nothing to change: said so, but exit 1 (sql-correct with neither --sql nor --approve: argparse's 2)
    (["guardrail", "set", "3"], "guardrail set needs --threshold or --action: what to change"),
    # search options that contradict each other, or no text: said so, but exit 1, as a search that failed
    (["search"], "search needs a text (or --like-image PATH)"),
    # a blank text said the same, but exit 1 (a search that failed), where no text at all was exit 2
    (["search", ""], "search needs a text (or --like-image PATH)"),
    (["search", " \t"], "search needs a text (or --like-image PATH)"),
    (["search", "--images", " "], "search --images needs a text to search for"),
    (["search", "--images"], "search --images needs a text to search for"),
    (["search", "vacuum", "--like-image", "q.png"], "search --like-image searches by example and takes no text: drop "
     "'vacuum', or search by text with --images 'vacuum'"),
    (["search", "vacuum", "--images", "--like-image", "q.png"], "search --images searches by text and --like-image by "
     "example, not both"),
    (["search", "vacuum", "--image-model", "3"], "--image-model chooses the model of an image search: add --images"),
    # a document search's options given to an image search were ignored (exit 0)
    (["search", "--images", "a red car", "--version", "2"], "--version and --ranker choose how documents are "
     "searched: an image search takes --image-model N"),
    (["search", "--like-image", "q.png", "--ranker", "none"], "--version and --ranker choose how documents are "
     "searched"),
    # an INT8 scheme for the fp32 runtime was ignored: a fp32 candidate registered, exit 0
    (["model", "export", "--runtime", "onnx", "--scheme", "dynamic"], "--scheme dynamic is an INT8 scheme: it "
     "applies to --runtime onnx-int8 only (onnx is fp32); nothing was exported"),
])
def test_an_out_of_range_number_is_refused_with_its_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (["migrate", "--help"], "apply pending schema migrations"),
    (["run", "--help"], "run the worker until SIGINT/SIGTERM"),
    (["ab-report", "--help"], "helpful rate with 95% CI"),
    (["model", "export", "--help"], "build an ONNX runtime of a version"),
])
def test_a_command_s_help_says_what_it_does(argv, says, capsys):
    # `pgsynapse migrate --help` printed its usage line and -h alone: what it does was only in `pgsynapse --help`
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 0 and says in " ".join(capsys.readouterr().out.split())


def test_numbers_in_range_and_the_edges_are_taken():
    assert build_parser().parse_args(["search", "vacuum", "-k", "1"]).k == 1
    assert build_parser().parse_args(["ask", "hi", "--timeout", "0"]).timeout == 0.0  # no limit
    assert build_parser().parse_args(["canary", "rebuild", "--size", "0"]).size == 0  # no canary set
    assert build_parser().parse_args(["model", "export", "--threshold", "1"]).threshold == 1.0
    assert build_parser().parse_args(["model", "export", "--sample", "16"]).sample == 16
    assert build_parser().parse_args(["demo"]).limit == 55
    assert build_parser().parse_args(["run", "--kinds", "embed, answer"]).kinds == ("embed", "answer")
    assert parse_args(["traffic", "2", "100"]).percent == 100.0
    assert parse_args(["feedback", "3", "--helpful", "--rating", "4"]).rating == 4
    assert parse_args(["feedback", "3", "--not-helpful", "--rating", "3"]).helpful is False
    assert parse_args(["sql-ask", "hi"]).tables is None  # every table of the schema
    # a comma inside double quotes is part of the name, as in SQL; the quotes are kept for the worker to read
    assert parse_args(["sql-ask", "hi", "--tables", ' orders, "a,b" ,shop."Big Orders"']).tables == [
        "orders", '"a,b"', 'shop."Big Orders"']


def test_bench_names_the_benchmarks_there_are(monkeypatch, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.syspath_prepend(repo)
    assert bench_name("throughput") == "throughput"
    with pytest.raises(PgsynapseError, match=r"no benchmark 'nope' in bench/: one of .*answer_quality.*throughput"):
        bench_name("nope")
    # bench/common.py is a helper, not a benchmark
    with pytest.raises(PgsynapseError, match="no benchmark 'common'"):
        bench_name("common")
    # outside a checkout: where to run it from, one line, exit 1 (a process of its own: main() sets up logging)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "bench", "throughput"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "pgsynapse: error: the benchmarks are in the source tree: run `pgsynapse bench` from a checkout (bench/ "
        "beside src/)"], r.stderr


def test_a_failed_training_process_is_one_line_on_the_command_line():
    # `model distill` / `ranker train` raise it from the CLI: main() prints PgsynapseErrors as one line, exit 1
    assert issubclass(TrainingFailed, PgsynapseError) and TrainingFailed("x", retry=False).retry is False


GLOBALS = ["--config", "/etc/p.toml", "--database-url", "postgresql:///x", "--data-dir", "/d", "--log-format", "json",
           "--log-level", "info"]
GLOBAL_DESTS = ("config", "database_url", "data_dir", "log_format", "log_level")


@pytest.mark.parametrize("command", [["search", "vacuum"], ["status"], ["run", "--kinds", "embed"],
                                     ["model", "export"], ["sql-model", "add", "/m"], ["guardrail", "check", "x"]])
def test_the_global_options_are_taken_before_or_after_the_command(command):
    # `pgsynapse search x --log-level info` said "unrecognized arguments: --log-level info", exit 2
    before, after = parse_args([*GLOBALS, *command]), parse_args([*command, *GLOBALS])
    assert vars(before) == vars(after)
    assert [getattr(after, d) for d in GLOBAL_DESTS] == ["/etc/p.toml", "postgresql:///x", "/d", "json", "info"]


def test_a_global_option_after_the_command_wins_and_one_not_given_keeps_its_value():
    args = parse_args(["--log-level", "debug", "--data-dir", "/d", "search", "x", "--log-level", "error"])
    assert (args.log_level, args.data_dir, args.config, args.log_format) == ("error", "/d", None, None)
    # the command's own options of a like name keep their meaning
    args = parse_args(["search", "x", "--version", "3", "--log-format", "json"])
    assert (args.model_version, args.log_format) == (3, "json")
    # a benchmark's arguments stay the benchmark's
    assert parse_args(["bench", "throughput", "--log-level", "info"]).bench_args == ["--log-level", "info"]
    with pytest.raises(SystemExit):
        parse_args(["status", "--log-level", "loud"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_the_global_database_url_is_handed_to_the_benchmark(tmp_path, where):
    # `pgsynapse --database-url URL bench NAME` (or `bench --database-url URL NAME`) started an embedded server: the
    # benchmarks read DATABASE_URL, and the URL given to pgsynapse stayed with pgsynapse
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "showurl.py").write_text(
        'import os\n\nif __name__ == "__main__":\n    print("url=" + os.environ.get("DATABASE_URL", "none"))\n')
    url = "postgresql://bench@127.0.0.1:9/benchdb"
    argv = ["--database-url", url, "bench", "showurl"] if where == "before" else ["bench", "--database-url", url,
                                                                                  "showurl"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL", "PGSYNAPSE_DATABASE_URL")}
    r = subprocess.run([sys.executable, "-m", "pgsynapse", *argv], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"url={url}"]


@pytest.mark.parametrize("argv", [["--data-dir", "/d", "bench", "throughput"],
                                  ["bench", "--data-dir", "/d", "throughput"],
                                  ["--config", "/etc/p.toml", "bench", "latency", "--quick"]])
def test_bench_refuses_the_global_options_a_benchmark_does_not_read(capsys, argv):
    # `pgsynapse --data-dir X bench NAME` ran the benchmark on an embedded server in a temp dir all the same: X was
    # ignored without a word (as --config's file)
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    flag = argv[0] if argv[0] != "bench" else argv[1]
    assert f"pgsynapse bench: error: bench takes no {flag}: a benchmark starts its own embedded server in a " \
        "temporary folder, or uses the server of --database-url (or DATABASE_URL)" in capsys.readouterr().err


def test_bench_without_a_name_lists_the_benchmarks_with_what_each_measures():
    # `pgsynapse bench` said "the following arguments are required: name, bench_args" (exit 2), and its --help named
    # five of the 38 benchmarks
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "bench"], capture_output=True, text=True, cwd=repo,
                       env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("throughput ") and "End-to-end throughput" in line for line in lines), r.stdout
    assert any(line.startswith("answers ") for line in lines) and not any(line.startswith("common ") for line in lines)
    assert "pgsynapse bench NAME --help" in r.stdout
    assert parse_args(["bench", "throughput", "--quick"]).bench_args == ["--quick"]


@pytest.mark.parametrize(("argv", "says"), [
    (["status", "--bogus"], "pgsynapse status: error: unrecognized arguments: --bogus"),
    (["--database-url", "postgresql://x/y", "search", "vacuum", "-q"], "pgsynapse search: error: unrecognized "
     "arguments: -q"),
    (["model", "export", "--runtime", "onnx", "extra"], "pgsynapse model export: error: unrecognized arguments: extra"),
    (["sql-model", "list", "--all"], "pgsynapse sql-model list: error: unrecognized arguments: --all"),
    # the checks after argparse's own name the command too, with its usage
    (["feedback", "3"], "pgsynapse feedback: error: feedback needs a verdict"),
    (["guardrail", "set", "3"], "pgsynapse guardrail set: error: guardrail set needs --threshold or --action"),
])
def test_a_refused_command_line_names_its_command(argv, says, capsys):
    # `pgsynapse status --bogus` said "pgsynapse: error: unrecognized arguments: --bogus": argparse's top parser
    # refuses what a command's parser left over, under its own name and with the usage of every command
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err, err
    command = says.split(":")[0]
    assert err.startswith(f"usage: {command} "), err  # the command's usage, not the list of every command
