"""A snapshot of the queue and the corpus, for ``pgsynapse status``."""

from __future__ import annotations

import textwrap
from typing import Any

import psycopg

from pgsynapse.config import Settings
from pgsynapse.db import EXPORT_COMMAND, SCHEMA_ERRORS, command_exporting, exported_version, runtime_export
from pgsynapse.learning.abreport import recent_events, render_events
from pgsynapse.learning.routing import served_shares
from pgsynapse.migrate import schema_state
from pgsynapse.queries import q
from pgsynapse.replica import replica_lag
from pgsynapse.ranking.registry import REGISTRY as RANKERS
from pgsynapse.textsql.registry import REGISTRY as SQL_MODELS
from pgsynapse.wording import counted, listed

SHOWN_REASONS = 5  # the commonest failure errors and skip reasons that `pgsynapse status` lists
# what a status of a schema too far behind for its queries leaves out (``incomplete``)
NOT_SHOWN = "the queue, models, questions and workers: the status queries read what these migrations add"


def status_snapshot(conn: psycopg.Connection, *, read_url: str | None = None,
                    settings: Settings | None = None) -> dict[str, Any]:
    """:func:`snapshot`, or on a schema behind by a migration that adds what its queries read, the schema's state
    alone, with ``incomplete`` saying what is not shown: which migrations to apply is then the status. (It was an
    error, exit 69, while a schema behind by migrations it reads around was reported, exit 0.) A database with no
    pgsynapse schema at all raises, as every command does there."""
    try:
        return snapshot(conn, read_url=read_url, settings=settings)
    except SCHEMA_ERRORS:
        conn.rollback()
        state = schema_state(conn)
        if state["applied"] is None or not state["pending"]:
            raise
        return {"schema": state, "incomplete": NOT_SHOWN}


def snapshot(conn: psycopg.Connection, *, read_url: str | None = None,
             settings: Settings | None = None) -> dict[str, Any]:
    """The status of the database at ``conn``, and of the read replica at ``read_url`` when one is set; with
    ``settings`` (the command's, like ``read_url``), whether the answer cache is on, beside what it holds."""
    jobs = [dict(r) for r in conn.execute(q("queue_stats"))]
    for r in jobs:
        if r["oldest_pending_seconds"] is not None:
            r["oldest_pending_seconds"] = round(float(r["oldest_pending_seconds"]), 1)
    counts = conn.execute(q("status_counts", "ops.sql")).fetchone()
    versions = served_shares([{**dict(r), "traffic_percent": float(r["traffic_percent"])}
                              for r in conn.execute(q("status_versions", "ops.sql"))],
                             conn.execute(q("routable_versions", "answers.sql")).fetchall())
    active = next((v for v in versions if v["status"] == "active"), None)
    progress = {r["id"]: r for r in conn.execute(q("backfill_progress", "learning.sql"))}
    for v in versions:
        p = progress.get(v["id"])
        if p is not None:
            v["embedded_chunks"] = p["embedded"]
            v["backfill"] = "done" if p["backfilled_at"] else f"{p['embedded']}/{p['chunks']}"
            v["backfill_eta_seconds"] = None if p["backfilled_at"] else backfill_eta(p)
            v["backfill_state"] = "done" if p["backfilled_at"] else backfill_state(p)
    workers = [dict(r) for r in conn.execute(q("workers_seen"))]
    export = runtime_export(conn)
    images = dict(conn.execute(q("image_counts", "images.sql")).fetchone() or {})
    image_models = [dict(r) for r in conn.execute(q("list_image_models", "images.sql")) if r["status"] != "retired"]
    questions = dict(conn.execute(q("question_counts", "answers.sql")).fetchone() or {})
    data_questions = dict(conn.execute(q("data_question_counts", "textsql.sql")).fetchone() or {})
    # the active SQL model's and ranker's shares are what the candidates routed leave them (their rows say 100
    # whatever the candidates take)
    sql_models = served_shares([{**dict(r), "traffic_percent": float(r["traffic_percent"])}
                                for r in conn.execute(SQL_MODELS.sql("models")) if r["status"] != "retired"],
                               SQL_MODELS.routable_models(conn))
    rankers = served_shares([{**{k: r[k] for k in ("id", "name", "runtime", "status")},
                              "traffic_percent": float(r["traffic_percent"])}
                             for r in conn.execute(RANKERS.sql("models")) if r["status"] != "retired"],
                            RANKERS.routable_models(conn))
    feedback = dict(conn.execute(q("feedback_progress", "learning.sql")).fetchone())
    failures = [dict(r) for r in conn.execute(q("failed_job_errors", "ops.sql"), {"limit": SHOWN_REASONS})]
    skipped = [dict(r) for r in conn.execute(q("skipped_job_reasons", "ops.sql"), {"limit": SHOWN_REASONS})]
    return {"schema": schema_state(conn), "jobs": jobs, **dict(counts or {}), "active_model": active,
            "model_versions": versions, "workers": workers, "runtime_export": export, "model_events": recent_events(conn, 5), "images": images,
            "image_models": image_models,
            "questions": questions, "data_questions": data_questions, "sql_models": sql_models, "rankers": rankers,
            "feedback": feedback, "failures": failures, "skipped": skipped,
            "answer_cache": answer_cache_state(conn, settings),
            "read_replica": replica_lag(conn, read_url) if read_url else None,
            "enqueue_notify": conn.execute(q("enqueue_notify")).fetchone()["notify_on_enqueue"]}


