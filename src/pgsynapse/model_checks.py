"""The start-up check of the generative models a worker's kinds need: one that cannot be there stops ``pgsynapse
run`` before it is ready, with a :class:`ConfigError` (exit 78), instead of failing every question later.

Cheap: installed packages and paths only (:func:`check_model`). The answerer's model then loads at the worker's
warm-up (AnswerHandler.warm_up), the SQL models too (SqlAnswerHandler.warm_up): a preset's files are joined and
checked by sha256 then (491 MB for the Qwen preset).
"""

from __future__ import annotations

from typing import Any

from pgsynapse.answerers.local_models import Preset, check_model, preset_not_installed
from pgsynapse.config import Settings
from pgsynapse.db import connect
from pgsynapse.errors import ConfigError
from pgsynapse.logs import get_logger
from pgsynapse.textsql.generate import auto_runtime, locate_sql_model
from pgsynapse.textsql.registry import active_sql_model

log = get_logger(__name__)

SQL_KINDS = frozenset({"sql_answer", "sql_retrain"})


def check_models(settings: Settings, *, presets: dict[str, Preset] | None = None) -> list[dict[str, Any]]:
    """Raise a one-line :class:`ConfigError` naming the setting when the answerer's model (kind ``answer``) or an
    explicitly set SQL model (kinds ``sql_answer``, ``sql_retrain``) cannot be there, or their ``openai`` runtime
    has no ``openai_base_url``. The default SQL model (the ``qwen2.5-coder-0.5b`` preset, not installed by a plain
    ``pip install pgsynapse``) is only returned, as the fields of a ``sql_model_unavailable`` warning for
    :func:`warn_unavailable` (that worker serves every other kind, and its data questions fail with the same error
    on their rows): ``pgsynapse run`` logs it once its database is up, in the order of its start."""
    check_device(settings)
    kinds = set(settings.kinds)
    for needed, runtime_setting, runtime in (("answer" in kinds, "answerer", settings.answerer),
                                             (bool(kinds & SQL_KINDS), "sql_runtime", settings.sql_runtime)):
        if needed and runtime == "openai" and not settings.openai_base_url:
            raise ConfigError("invalid setting openai_base_url [PGSYNAPSE_OPENAI_BASE_URL]: required when "
                              f"{runtime_setting} = openai (the endpoint's URL, as http://host:port/v1)")
    if "answer" in kinds and settings.answerer in ("transformers", "llama-cpp"):
        if not settings.answerer_model_path:
            raise ConfigError("invalid setting answerer_model_path [PGSYNAPSE_ANSWERER_MODEL_PATH]: required when "
                              f"answerer = {settings.answerer}")
        check_model(settings.answerer_model_path, runtime=settings.answerer, setting="answerer_model_path",
                    runtime_setting="answerer", presets=presets)
    if kinds & SQL_KINDS and settings.sql_runtime != "openai":  # openai: sql_model_path is the endpoint's model
        path = settings.sql_model_path
        runtime = auto_runtime(path) if settings.sql_runtime == "auto" else settings.sql_runtime
        try:
            check_model(path, runtime=runtime, setting="sql_model_path", runtime_setting="sql_runtime",
                        presets=presets)
        except ConfigError as exc:
            if "sql_model_path" in settings.model_fields_set:  # set in the environment, the file or a flag
                raise
            install = preset_not_installed(path, presets)
            what = {"install": install} if install else {"error": str(exc)}
            return [{"model": path, **what, "effect": "questions about the data fail until it is there, unless a "
                     "registered SQL model is active (pgsynapse sql-model list)"}]
    return []


def check_device(settings: Settings) -> None:
    """Raise a :class:`ConfigError` naming ``device`` when it is not a device torch knows, can use here, or serves
    on: the ONNX runtimes run on the CPU. The default (cpu) is not checked: torch is not even imported for it."""
    device = settings.device
    if device == "cpu":
        return
    import torch  # only for another device: its import takes seconds, and a worker on ONNX may never need it

    problem = "invalid setting device [PGSYNAPSE_DEVICE]: "
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{problem}{device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if settings.runtime != "torch":
        raise ConfigError(f"{problem}{device!r} needs runtime = torch [PGSYNAPSE_RUNTIME]: the runtime "
                          f"{settings.runtime} runs on the CPU, so the models would not use {device!r}; set "
                          "PGSYNAPSE_RUNTIME=torch, or PGSYNAPSE_DEVICE=cpu")
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch says "not compiled with CUDA" with an AssertionError
        why = " ".join(str(exc).split())[:200]
        raise ConfigError(
            f"{problem}torch {torch.__version__} cannot use {device!r} on this host ({why}): install a torch build "
            "for it, or check that the device is visible to this process (the shipped systemd unit's "
            "PrivateDevices=yes hides GPUs: set PrivateDevices=no in a drop-in), or set PGSYNAPSE_DEVICE=cpu"
        ) from None


def warn_unavailable(unavailable: list[dict[str, Any]], settings: Settings | None = None,
                     url: str | None = None) -> None:
    """Log ``sql_model_unavailable`` with each of :func:`check_models`' warnings: at info, and saying so, when a
    registered SQL model is active on the database at ``url`` (migrated) and there: it serves the data questions,
    not the settings' default."""
    serving = _active_sql_model_there(settings, url) if unavailable and settings and url else None
    for fields in unavailable:
        if serving is None:
            log.warning("sql_model_unavailable", **fields)
        else:
            log.info("sql_model_unavailable", **{**fields, "effect": f"none: SQL model {serving['id']} "
                                                 f"({serving['name']}) of the registry is active and serves"})


def _active_sql_model_there(settings: Settings, url: str) -> dict[str, Any] | None:
    """The active registered SQL model, when there is one that this host can load (as make_generator finds it)."""
    with connect(url, autocommit=True, settings=settings) as conn:
        model = active_sql_model(conn)
    if model is None:
        return None
    try:
        locate_sql_model(model["runtime"], model["path"], settings)
    except ConfigError:
        return None
    return model
