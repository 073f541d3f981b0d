"""The CLI's model registry commands end to end, as a user runs them (split from tests/e2e/test_cli.py)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import psycopg
import pytest

from pgsynapse.cli import main
from tests.embed_models import tiny_embedding_model
from tests.helpers import SAFETY_TIMEOUT, insert_docs, pgsynapse, spawn_worker


def test_model_add_and_list_from_the_command_line(new_db, template_db, tmp_path):
    url = new_db(template_db)
    path = tiny_embedding_model(tmp_path / "tiny-40", 40)
    r = pgsynapse("model", "add", str(path), "--name", "tiny", url=url)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model version 2 added as a candidate: tiny (torch, dim 40)" in r.stdout
    assert "warning: the model reads 128 tokens" in r.stderr
    listed = pgsynapse("model", "list", url=url).stdout
    assert re.search(r"\n +2  candidate  torch +40 +0%  0/0 +tiny", listed), listed


def test_model_add_follow_of_a_model_already_added_follows_its_backfill(new_db, template_db, tmp_path, capsys):
    """A user who added a model without --follow, or stopped following, runs the same command with --follow: it
    follows the version already added instead of refusing (without --follow it is still refused), and its closing
    line says the share the first add asked for, not the second command's."""
    url = new_db(template_db)
    insert_docs(url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples.")])
    path = tiny_embedding_model(tmp_path / "tiny-40", 40)
    # the commands before the one under test run in-process (cli.main): a subprocess each loaded torch again
    assert main(["--database-url", url, "model", "add", str(path), "--traffic", "25"]) == 0
    capsys.readouterr()
    assert main(["--database-url", url, "model", "add", str(path)]) == 1
    assert f"{path} is already model version 2 (candidate)" in capsys.readouterr().err
    worker = spawn_worker(url)
    try:
        again = pgsynapse("model", "add", str(path), "--follow", "--no-progress", "--traffic", "10", url=url)
    finally:
        assert worker.stop() == 0, worker.tail()
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == (f"{path} is already model version 2 (candidate): following its backfill\n"
                            "model version 2 is backfilled: it serves 25% of sessions, then pgsynapse promote 2\n")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.model_versions").fetchone()[0] == 2
        assert conn.execute("SELECT traffic_percent FROM pgsynapse.model_versions WHERE id = 2").fetchone()[0] == 25
    assert ("pgsynapse: warning: --traffic applies when a model is added; pgsynapse traffic 2 10 sets it now"
            in again.stderr)


def _stderr_until(proc: subprocess.Popen, word: str) -> str:
    """What ``proc`` wrote on stderr until ``word``, read as it is written (60 s at most: a safety net)."""
    said, deadline = b"", time.monotonic() + 60
    while word.encode() not in said and select.select([proc.stderr], [], [], max(0, deadline - time.monotonic()))[0]:
        if not (chunk := os.read(proc.stderr.fileno(), 65536)):
            break
        said += chunk
    return said.decode()


@pytest.mark.parametrize("command, table", [
    (["promote", "1"], "model_versions"),
    (["sql-model", "retire", "1"], "sql_models"),
    (["ranker", "retire", "1"], "ranker_models"),
    (["image-model", "retire", "{image}"], "image_models"),
])
def test_a_registry_command_waiting_for_a_lock_says_so_and_who_holds_it(db_url, command, table):
    """The registries' commands lock their table (one change of statuses at a time) and waited without a word behind
    any transaction that holds a conflicting lock: a worker's write, a session left open in psql. After a second's
    wait they now say so (``registry_lock_waiting``, a warning: shown by the quiet commands too), naming the
    sessions holding the table, and go on once it is free."""
    env = {**os.environ, "DATABASE_URL": db_url}
    with psycopg.connect(db_url, autocommit=True) as conn:  # the image command looks its model up first
        image = conn.execute("INSERT INTO pgsynapse.image_models (name, kind, artifact_path, dim, status)"
                             " VALUES ('old', 'image', '/nowhere', 8, 'retired') RETURNING id").fetchone()[0]
    command = [c.format(image=image) for c in command]
    with psycopg.connect(db_url, application_name="long-report") as holder:
        holder.execute(f"LOCK TABLE pgsynapse.{table} IN ROW EXCLUSIVE MODE")  # a writer's lock, not committed
        proc = subprocess.Popen([sys.executable, "-m", "pgsynapse", *command], env=env, cwd="/tmp",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            said = _stderr_until(proc, "registry_lock_waiting")
            assert "registry_lock_waiting" in said, f"{command} waited on a lock without a word: {said!r}"
            assert f"pgsynapse.{table}" in said and "long-report" in said, said
            assert proc.poll() is None  # still waiting, until the holder commits
        finally:
            holder.commit()
            err = proc.communicate(timeout=SAFETY_TIMEOUT)[1].decode()
    assert proc.returncode == 1 and "error: " in err, err  # its own refusal (already active or retired, no such model)

