"""Settings: one typed object, read once from PGSYNAPSE_* environment variables and an optional TOML file.

Precedence, highest first: explicit overrides (CLI flags), the environment, the TOML file, defaults.
An invalid value stops start-up with a one-line :class:`ConfigError` that names the setting.
"""

from __future__ import annotations

import difflib
import os
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pgsynapse.config_file import ENV_PREFIX, read_config_file
from pgsynapse.errors import ConfigError
from pgsynapse.textsql.settings import TextSqlSettings

DEFAULT_SAMPLE_CHUNKS = 600  # chunks of an export's agreement sample (pgsynapse.export uses the same)
# its bounds, the setting's and `model export --sample`'s: with 10 chunks or fewer every query's top 10 is the whole
# sample, and any artifact would agree 1.0
SAMPLE_CHUNKS_RANGE = (16, 100_000)
SAMPLE_CHUNKS_WHY = "the top-10 agreement of 10 chunks or fewer is 1.0 whatever the artifact"

# every job kind (a worker's default kinds)
JOB_KINDS = ("embed", "answer", "retrain", "backfill", "embed_image", "sql_answer", "sql_retrain")

# settings that may carry a password or a key: an error about them never shows the value
SECRET_SETTINGS = frozenset({"database_url", "listen_url", "read_url", "sql_reader_url", "sql_reader_password",
                             "openai_api_key", "openai_base_url"})


def default_data_dir() -> Path:
    """A per-user data directory that also works for root (never under /root: the embedded server chmods its parents)."""
    if os.geteuid() == 0:
        return Path("/var/lib/pgsynapse")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgsynapse"


