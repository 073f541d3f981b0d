"""The bad-input matrix: every kind of bad row or bad setup gets a clear, specific error (on the row, in the
log or at start-up, with an exit code systemd does not restart in a loop), never a stuck job, never harm to
other rows. Bytes sources with invalid UTF-8 or NUL bytes are covered by tests/integration/test_ingest.py."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsynapse.models import default_model_path
from tests.chaos.invariants import QUIET, assert_exactly_once
from tests.helpers import aconn, fast_settings, running_worker, spawn_worker, wait_until

pytestmark = pytest.mark.anyio

EX_CONFIG = 78  # never restarted by systemd (RestartPreventExitStatus=78): no crash loop

GERMAN = ("Die Write-Ahead-Log-Technik stellt sicher, dass die Datenbank nach einem Absturz konsistent bleibt. "
          "Checkpoints begrenzen die Menge des wiederholten Protokolls.")
JAPANESE = "先行書き込みログは、クラッシュ後にデータベースの一貫性を保証します。チェックポイントは再生量を制限します。"


def _url_with(url: str, **params: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(url), **params})


async def test_bad_rows_get_their_own_error_and_neighbours_are_untouched(db_url, models, record):
    settings = fast_settings(db_url, batch_size=64, max_document_chars=2_000_000, runtime="onnx-int8")
    ten_mb = "lorem " * (10 * 1024 * 1024 // 6)
    docs = {
        "empty": ("Empty body", ""),
        "blank": ("", " \n\t \u00a0 \n"),
        "ten_mb": ("Ten megabytes", ten_mb),
        "german": ("WAL (Deutsch)", GERMAN),
        "japanese": ("WAL (日本語)", JAPANESE),
        "emoji_controls": ("Controls", "Tabs\tand\x07bells\x1b[0m and emoji 🐘 in text about VACUUM."),
        **{f"healthy{i}": (f"Healthy {i}", f"Healthy neighbour number {i} about checkpoints.") for i in range(6)},
    }
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        # all bad and good rows in ONE statement: one batch, so a bad row shares its batch with good ones
        cur = await conn.execute(
            "INSERT INTO pgsynapse.documents (title, body) SELECT * FROM unnest(%s::text[], %s::text[]) RETURNING id",
            ([t for t, _ in docs.values()], [b for _, b in docs.values()]))
        ids = dict(zip(docs, [r["id"] for r in await cur.fetchall()]))
        # NUL bytes cannot be stored in a text column: refused at the INSERT, the connection stays usable
        with pytest.raises(psycopg.DataError, match="NUL"):
            await conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('nul', %s)", ("a\x00b",))
        # questions: one of 100k characters (over max_question_chars) and a blank one (a no-break space and a
        # newline: the table refuses tabs, line breaks and spaces when written, and PostgreSQL's [[:space:]] does not
        # count a no-break space) beside a normal one, in one statement
        with pytest.raises(psycopg.errors.CheckViolation, match="a question needs text"):
            await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (E'\\n\\t')")
        cur = await conn.execute(
            "INSERT INTO pgsynapse.questions (text) VALUES (%s), (%s), ('What do checkpoints bound?') RETURNING id",
            ("why " * 25_000, "\u00a0\n"))
        long_q, blank_q, good_q = [r["id"] for r in await cur.fetchall()]
        # feedback for a question that does not exist: refused with a constraint that says so
        with pytest.raises(psycopg.errors.ForeignKeyViolation) as fk:
            await conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (987654321, true)")
        assert fk.value.diag.constraint_name == "feedback_question_must_exist"
        await wait_until(conn, QUIET)
        rows = {r["id"]: r for r in await (await conn.execute(
            "SELECT d.id, d.status, d.error, (SELECT count(*) FROM pgsynapse.chunks c WHERE c.document_id = d.id) AS chunks,"
            " (SELECT attempts FROM pgsynapse.jobs j WHERE j.kind = 'embed' AND j.ref_id = d.id) AS attempts"
            " FROM pgsynapse.documents d")).fetchall()}
        qs = {r["id"]: r for r in await (await conn.execute(
            "SELECT q.id, q.status, q.error, q.answer, j.attempts FROM pgsynapse.questions q"
            " JOIN pgsynapse.jobs j ON j.kind = 'answer' AND j.ref_id = q.id")).fetchall()}
        # a good feedback row still goes in after the refused one
        await conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true)", (good_q,))
    by = {k: rows[i] for k, i in ids.items()}
    # empty and blank: nothing to embed is not an error; no chunk from the body (the title alone may give one)
    assert by["empty"]["status"] == "embedded" and by["empty"]["error"] is None
    assert (by["blank"]["status"], by["blank"]["chunks"], by["blank"]["error"]) == ("embedded", 0, None)
    # 10 MB: over max_document_chars, failed at once (1 attempt) with the numbers in the error
    assert by["ten_mb"]["status"] == "failed" and by["ten_mb"]["attempts"] == 1
    assert by["ten_mb"]["error"] == f"InputError: body has {len(ten_mb):,} characters, over max_document_chars=2,000,000"
    for k in ("german", "japanese", "emoji_controls", *(f"healthy{i}" for i in range(6))):
        assert by[k]["status"] == "embedded" and by[k]["chunks"] >= 1 and by[k]["error"] is None, (k, by[k])
    assert qs[long_q]["status"] == "failed" and qs[long_q]["attempts"] == 1
    assert qs[long_q]["error"] == "InputError: question has 100,000 characters, over max_question_chars=20,000"
    assert (qs[blank_q]["status"], qs[blank_q]["attempts"], qs[blank_q]["answer"]) == ("failed", 1, None)
    assert qs[blank_q]["error"] == "InputError: the question is empty: there is nothing to answer"
    assert qs[good_q]["status"] == "answered" and qs[good_q]["answer"]
    result = assert_exactly_once(db_url)
    await conn.close()
    record(rows_checked=len(docs) + 3, failed_on_purpose=3, neighbours_ok=len(docs) - 3 + 1,
           jobs_checked=result["totals"]["jobs"], lost=result["lost"], duplicated=result["duplicated"])


def _corrupt_model(tmp: Path) -> Path:
    dst = tmp / "corrupt-model"
    shutil.copytree(default_model_path(), dst, ignore=shutil.ignore_patterns("onnx", "openvino", "*.onnx"))
    for weights in list(dst.glob("*.safetensors")) + list(dst.glob("*.bin")):
        weights.write_bytes(b"\x00garbage, not a tensor file" * 100)
    return dst


def _model_of_dim(tmp: Path, dim: int) -> Path:
    """The default model with a Dense layer projecting to ``dim``: a valid model of another width."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    m = SentenceTransformer(str(default_model_path()), device="cpu")
    m.append(Dense(m.get_embedding_dimension(), dim))
    dst = tmp / f"model-{dim}d"
    m.save(str(dst))
    return dst