def answer_cache_state(conn: psycopg.Connection, settings: Settings | None) -> dict[str, Any]:
    """The answer cache's ``entries`` and their ``hits``; with ``settings``, whether it is on (``enabled``), its
    ``threshold`` and ``max_age_seconds``."""
    counts = dict(conn.execute(q("cache_counts", "answer_cache.sql")).fetchone())
    if settings is None:
        return counts
    return {"enabled": settings.answer_cache, "threshold": settings.answer_cache_threshold,
            "max_age_seconds": settings.answer_cache_max_age_seconds, **counts}


def backfill_eta(p: dict[str, Any]) -> float | None:
    """Seconds left of a backfill at its rate so far (it started when the version was registered); None before its
    first step."""
    done, total, seconds = p["embedded"], p["chunks"], p["backfill_seconds"]
    return round((total - done) * seconds / done, 1) if 0 < done < total and seconds > 0 else None


def backfill_state(p: dict[str, Any]) -> str:
    """``embedded/chunks (percent), ETA`` of a version still backfilling."""
    done, total = p["embedded"], p["chunks"]
    state = f"{done}/{total} ({100 * done / total:.0f}%)" if total else f"{done}/{total}"
    eta = backfill_eta(p)
    return state if eta is None else f"{state}, ETA {_duration(eta)}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_embedded(emb: dict[str, Any]) -> str:
    """The status line that says how to reach the embedded server."""
    return (f"database       : embedded PostgreSQL in {emb['data_dir']}, while a pgsynapse process runs "
            f"(`pgsynapse run`): psql '{emb['url']}'")