class Settings(TextSqlSettings):
    """Every knob of pgsynapse (the ``sql_*`` ones in :mod:`pgsynapse.textsql.settings`). Environment: ``PGSYNAPSE_<NAME>`` (``DATABASE_URL`` for the server)."""

    # inf passes every lower bound and breaks the worker later (an infinite lease: an OverflowError at its first
    # maintenance step): a setting is a finite number or refused at start
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    # {name: (the config file's value, the variable or option that overrides it)}: set by load_settings
    _file_overridden: dict[str, tuple[Any, str]] = PrivateAttr(default_factory=dict)

    database_url: str | None = Field(None, repr=False, description="PostgreSQL URL; none starts the embedded server")
    listen_url: str | None = Field(
        None, repr=False, description="a direct (or session-pooled) URL of the same database for what needs a "
        "session: the LISTEN connections and the session locks of migrate and the runtime export; unset = "
        "database_url (set it when database_url goes through PgBouncer in transaction mode: docs/operations.md)")
    read_url: str | None = Field(
        None, repr=False, description="a streaming replica of the database for reads that may go there: the kNN "
        "retrieval of answers and `pgsynapse search`; writes and claims never do. A read goes to the replica only once "
        "it has replayed everything the primary had flushed when the read began (else the primary is read after "
        "read_max_lag_ms): docs/scaling.md, read replicas")
    read_max_lag_ms: float = Field(
        500.0, ge=0, le=60_000, description="how long a read waits for the replica to catch up with the primary "
        "before it reads the primary instead")
    # a worker cut off from its server (no FIN, no RST) must notice: libpq's TCP options on every connection it
    # makes (pool, LISTEN, replica), unless the URL sets them; ignored on Unix sockets (docs/operations.md)
    keepalives_idle_seconds: int = Field(
        10, ge=1, description="TCP keepalive: seconds of silence from the server before the first probe")
    keepalives_interval_seconds: int = Field(5, ge=1, description="TCP keepalive: seconds between unanswered probes")
    keepalives_count: int = Field(
        3, ge=1, description="TCP keepalive: unanswered probes before the connection is dropped (idle + count x "
        "interval: 25 s by default, for a connection waiting on the server, a statement in flight included)")
    tcp_user_timeout_ms: int = Field(
        30_000, ge=0, description="libpq tcp_user_timeout: sent data unacknowledged this long drops the connection "
        "(a statement sent into a dead link; else the kernel retransmits for about 15 min); 0: the kernel's")
    data_dir: Path = Field(default_factory=default_data_dir, description="embedded server data, models, caches")

    model_path: str | None = Field(None, description="local sentence-transformers model dir for version 1")
    device: str = Field("cpu", description="torch device")
    torch_threads: int = Field(0, ge=0, description="intra-op threads for inference; 0 = number of cores")
    onnx_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads (onnx, onnx-int8 runtimes); 0 = torch_threads, else cores"
    )

    runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        "onnx-int8",
        description="runtime the active model version is moved to at worker start, and a new candidate before it gets "
        "A/B traffic (once: exported, agreement-checked, switched; onnx-int8 falls back to onnx when refused, an "
        "error keeps torch, both recorded in model_events); torch keeps sentence-transformers",
    )
    export_sample_chunks: int = Field(DEFAULT_SAMPLE_CHUNKS, ge=SAMPLE_CHUNKS_RANGE[0], le=SAMPLE_CHUNKS_RANGE[1],
                                      description="chunks of the agreement check of that export, and of `pgsynapse "
                                      "model export` (its --sample wins)")

    chunk_tokens: int = Field(256, ge=16, le=8192, description="max tokens per embedded chunk, special tokens included")
    chunk_overlap: int = Field(0, ge=0, description="tokens repeated between neighbouring chunks")
    max_document_chars: int = Field(2_000_000, ge=1, description="longer bodies fail with a clear error")
    max_document_file_bytes: int = Field(100 * 1024 * 1024, ge=1, description="`ingest` skips larger HTML and PDF "
                                         "files by their size, without reading them")
    max_title_chars: int = Field(10_000, ge=1, description="longer titles fail with a clear error")

    batch_size: int = Field(32, ge=1, le=10_000, description="jobs claimed per batch")
    encode_batch_size: int = Field(32, ge=1, le=4096, description="texts per model forward pass")
    max_wait_ms: float = Field(
        0.0, ge=0, le=10_000,
        description="micro-batching: how long a claimed batch short of batch_size waits for more jobs when the model "
        "is idle (while the model is busy a batch keeps gathering until it is free or full)",
    )
    cache_lru_size: int = Field(1024, ge=0, description="in-process LRU entries of the inference cache (0 = off)")
    cache_ttl_seconds: float = Field(7 * 86400, gt=0, description="inference_cache rows unused this long are deleted")
    cache_max_rows: int = Field(100_000, ge=0, description="inference_cache size bound; least recently hit go first "
                                "(0 = the table is off: nothing written or read, the rows it has deleted; the LRU "
                                "still serves)")
    cache_cleanup_interval: float = Field(
        300.0, gt=0, description="seconds between housekeeping runs (inference_cache bounds, done-job retention)"
    )
    done_job_retention_seconds: float = Field(
        7 * 86400, ge=0, description="done jobs finished longer ago than this are deleted (0 = keep them all)"
    )
    max_attempts: int = Field(5, ge=1, le=100, description="attempts before a job is marked failed")
    lease_seconds: float = Field(60.0, gt=0, description="a claimed job returns to the queue if not renewed")
    batch_deadline_seconds: float = Field(
        600.0, gt=0, description="a batch's leases are renewed this long at most: a hung batch's jobs go back to the "
        "queue within lease_seconds after it (retrain: its own budget)"
    )
    retry_backoff_seconds: float = Field(2.0, ge=0, description="first retry delay; doubles per attempt")
    retry_backoff_max_seconds: float = Field(300.0, ge=0)
    poll_interval: float = Field(5.0, gt=0, description="fallback poll while LISTEN is down (and safety net)")
    quiet_poll_interval: float = Field(
        0.25, gt=0, description="how often an idle worker polls for jobs while the enqueue triggers send no NOTIFY "
        "(`pgsynapse queue-notify off`: docs/scaling.md)")
    reconnect_max_seconds: float = Field(30.0, gt=0, description="cap of the LISTEN reconnect backoff")
    pool_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="how long a claim or a maintenance step waits for a free connection of the "
        "worker's pool before it fails and is retried (claim_failed, maintenance_failed): during an outage, how "
        "often each is logged (a batch's write waits 5 s at most, within its retry budget)")
    kinds: tuple[str, ...] = Field(
        JOB_KINDS, min_length=1,
        description="job kinds this worker processes (at least one: a worker of none would process nothing)"
    )

    answerer: Literal["extractive", "transformers", "llama-cpp", "openai"] = Field(
        "extractive", description="how answers are written (llama-cpp: a GGUF model on llama.cpp, pgsynapse[llama])")
    answer_top_k: int = Field(5, ge=1, le=100, description="passages retrieved per question")
    hybrid: bool = Field(True, description="fuse full-text ranks with vector ranks (weighted reciprocal-rank fusion)")
    hybrid_text_weight: float = Field(
        0.75, ge=0, le=10, description="hybrid: the weight of a full-text rank against a vector rank's 1 "
        "(chosen on held-out questions: bench/hybrid_weights.py)")
    hybrid_text_max_rows: int = Field(
        20_000, ge=1, description="hybrid: about how many chunks the full-text side ranks at most; the question's "
        "words select chunks from the rarest up to this many (every word still ranks them), so its time stops "
        "growing with the table (bench/fulltext_scale.py)")
    history_turns: int = Field(2, ge=0, le=20, description="previous turns of a session given to retrieval and answerers")
    not_found_threshold: float = Field(0.35, ge=-1, le=1, description="best passage score under which nothing is "
                                       "relevant (a passage with every word of the question: down to 0.2)")
    max_question_chars: int = Field(20_000, ge=1, description="longer questions fail at once with a clear error; "
                                    "so does a longer search text")
    rank_candidates: int = Field(
        10, ge=1, le=200, description="vector (and full-text) candidates a ranker orders, when one serves the question "
        "(pgsynapse ranker ...); the first answer_top_k of its order are the passages (10: the best of 10/20/30 on "
        "the tuning half of the dev questions for the mpnet teacher as ranker, BENCHMARKS.md)")
    ranker_max_length: int = Field(256, ge=32, le=512, description="tokens of a (question, passage) pair a trained "
                                   "ranker reads; the passage is cut, never the question")
    ranker_negatives: int = Field(7, ge=1, le=50, description="hard negatives per training question")
    ranker_negatives_skip: int = Field(0, ge=0, le=50, description="the first chunks of other pages the vector search "
                                       "ranks highest that are not taken as negatives (another page may answer too)")
    ranker_layers: int = Field(0, ge=0, le=48, description="transformer layers a trained ranker keeps of the serving "
                               "model's (evenly spaced, the last kept): fewer is faster; 0 keeps them all")
    ranker_epochs: int = Field(1, ge=1, le=20)
    ranker_lr: float = Field(3e-5, gt=0, lt=1, description="the ranker's encoder learning rate")
    ranker_head_lr: float = Field(1e-3, gt=0, lt=1, description="the ranker's fresh one-logit head's learning rate")
    ranker_cosine_scale: float = Field(
        20.0, ge=0, le=1000, description="a trained ranker scores a passage as this x the vector search's cosine plus "
        "its cross-encoder logit (it learns a correction of the vector order); 0: a plain cross-encoder")
    ranker_synthetic_pairs: int = Field(600, ge=0, description="corpus pairs (titles, headings) added to feedback")
    ranker_budget_seconds: float = Field(1800.0, gt=0, description="wall-clock budget of one ranker training run")
    ranker_margin: float = Field(0.0, ge=-1, le=1, description="the ranker gate's margin on its held-out gain "
                                 "(-1: the gate is off)")
    ranker_traffic_percent: float = Field(10.0, ge=0, le=100, description="sessions routed to a ranker candidate "
                                          "that passed its gate")
    answer_cache: bool = Field(
        False, description="answer a question from an earlier answer to a similar one (semantic answer cache)")
    answer_cache_threshold: float = Field(
        0.9, gt=0, le=1, description="cosine similarity of the two questions' embeddings at or above which the "
        "earlier answer is served (answer_cache)")
    answer_cache_max_age_seconds: float = Field(
        7 * 86400, ge=0, description="cached answers older than this are not served and are deleted (0 = no limit)")
    answerer_model_path: str | None = Field(
        None, description="answerer = transformers / llama-cpp: a local model directory, a .gguf file, or a preset "
        "(qwen2.5-coder-0.5b, smollm2-135m) found in its installed PyPI packages and checked by sha256")
    answer_max_new_tokens: int = Field(160, ge=1, le=4096)
    answer_context_tokens: int = Field(
        2048, ge=0, le=1_000_000, description="generators: prompt plus answer tokens at most (0 = the model's whole "
        "context); passages are trimmed to fit, the lowest-ranked first, never the question")
    citation_policy: Literal["flag", "refuse"] = Field(
        "flag", description="a generated answer citing a passage it was not given: flagged (questions.flags) or "
        "refused (withheld, flagged too)")
    stream_answers: bool = Field(True, description="generators: write the partial answer to the row as it is "
                                 "generated, with a 'streaming' NOTIFY on pgsynapse_answers")
    stream_interval_ms: float = Field(
        150.0, ge=0, le=60_000, description="partial answer writes of one question at most this often (the first "
        "piece at once; 0 = every piece)")
    openai_base_url: str | None = Field(None, repr=False, description="OpenAI-compatible endpoint (answerer = openai)")
    openai_api_key: str | None = Field(None, repr=False)
    openai_model: str = "gpt-4o-mini"
    openai_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="the endpoint's reply (answers and SQL) waited for this long at most: to its "
        "first byte, then between two pieces of a streamed reply; a slower one fails the attempt")

    retrain_min_feedback: int = Field(200, ge=1, description="new training examples that trigger a retrain")
    retrain_margin: float = Field(
        0.0, ge=-1, le=1, description="the lower bound of the grouped hold-out gain's interval (hit@k + 0.5 x rr@10 "
        "per question) must be above this for a candidate to pass; -1 turns the gate off (every candidate passes)")
    retrain_eval_k: int = Field(5, ge=1, le=100, description="k of the gate's recall@k")
    retrain_gate_confidence: float = Field(
        0.95, ge=0.5, lt=1, description="confidence of the gate's paired cluster bootstrap intervals (two-sided)")
    retrain_bootstrap_samples: int = Field(2000, ge=100, le=20_000, description="bootstrap resamples of the gate")
    retrain_canary_tolerance: float = Field(
        0.05, ge=0, le=1, description="a candidate fails when the lower bound of its canary gain is below -this "
        "(a regression beyond noise on questions built from the corpus)")
    distill_margin: float = Field(
        -0.05, ge=-1, le=1, description="`pgsynapse model distill`: the student passes when the lower bound of its "
        "gain over the teacher (the gate's score on the feedback questions, which it never trains on) is above this: "
        "a smaller, faster model may lose a little, not more; -1 registers every student")
    distill_budget_seconds: float = Field(1800.0, gt=0, description="wall-clock training budget of one distillation")
    distill_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="torch device of the distillation trainer: 'cuda' trains on a GPU where the worker's host "
        "has one (the student is saved for the CPU runtimes all the same)")
    retrain_canary_size: int = Field(
        300, ge=0, le=100_000, description="questions of the canary set, built from the corpus by the first retrain "
        "and then frozen (0: no canary set)")
    retrain_group_threshold: float = Field(
        0.85, gt=0, le=1, description="feedback questions whose embeddings have at least this cosine similarity "
        "are one group of the gate's hold-out (as are questions of one template)")
    retrain_epochs: int = Field(1, ge=1, le=20)
    retrain_lr: float = Field(1e-4, gt=0, lt=1)
    retrain_freeze_layers: int = Field(-1, ge=-1, le=48, description="lowest transformer layers of the query encoder kept frozen, with the embeddings (-1: none)")
    retrain_batch_size: int = Field(32, ge=2, le=1024)
    retrain_anchor: float = Field(1.0, ge=0, description="pull of each training question's vector towards the base model's (squared distance weight)")
    retrain_interpolate: float = Field(
        1.0, ge=0, le=1, description="after training, the share of the fine-tuned weights kept, the rest being the base "
        "model's (WiSE-FT: a pull towards the base model on the weights; 1 = the fine-tuned weights as trained)")
    retrain_soup: int = Field(
        1, ge=1, le=8, description="runs of the recipe, each with its own seed, whose weights are averaged into the "
        "candidate (a model soup; measured no better, docs/learning.md); each run costs a training (1: no soup)")
    retrain_negative_pool: int = Field(200_000, ge=1000, description="chunk vectors in the training softmax (all of them in a smaller corpus)")
    retrain_synthetic_pairs: int = Field(4000, ge=0, description="at most this many corpus-only title/heading pairs added to feedback")
    retrain_refit: bool = Field(False, description="once the gate's split has judged the recipe, train it again on every example "
                                "and register that model (its canary set is checked too); off: the model the gate judged")
    retrain_teacher: str = Field(
        "none", pattern=r"^(ranker|none|version:[0-9]+)$", description="a stronger scorer whose judgement labels "
        "the training examples (which passage of the helpful page is the positive): 'ranker' = the active ranker "
        "when it is a model version (`pgsynapse ranker add version:N`), else none; 'version:N' = that backfilled "
        "model version; 'none' (the default: with the mpnet teacher it measured no better, docs/learning.md)")
    retrain_teacher_weight: float = Field(
        0.0, ge=0, description="weight of the teacher's distribution over the chunks as a soft target of each "
        "question, beside the positive (0: the teacher picks positives only)")
    retrain_seed: int = Field(0, ge=0, description="random seed of a training run (shuffles, corpus pairs, initial state)")
    retrain_heldout_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of examples the gate holds out, in whole groups of similar questions")
    retrain_budget_seconds: float = Field(1800.0, gt=0, description="wall-clock budget of one training run")
    retrain_memory_mb: int = Field(8000, ge=256, description="the trainer is stopped above this RSS")
    rollout_traffic_percent: float = Field(10.0, ge=0, le=100, description="sessions routed to a new candidate")
    auto_promote: bool = Field(
        True, description="the worker decides each candidate's A/B test once both sides have auto_promote_min_rated "
        "rated questions: promoted when its helpful rate is not significantly worse than the active version's, "
        "rolled back (rejected, traffic 0) when it is; false: neither, only `pgsynapse promote` / `traffic`")
    auto_promote_min_rated: int = Field(
        200, ge=10, le=10_000_000, description="rated questions (one verdict per question) on the candidate and on "
        "the active version since the candidate's first question: the one point where its A/B test is decided")
    auto_promote_alpha: float = Field(
        0.05, gt=0, lt=0.5, description="level of the one-sided two-proportion z-test: a candidate as good as the "
        "active version is rolled back with this probability")
    auto_promote_interval: float = Field(60.0, gt=0, description="seconds between looks at the A/B figures")
    backfill_batch: int = Field(256, ge=1, description="chunks embedded per backfill step")
    backfill_throttle_seconds: float = Field(0.2, ge=0, description="pause between backfill steps")
    backfill_step_seconds: float = Field(
        60.0, gt=0, description="a backfill step stops encoding after this long (it writes what it has; the next step "
        "goes on from there): a slow model takes shorter steps, never past batch_deadline_seconds")

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="larger images fail with a clear error "
                                 "(their bytes are never fetched from the database)")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="images with more pixels (width x height, read from the header) fail before "
        "any pixel is decoded: a decompression bomb never inflates")
    image_roots: tuple[Path, ...] = Field(
        (), description="directories image rows may name in images.path (comma-separated); none: path rows fail, "
        "store the bytes in images.data")
    image_batch_size: int = Field(16, ge=1, le=1024, description="images per image-model forward pass")

    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="HTTP port of /metrics (Prometheus) and /healthz; 0 or unset = off"
    )
    metrics_host: str = Field("127.0.0.1", description="address the metrics server binds (0.0.0.0 in a container)")
    stall_seconds: float = Field(
        300.0, gt=0, description="an idle dispatcher loop silent this long past poll_interval is stuck: "
        "the systemd watchdog is no longer pinged and /healthz answers 503 (a loop in a batch is stuck once the "
        "batch passes batch_deadline_seconds)"
    )

    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        """``INFO``, ``JSON``: logging's own spelling of a level is taken as ours."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url", "listen_url", "read_url", "sql_reader_url")
    @classmethod
    def _connection_string(cls, value: str | None) -> str | None:
        if value and (why := conninfo_problem(value)):
            raise ValueError(why)
        return value

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if unknown := [k for k in value if k not in JOB_KINDS]:
            raise ValueError(unknown_kinds(unknown))
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.chunk_overlap >= self.chunk_tokens // 2:
            raise ValueError("chunk_overlap: must be less than half of chunk_tokens")
        if self.listen_url and not self.database_url:
            raise ValueError("listen_url: needs database_url (the embedded server takes no listen URL)")
        if self.read_url and not self.database_url:
            raise ValueError("read_url: needs database_url (the replica of which primary?)")
        if self.openai_api_key and self.openai_base_url and urllib.parse.urlsplit(self.openai_base_url).username:
            raise ValueError("openai_base_url: has a user and password (sent as HTTP Basic authentication) while "
                             "openai_api_key is set (a bearer key): both are the Authorization header; keep one")
        return self

    @property
    def embedded(self) -> bool:
        return not self.database_url


def unknown_kinds(unknown: list[str]) -> str:
    """What is wrong with job kinds that do not exist (PGSYNAPSE_KINDS, ``run --kinds``)."""
    return f"unknown job kind(s) {', '.join(map(repr, unknown))} (the kinds: {', '.join(JOB_KINDS)})"


def conninfo_problem(value: str) -> str | None:
    """Why ``value`` is not a PostgreSQL connection string, in words that do not quote it; None when it is one.
    Checked before connecting: libpq's own parse error quotes the whole string back, a password with it."""
    try:
        params = conninfo_to_dict(value)
    except ProgrammingError:
        return ("not a PostgreSQL connection string (postgresql://user:password@host:port/dbname, or key=value "
                "pairs: host=... dbname=...)")
    try:
        timeout_from_conninfo(params)  # psycopg's own reading of it, else a "database error" at every connect
    except ProgrammingError:
        return f"connect_timeout must be a number of seconds, got {params.get('connect_timeout')!r}"
    return None


