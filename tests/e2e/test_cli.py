"""The CLI end to end, as a user runs it, and the installed (non-editable) package. (Its questions, model
commands and errors: tests/e2e/test_cli_ask.py, test_cli_models.py, test_cli_errors.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg

from pgsynapse.cli import main
from pgsynapse.demo import QUESTIONS
from tests.helpers import pgsynapse

REPO = Path(__file__).resolve().parents[2]


def test_demo_ingests_embeds_and_searches(new_db, demo_sql_model, capsys, monkeypatch):
    url = new_db()  # empty: the demo migrates it itself
    env = {"PGSYNAPSE_SQL_MODEL_PATH": demo_sql_model}  # a tiny model taught the demo's data question
    r = pgsynapse("demo", "--limit", "4", url=url, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pgsynapse demo: 4 pages" in r.stdout
    assert "embedded 4 documents" in r.stdout
    # every query printed ranked results with scores, titles and sources
    assert r.stdout.count("search: ") == 5
    assert r.stdout.count(".html #") >= 5
    # and questions, answered with citations
    assert r.stdout.count("\nQ (demo-") == 3
    assert "answered in" in r.stdout and "chunk id " in r.stdout
    # and a question about the data, on the table the demo made: its SQL and the result
    assert "\nQ: How many orders has each region shipped, most first?" in r.stdout
    assert '  SQL: select region, count ( shipped ) from "demo_shop".orders group by region order by 2 desc, 1' in r.stdout
    with psycopg.connect(url) as conn:
        want = conn.execute("SELECT region, count(shipped) FROM demo_shop.orders GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()
    table = r.stdout.split("  region | count\n")[1].splitlines()[1:1 + len(want)]
    assert [tuple(c.strip() for c in ln.split("|")) for ln in table] == [(g, str(n)) for g, n in want]
    assert "  checked: the rows of a query written by hand (SELECT region, count(*)" in r.stdout  # and says so
    # then what to do next, with this database (it ended on the check: a new user was left to find the commands)
    assert r.stdout.rstrip().endswith(
        "\nnext: the pages stay in the database of DATABASE_URL. Ask your own questions, or add your own files:\n"
        '  pgsynapse ask "How do I ...?"           (or INSERT INTO pgsynapse.questions: README, "Asking questions")\n'
        "  pgsynapse ingest DIR && pgsynapse run   (the worker embeds what is inserted, then waits for more)"), r.stdout

    # the commands after the first demo run in-process (cli.main): this process has torch loaded already, a
    # subprocess imported it again (seconds)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert main(["--database-url", url, "status", "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["documents"] == 4 and snap["documents_pending"] == 0 and snap["chunks"] == snap["embeddings"] > 4
    assert snap["active_model"]["name"] == "all-MiniLM-L6-v2"
    jobs = {j["kind"]: j for j in snap["jobs"]}
    assert jobs["embed"]["done"] == 4 and jobs["answer"]["done"] == 3

    assert main(["--database-url", url, "status"]) == 0
    assert "active model   : v1 all-MiniLM-L6-v2" in capsys.readouterr().out

    assert main(["--database-url", url, "search", "insert rows into a table", "-k", "2"]) == 0
    se = capsys.readouterr()
    lines = [ln for ln in se.out.splitlines() if ln[:2] in ("1.", "2.")]
    assert len(lines) == 2 and "[" in lines[0], se
    assert "2 hits in the fused (vector and full-text) rank order; the score is the cosine" in se.out

    assert main(["--database-url", url, "demo", "--limit", "4"]) == 0  # re-running inserts nothing new
    assert "embedded 4 documents" in capsys.readouterr().out
    # and starts its conversations afresh: its first questions are not follow-ups of the last run's
    first: dict[str, str] = {}
    for text, session in QUESTIONS:
        first.setdefault(session, text)
    with psycopg.connect(url) as conn:
        asked = conn.execute("SELECT retrieval_query = text FROM pgsynapse.questions WHERE text = ANY(%s)",
                             (list(first.values()),)).fetchall()
    assert len(asked) == 2 * len(first) and all(same for (same,) in asked), asked
    assert main(["--database-url", url, "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 4


def test_migrate_command_is_idempotent(new_db):
    url = new_db()
    first = pgsynapse("migrate", url=url)
    assert first.returncode == 0 and "applied: 0001_init.sql" in first.stdout
    second = pgsynapse("migrate", url=url)
    assert second.returncode == 0 and "up to date" in second.stdout


def test_non_editable_wheel_works_from_outside_the_repo(new_db, tmp_path):
    """The built wheel carries every module and SQL file; run from /tmp it migrates and imports the worker."""
    import shutil

    wheel_dir = tmp_path / "wheel"
    shutil.rmtree(REPO / "build", ignore_errors=True)  # a stale build/ would hide a package missing from pyproject
    # with build isolation, as `pip install .` builds it (a newer setuptools packages only what pyproject lists)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True, timeout=300)
    [wheel] = list(wheel_dir.glob("pgsynapse-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ["pgsynapse/migrations/0001_init.sql", "pgsynapse/triggers/documents_v1.sql",
                   "pgsynapse/listener/worker.py", "pgsynapse/handlers/embed.py", "pgsynapse/sql/queries.sql",
                   "pgsynapse/data/demo_corpus.jsonl.gz", "pgsynapse/cli.py", "pgsynapse/learning/train.py",
                   "pgsynapse/sql/learning.sql", "pgsynapse/sql/answers.sql", "pgsynapse/handlers/answer.py",
                   "pgsynapse/images/decode.py", "pgsynapse/sql/images.sql", "pgsynapse/triggers/images_v1.sql",
                   "pgsynapse/handlers/embed_image.py"]:
        assert needed in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # -S: no site processing, so the editable install's import hook (a .pth file) cannot stand in for the wheel;
    # the dependencies come from site-packages on the path, pgsynapse only from the installed wheel
    import sysconfig

    env = {**os.environ, "PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}"}
    env.pop("DATABASE_URL", None)
    where = subprocess.run([sys.executable, "-S", "-c", "import pgsynapse.cli, pgsynapse.handlers, pgsynapse.learning.cli;"
                            " pgsynapse.handlers.registry(); import pgsynapse.listener.worker as w; print(w.__file__)"],
                           capture_output=True, text=True, cwd="/tmp", env=env)
    assert where.stdout.startswith(str(target)), where.stderr
    url = new_db()
    r = subprocess.run([sys.executable, "-S", "-m", "pgsynapse", "--database-url", url, "migrate"], capture_output=True,
                       text=True, cwd="/tmp", env=env, timeout=300)
    assert r.returncode == 0 and "applied: 0001_init.sql" in r.stdout, r.stderr