def render(snap: dict[str, Any]) -> str:
    lines = []
    if emb := snap.get("embedded"):
        lines.append(render_embedded(emb))
    lines.append(f"schema         : {_render_schema(snap['schema'])}")
    if snap.get("incomplete"):
        lines.append(f"not shown      : {snap['incomplete']}")
        return "\n".join(lines)
    a = snap["active_model"]
    lines.append(f"active model   : v{a['id']} {a['name']} ({a['runtime']}, dim {a['dim']})" if a else "active model   : none")
    lines.append(
        f"documents      : {snap['documents']} ({snap['documents_pending']} pending, {snap['documents_failed']} failed)"
    )
    lines.append(f"chunks         : {snap['chunks']}")
    lines.append(f"embeddings     : {snap['embeddings']}")
    for v in snap["model_versions"]:
        if v["status"] in ("active", "candidate"):
            ab = v.get("ab") if v["status"] == "candidate" else None
            lines.append(f"model v{v['id']:<8}: {v['status']} ({v['runtime']}"
                         f"{', waiting for its runtime export' if v.get('runtime_pending') else ''}), "
                         f"{v['traffic_percent']:g}% traffic, backfill {v.get('backfill_state', '-')}"
                         + (f", A/B {ab['cand_rated']} vs {ab['active_rated']} rated of {ab['min_rated']} needed"
                            if ab else ""))
    qs = snap.get("questions") or {}
    total = sum(qs.get(k, 0) for k in ("pending", "answered", "blocked", "failed"))
    if total:
        lines.append(f"questions      : {total} ({qs['pending']} pending, {qs['answered']} answered, "
                     f"{qs['blocked']} blocked, {qs['failed']} failed)"
                     + (f", {qs['cached']} from the answer cache" if qs["cached"] else ""))
    if (ac := snap.get("answer_cache")) is not None:
        lines.append(f"answer cache   : {_render_cache(ac)}")
    im = snap.get("images") or {}
    if sum(im.values()) or snap.get("image_models"):
        lines.append(f"images         : {sum(im.values())} ({im['pending']} pending, {im['failed']} failed)")
        embeddable = im["pending"] + im["embedded"]
        for m in snap.get("image_models", []):
            lines.append(f"image model {m['id']:<3}: {m['status']} {m['kind']} {m['name']} ({m['runtime']}, dim {m['dim']}), "
                         f"{m['vectors']}/{embeddable} images embedded")
        if not snap.get("image_models") and im["pending"]:
            lines.append("                 images wait for an image model: pgsynapse image-model add PATH")
    dq = snap.get("data_questions") or {}
    if sum(dq.values()) or snap.get("sql_models"):
        lines.append(f"data questions : {sum(dq.values())} ({dq['pending']} pending, {dq['answered']} answered, "
                     f"{dq['refused']} refused, {dq['failed']} failed, {dq['blocked']} blocked)")
        for m in snap.get("sql_models", []):
            lines.append(f"SQL model {m['id']:<5}: {m['status']} {m['name']} ({m['runtime']}), "
                         f"{float(m['traffic_percent']):g}% traffic")
    for m in snap.get("rankers", []):
        lines.append(f"ranker {m['id']:<8}: {m['status']} {m['name']} ({m['runtime']}), "
                     f"{float(m['traffic_percent']):g}% of sessions")
    fb = snap.get("feedback") or {}
    if fb.get("rows"):
        lines.append(f"feedback       : {counted(fb['rows'], 'row')} on {counted(fb['questions'], 'question')}; "
                     f"{fb['untrained']} of {counted(fb['retrain_min_feedback'], 'new example')} for the next retrain "
                     "(one per question)")
    if snap.get("model_events"):
        lines.append("model events   : (newest first)")
        lines += ["  " + line for line in render_events(snap["model_events"])]
    if snap.get("enqueue_notify") is False:
        lines.append("enqueue NOTIFY : off (idle workers poll every quiet_poll_interval: pgsynapse queue-notify on)")
    rr = snap.get("read_replica")
    if rr:
        lines.append(f"read replica   : {_render_replica(rr)}")
    export = snap.get("runtime_export") or {}
    lines.append(f"workers        : {len(snap['workers']) or _render_none_registered(export)}")
    for w in snap["workers"]:
        seen = w["last_seen_seconds"]
        state = "" if seen < 120 else f" (STALE: not seen for {seen:g}s; killed?)"
        if not w.get("connected", True) and seen < 120:
            state = " (GONE: its connection closed (killed?), or it is reconnecting)"
        lines.append(f"  {w['host']}:{w['pid']}  {','.join(w['kinds'])}  rss {w['rss_mb']:.0f} MB, "
                     f"seen {seen:g}s ago{state}")
        for m in w["models"]:
            lines.append(f"    model v{m['version']} {m['name']} ({m['runtime']}): loaded in {m['load_seconds']:g}s, "
                         f"+{m.get('rss_added_mb', 0):.0f} MB")
    if export.get("exporting") or export.get("waiting"):
        lines.append(f"runtime export : {_render_export(export)}")
    width = max([9, *(len(r["kind"]) + 1 for r in snap["jobs"])])  # "sql_answer", "embed_image" are longer than 9
    lines.append(f"jobs           : {'kind':<{width}} pending  running  failed  done     oldest pending")
    if not snap["jobs"]:
        lines.append("                 (none)")
    for r in snap["jobs"]:
        age = "-" if r["oldest_pending_seconds"] is None else f"{r['oldest_pending_seconds']}s"
        lines.append(f"                 {r['kind']:<{width}} {r['pending']:<8} {r['running']:<8} {r['failed']:<7} "
                     f"{r['done']:<8} {age}")
    if snap.get("failures"):
        lines.append("failed, why    : (the commonest errors; `pgsynapse retry-failed` puts the jobs back once fixed)")
        lines += [f"                 {r['kind']:<{width}} {r['n']:<6} {_short(r['error'] or 'unknown error')}"
                  for r in snap["failures"]]
    if snap.get("skipped"):
        lines.append("skipped, why   : (done with nothing to write)")
        lines += [f"                 {r['kind']:<{width}} {r['n']:<6} {_short(r['reason'])}" for r in snap["skipped"]]
    return "\n".join(lines)