def _env_values(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if not raw and name == "database_url":  # an empty PGSYNAPSE_DATABASE_URL is unset: DATABASE_URL still counts
            raw = environ.get("DATABASE_URL")
        if raw is None or raw == "":
            continue
        values[name] = raw
    return values


# PGSYNAPSE_ names that are not settings: the config file's path, docker/compose.yaml's published port, and the
# tests' and benchmarks' own (tests/conftest.py, bench/common.py)
ENV_NOT_SETTINGS = frozenset({"CONFIG", "DB_PORT"})
ENV_OTHER_PREFIXES = ("TEST_", "BENCH_")


def unknown_environment(environ: dict[str, str] | None = None) -> list[tuple[str, str | None]]:
    """The ``PGSYNAPSE_*`` variables that name no setting (a typo is otherwise ignored without a word), each with
    the setting's variable it most likely meant."""
    environ = os.environ if environ is None else environ
    names = [f.upper() for f in Settings.model_fields]
    unknown = []
    for var in sorted(environ):
        rest = var.removeprefix(ENV_PREFIX)
        if rest == var or rest in names or rest in ENV_NOT_SETTINGS or rest.startswith(ENV_OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(rest, names, n=1)  # the names without their common prefix
        unknown.append((var, ENV_PREFIX + close[0] if close else None))
    return unknown


def _setting_name(loc: tuple[Any, ...]) -> str:
    return str(loc[0]) if loc else "settings"


def load_settings(
    config_file: str | Path | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read the settings once. Raises :class:`ConfigError` with a one-line message naming the bad setting, as
    ``overrides`` (the command line's options: ``--database-url``), the environment or the file has it."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    from_file: set[str] = set()  # the settings whose value is the file's: an error names the file, not a variable
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = read_config_file(Path(config_file))
        values.update(file_values)
        from_file = set(values)
    env = _env_values(environ)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(env)
    values.update(given)
    for name in ("kinds", "image_roots"):  # comma-separated, in the environment and in the file alike (or a list)
        if isinstance(values.get(name), str):
            values[name] = tuple(k.strip() for k in values[name].split(",") if k.strip())
    from_file -= set(env) | set(given)
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        problem = _describe(exc.errors()[0], values, config_file if from_file else None, from_file, set(given))
    else:
        # the file's settings that the environment or the command line override: the worker says so (daemon.py)
        settings._file_overridden = {name: (file_values[name], _overridden_by(name, given, environ))
                                     for name in set(file_values) - from_file}
        return settings
    # raised outside the handler: pydantic's error (its input_value may be a password) is not even its context
    raise ConfigError(problem)


def _overridden_by(name: str, given: dict[str, Any], environ: dict[str, str]) -> str:
    """The command line's option or the environment variable that sets ``name``."""
    if name in given:
        return "--" + name.replace("_", "-")
    var = ENV_PREFIX + name.upper()
    return var if environ.get(var) or name != "database_url" else "DATABASE_URL"


def _describe(err: Any, values: dict[str, Any], config_file: str | Path | None = None,
              from_file: set[str] = frozenset(), given: set[str] = frozenset()) -> str:
    """The one-line message of a validation error, naming the setting and where its value came from (the command
    line's option, the config file's key, else its environment variable); a secret's value is never shown."""
    name = _setting_name(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if not err["loc"] and ": " in msg:
        # a cross-field rule: its message starts with the setting it is about
        name, msg = msg.split(": ", 1)
        value = values.get(name)
    known = name in Settings.model_fields
    where = f"{ENV_PREFIX}{name.upper()}" if known else name
    if name == "database_url":
        where += " or DATABASE_URL"
    if name in from_file:
        where = f"{name} in {config_file}"
    if name in given:
        where = "--" + name.replace("_", "-")
    if not known:
        # a mistyped key: its value may be the secret of the setting it meant, so it is never shown
        close = difflib.get_close_matches(name, Settings.model_fields, n=1)
        msg = "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")
        value = None
    # kinds: the message names the unknown ones already
    shown = ("" if isinstance(value, dict) or value is None or name in SECRET_SETTINGS or name == "kinds"
             else f" (got {value!r})")
    return f"invalid setting {name} [{where}]: {msg}{shown}"