@pytest.mark.parametrize("case", ["missing_model", "corrupt_model", "wrong_dim", "no_pgvector", "no_privileges"])
def test_bad_setup_stops_start_up_with_one_clear_line(case, new_db, template_db, tmp_path, record, request):
    # a fresh install: version 1 is still its source model, which a bad model path replaces at the first start
    db_url = new_db(template_db)
    env: dict[str, str] = {}
    url, command = db_url, "run"
    role = None
    if case == "missing_model":
        env["PGSYNAPSE_MODEL_PATH"] = str(tmp_path / "no-such-model")
        code, expect = EX_CONFIG, f"model path does not exist: {tmp_path / 'no-such-model'}"
    elif case == "corrupt_model":
        path = _corrupt_model(tmp_path)
        env["PGSYNAPSE_MODEL_PATH"] = str(path)
        code, expect = EX_CONFIG, f"cannot load model {path}"
    elif case == "wrong_dim":
        path = _model_of_dim(tmp_path, 128)
        env["PGSYNAPSE_MODEL_PATH"] = str(path)
        code, expect = EX_CONFIG, f"model {path} produces 128-dimensional vectors but model version 1 is registered with dim 384"
    elif case == "no_pgvector":
        # a server where pgvector is not installed: the extension directory is hidden from this session
        # readable by the server's own user when tests run as root: right under /tmp (pytest's own directories
        # are 0700, and how deep tmp_path lies depends on the run: pytest-xdist adds a level)
        empty = Path(tempfile.mkdtemp(prefix="pgsynapse-no-extensions-", dir="/tmp"))
        empty.chmod(0o755)
        request.addfinalizer(empty.rmdir)
        url = _url_with(new_db(), options=f"-c extension_control_path={empty}")
        command = "migrate"
        code, expect = EX_CONFIG, "the pgvector extension is not available on this PostgreSQL server"
    else:
        role = f"pgsynapse_nopriv_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute(f'CREATE ROLE "{role}" LOGIN')
        url = _url_with(db_url, user=role)
        code, expect = EX_CONFIG, "permission denied"
    try:
        w = spawn_worker(url, env=env, wait_started=False) if command == "run" else None
        if w is None:
            import subprocess
            import sys

            out = subprocess.run([sys.executable, "-m", "pgsynapse", "--database-url", url, "migrate"],
                                 capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            got, lines = out.returncode, [ln for ln in out.stderr.splitlines() if ln.startswith("pgsynapse: error:")]
        else:
            got = w.proc.wait(120)
            w.wait_event("process_exited")
            lines = [f"pgsynapse: error: {error}" for error in w.fatal_errors()]  # JSON logs: a fatal_error event
            assert not any(e.get("event") == "worker_started" for e in w.events)
    finally:
        if role:
            with psycopg.connect(db_url, autocommit=True) as c:
                c.execute(f'DROP OWNED BY "{role}"')
                c.execute(f'DROP ROLE "{role}"')
    assert got == code, lines
    assert len(lines) == 1 and expect in lines[0], lines  # one line, no traceback
    if case in ("corrupt_model", "wrong_dim"):
        # the start's runtime export failed on the bad model and recorded it on version 1 as tried, so the export
        # (tried once per version and runtime) never ran again once the path was fixed: INT8 off for good
        with psycopg.connect(db_url) as c:
            export = c.execute("SELECT metrics->'runtime_export' FROM pgsynapse.model_versions WHERE id = 1"
                               ).fetchone()[0]
        assert export is None, export
    if case == "no_privileges":
        assert "GRANT pgsynapse_worker TO <user> for a worker" in lines[0]
    record(exit_code=got, error=lines[0][:200])