def _render_none_registered(e: dict[str, Any]) -> str:
    """The workers line when none is registered (``e``: db.runtime_export): a worker starting (its export, or its
    wait for `pgsynapse model export --switch`'s), or that command's export with no worker waiting for it."""
    if e.get("by") == "command":
        if e["workers_waiting"]:
            return (f"none registered yet: a worker is starting (it waits for {EXPORT_COMMAND}'s export of "
                    f"{exported_version(e)} to its runtime first: runtime export, below)")
        return (f"none registered ({command_exporting(e)}: runtime export, below; a worker started now waits for it, "
                "then serves that version on its runtime)")
    if e.get("exporting"):
        return ("none registered yet: a worker is starting (it exports a model version to its runtime first: "
                "runtime export, below)")
    return "none registered"


def _render_export(e: dict[str, Any]) -> str:
    """A model version's export to the workers' runtime, under way: a first start's worker serves once it ends."""
    waiting = (f"; {e['waiting']} more worker{'s wait' if e['waiting'] != 1 else ' waits'} for it"
               if e["waiting"] else "")
    if not e["exporting"]:
        return f"{e['waiting']} worker{'s wait' if e['waiting'] != 1 else ' waits'} for the export lock"
    since = f" for {_duration(e['seconds'])}" if e["seconds"] is not None else ""
    if e.get("by") == "command":
        return (f"under way{since}: {EXPORT_COMMAND} exports {exported_version(e)} to its runtime and checks its "
                f"agreement (minutes on a small host; a starting worker waits for it, then serves the version on that "
                f"runtime){waiting}")
    return (f"under way{since}: a worker exports a model version to its runtime and checks its agreement (once per "
            f"version, minutes on a small host; a starting worker serves once it ends){waiting}")


def _render_schema(s: dict[str, Any]) -> str:
    if s["newer"]:
        return (f"migration {max(s['newer'])}, NEWER than this release (it knows up to {s['latest']}): a newer "
                "pgsynapse migrated it; upgrade this one (docs/operations.md)")
    if s["pending"]:
        return (f"migration {s['applied']} of {s['latest']}, {len(s['pending'])} to apply ({listed(s['pending'])}): "
                "run `pgsynapse migrate`")
    return f"migration {s['applied']} (up to date)"


def _render_cache(c: dict[str, Any]) -> str:
    held = counted(c["entries"], "entry", "entries") + (f", served {counted(c['hits'], 'time')}" if c["entries"] else "")
    if "enabled" not in c:
        return held
    if not c["enabled"]:
        return f"off (PGSYNAPSE_ANSWER_CACHE=true turns it on), {held}"
    age = c["max_age_seconds"]
    days = age / 86400
    age = ("no max age" if not age else f"max age {days:g} day{'s' if days != 1 else ''}" if age % 86400 == 0
           else f"max age {_duration(age)}")
    return f"on (threshold {c['threshold']:g}, {age}), {held}"


def _short(text: str) -> str:
    return textwrap.shorten(" ".join(text.split()), 100, placeholder=" ...")


def _render_replica(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"UNREACHABLE ({r['error']}): retrieval and search read the primary"
    if not r["in_recovery"]:
        return "NOT A REPLICA (not in recovery): read_url must name a standby of this database"
    since = "no commit replayed yet" if r["since_replay_seconds"] is None else \
        f"last commit replayed {r['since_replay_seconds']:.1f}s ago"
    state = "caught up" if r["behind_bytes"] <= 0 else f"{r['behind_bytes']:,} bytes of WAL behind"
    return f"{state}, {since}" + (" (REPLAY PAUSED)" if r["paused"] else "")
