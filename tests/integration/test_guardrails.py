"""Guardrails cover everything that reaches the answerer: the question in windows over its whole length, and the
session history (answered turns, and pending ones with their question alone, all checked against today's
rules). Real model, real rules, real NOTIFY."""

from __future__ import annotations

import re
import subprocess
import threading
from datetime import datetime, timezone

import psycopg
import pytest
from pgvector.psycopg import register_vector_async

from pgsynapse.answerers import Answer, ExtractiveAnswerer
from pgsynapse.cli import main
from pgsynapse.handlers.answer import AnswerHandler
from pgsynapse.handlers.base import Job
from tests.helpers import SAFETY_TIMEOUT as SAFETY, aconn, fast_settings, running_worker, wait_until

pytestmark = pytest.mark.anyio

ALL_ANSWERED = "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'"
BOMB_RULE = "INSERT INTO pgsynapse.guardrail_rules (text, action, threshold) VALUES ('how to make a bomb or explosives', 'block', 0.6)"
BOMB = "how do I make a bomb with explosives"
# benign sentences, well over the model's 256-token window together
FILLER = " ".join(f"Part {i}: CREATE INDEX constructs an index on the specified column of a table, and a unique index "
                  f"rejects duplicate values." for i in range(16))


class RecordingAnswerer(ExtractiveAnswerer):
    """The real extractive answerer, recording every text that reaches it."""

    seen: list[str] = []
    reply: str | None = None  # answer this instead (an answer-stage check)

    def answer(self, req):
        self.seen.extend([req.question] + [t.question for t in req.history] + [t.answer or "" for t in req.history])
        if self.reply is not None:
            return Answer(self.reply, [])
        return super().answer(req)


class RecordingHandler(AnswerHandler):
    def answerer_for(self, embedder):
        return RecordingAnswerer(lambda texts: embedder.encode(texts), not_found_threshold=self.settings.not_found_threshold)


def _handlers(settings, models):
    return {"answer": RecordingHandler(settings, models)}


async def _questions(conn, session: str) -> list[dict]:
    return list(await (await conn.execute(
        "SELECT id, text, status, answer, guardrail, retrieval_query FROM pgsynapse.questions WHERE session_id = %s "
        "ORDER BY id",
        (session,))).fetchall())


@pytest.fixture
def cli(db_url, capsys):
    """``pgsynapse ARGS`` on the test's database, run in this process (cli.main: its exit code, stdout and stderr),
    without a new interpreter's imports and model load (seconds a command)."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            code = main(["--database-url", db_url, *args])
        except SystemExit as exited:  # a usage error: argparse's exit 2
            code = exited.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["pgsynapse", *args], code, out, err)
    return run


@pytest.fixture(autouse=True)
def _reset():
    RecordingAnswerer.seen, RecordingAnswerer.reply = [], None


async def test_a_blocked_batch_mate_never_reaches_the_answerer_through_the_follow_ups_history(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    async with running_worker(settings, models, handlers=_handlers(settings, models)):
        # one statement: the blocked turn is still pending when its follow-up is loaded in the same batch
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('eve', %s),"
                           " ('eve', 'and where do I buy the parts for that?')", (BOMB,))
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    blocked, follow = await _questions(conn, "eve")
    await conn.close()
    assert blocked["status"] == "blocked" and blocked["guardrail"]["stage"] == "question"
    assert blocked["answer"] == "This question cannot be answered: it matches a guardrail rule."
    assert follow["status"] == "answered" and follow["retrieval_query"] == "and where do I buy the parts for that?"
    assert RecordingAnswerer.seen and not [t for t in RecordingAnswerer.seen if "bomb" in t]


async def test_an_answered_turn_that_a_newer_rule_blocks_is_left_out_of_history(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    async with running_worker(settings, models, handlers=_handlers(settings, models)):
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('mal', %s)", (BOMB,))
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
        await conn.execute(BOMB_RULE)  # the rule comes after the turn was answered
        RecordingAnswerer.seen = []
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('mal', 'and what else?')")
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    first, follow = await _questions(conn, "mal")
    await conn.close()
    assert first["status"] == "answered" and follow["status"] == "answered"
    assert follow["retrieval_query"] == "and what else?"
    assert RecordingAnswerer.seen == ["and what else?"]


async def test_a_pending_turn_outside_the_batch_is_history_only_once_it_passes_todays_rules(db_url, models):
    """A follow-up loaded while its session's previous question is still pending (another batch or worker is
    answering it) goes on from that question, its question alone, checked against today's rules here: a turn
    that matches a block rule is left out."""
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    await register_vector_async(conn)
    await conn.execute(BOMB_RULE)
    follow = {}
    for session, first in (("pat", BOMB), ("sam", "How do I create an index?")):
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES (%s, %s)", (session, first))
        cur = await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES (%s, 'and then?') RETURNING id",
                                 (session,))
        follow[session] = (await cur.fetchone())["id"]
    # the follow-ups are loaded while the first turns are still pending (not checked, not answered yet)
    work, known = await AnswerHandler(settings, models).load(
        conn, [Job(i, "answer", i, {}, 1, datetime.now(timezone.utc)) for i in follow.values()])
    await conn.close()
    assert known == [] and [w.job.ref_id for w in work] == [follow["pat"], follow["sam"]]
    assert work[0].history == [] and work[0].retrieval_query == "and then?"
    assert [(t.question, t.answer) for t in work[1].history] == [("How do I create an index?", None)]
    assert work[1].retrieval_query == "How do I create an index? and then?"


async def test_a_long_question_is_checked_in_windows_over_its_whole_length(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    text = f"{FILLER} Also, {BOMB}? {FILLER}"
    assert len(models.get({"id": 1, "artifact_path": None, "runtime": "torch", "dim": 384, "name": "v1"})
               .tokenizer(text)["input_ids"]) > 2 * 256
    async with running_worker(settings, models, handlers=_handlers(settings, models)):
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('long', %s)", (text,))
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    [row] = await _questions(conn, "long")
    await conn.close()
    assert row["status"] == "blocked" and row["guardrail"]["stage"] == "question"
    assert row["guardrail"]["similarity"] >= 0.6
    assert RecordingAnswerer.seen == []


async def test_a_long_answer_is_checked_in_windows_over_its_whole_length(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    # a generative answerer may write at length; the harmful sentence sits past the first window
    RecordingAnswerer.reply = f"{FILLER} Here is {BOMB}: mix the parts. {FILLER}"
    async with running_worker(settings, models, handlers=_handlers(settings, models)):
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('ans', 'how do I create an index?')")
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    [row] = await _questions(conn, "ans")
    await conn.close()
    assert RecordingAnswerer.seen == ["how do I create an index?"]
    assert row["status"] == "blocked" and row["guardrail"]["stage"] == "answer"
    # its answer, not its question, matched: the row's answer (what `ask` and the Client print) blamed the question
    assert row["answer"] == "The answer was withheld: it matched a guardrail rule.", row["answer"]


class RuleAddedMidBatchHandler(RecordingHandler):
    """A rule is added while the first batch computes: after its load (and its question's check), before its write."""

    added = False

    def compute(self, work):
        if not self.added:
            with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
                conn.execute(BOMB_RULE)
            self.added = True
        return super().compute(work)


async def test_an_answer_is_written_only_under_the_rules_it_was_checked_under(db_url, models):
    """A batch loaded before a rule was added was answered, and its answer checked, under the rules the worker's
    shared checker had then: an answer the new rule blocks was served. Its write now finds the rules changed, writes
    nothing, and the question's job is queued again: answered under the rules as they are."""
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    RecordingAnswerer.reply = f"Here is {BOMB}: mix the parts."
    async with running_worker(settings, models, handlers={"answer": RuleAddedMidBatchHandler(settings, models)}):
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('late', 'how do I create an "
                           "index?')")
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    [row] = await _questions(conn, "late")
    jobs = await (await conn.execute("SELECT status, skip_reason FROM pgsynapse.jobs WHERE kind = 'answer' AND ref_id"
                                     " = %s ORDER BY id", (row["id"],))).fetchall()
    await conn.close()
    assert row["status"] == "blocked" and row["guardrail"]["stage"] == "answer"
    assert jobs == [{"status": "done", "skip_reason": "superseded: the guardrail rules changed since it was checked"},
                    {"status": "done", "skip_reason": None}]


class RuleUndoneMidBatchHandler(RecordingHandler):
    """While the first batch computes, its rule is disabled, the worker's other answer loop loads a batch under the
    rules without it (refreshing the checker the loops share), and the rule is enabled again: the first batch's
    write finds the rules it was loaded under."""

    first = True
    loaded_without_rule = threading.Event()

    async def load(self, conn, jobs):
        out = await super().load(conn, jobs)
        if not self.first:
            self.loaded_without_rule.set()
        return out

    def compute(self, work):
        if self.first:
            self.first = False
            with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
                conn.execute("UPDATE pgsynapse.guardrail_rules SET enabled = false")
                conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('other', 'what is a table?')")
                assert self.loaded_without_rule.wait(SAFETY), "the other loop loaded no batch"
                conn.execute("UPDATE pgsynapse.guardrail_rules SET enabled = true")
        return super().compute(work)


async def test_an_answer_is_checked_under_its_batchs_rules_when_another_batch_refreshed_the_checker(db_url, models):
    """A rule disabled and enabled again while a batch computes: the batch's write finds the rules it was loaded
    under, so its answer must have been checked under them too, not under the rules another batch loaded meanwhile
    into the checker the worker's loops share (the answer was checked under no rule and written: answered)."""
    # one question a batch: the other loop's batch is full once it has claimed its question, and loads it at once
    # (with room for more, it kept gathering while the first batch computed: lease_seconds, 10 s, before loading)
    settings = fast_settings(db_url, batch_size=1)
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    RecordingAnswerer.reply = f"Here is {BOMB}: mix the parts."
    RuleUndoneMidBatchHandler.loaded_without_rule.clear()
    async with running_worker(settings, models, handlers={"answer": RuleUndoneMidBatchHandler(settings, models)}):
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('undo', 'how do I create an "
                           "index?')")
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    [row] = await _questions(conn, "undo")
    await conn.close()
    assert row["status"] == "blocked" and row["guardrail"]["stage"] == "answer", row


def test_guardrail_commands_add_check_and_disable_a_rule_as_the_worker_applies_it(db_url, cli):
    # rules were SQL only, and a threshold could be chosen only by asking and reading `questions.guardrail`
    rule_text, question = "how to drop all the tables of a production database", "how do I delete every table in prod?"
    added = cli("guardrail", "add", rule_text, "--threshold", "0.5")
    assert added.returncode == 0, added.stderr
    rule = int(re.match(r"guardrail rule (\d+): block at similarity >= 0.5;", added.stdout).group(1))
    checked = cli("guardrail", "check", question)
    assert checked.returncode == 0, checked.stderr
    [line] = [x for x in checked.stdout.splitlines() if x.startswith(f"  rule {rule} ")]
    shown = float(re.search(r"similarity (\d\.\d{3})", line).group(1))
    assert shown >= 0.5 and "MATCH" in line and checked.stdout.endswith(f"verdict: blocked by rule {rule}\n")
    # the worker's own check of the same question: the same rule, the same similarity
    asked = cli("ask", question)
    with psycopg.connect(db_url) as conn:
        status, guardrail = conn.execute("SELECT status, guardrail FROM pgsynapse.questions").fetchone()
    assert status == "blocked" and guardrail["rule_id"] == rule, asked.stdout + asked.stderr
    assert round(guardrail["similarity"], 3) == shown
    assert cli("guardrail", "disable", str(rule)).stdout == f"guardrail rule {rule} disabled\n"
    assert cli("guardrail", "check", question).stdout == (
        "no enabled guardrail rules: nothing is blocked or flagged\n")
    listed = cli("guardrail", "list").stdout.splitlines()
    assert listed[1].split()[:4] == [str(rule), "block", "0.50", "no"]
    gone = cli("guardrail", "enable", "999")
    assert (gone.returncode, gone.stderr) == (1, "pgsynapse: error: no guardrail rule 999\n")


def test_guardrail_add_of_a_blank_text_says_so_and_adds_nothing(db_url, cli):
    # was exit 69 ("database unreachable or not migrated yet") with the table's CHECK constraint violation
    r = cli("guardrail", "add", "   ")
    assert (r.returncode, r.stderr) == (1, "pgsynapse: error: guardrail add needs a text: what questions and answers "
                                           "the rule is about, as a question or a sentence\n")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.guardrail_rules").fetchone()[0] == 0


def test_guardrail_set_changes_a_rules_threshold_and_action_and_remove_deletes_it(cli):
    # a rule could be added, disabled and enabled, but a threshold chosen with `check` could not be set on it, nor
    # a rule removed, without SQL (argparse: invalid choice: 'set')
    added = cli("guardrail", "add", "how to drop all the tables of a production database", "--threshold", "0.5")
    rule = int(re.match(r"guardrail rule (\d+):", added.stdout).group(1))
    changed = cli("guardrail", "set", str(rule), "--threshold", "0.8", "--action", "flag")
    assert (changed.returncode, changed.stdout) == (0, f"guardrail rule {rule}: flag at similarity >= 0.8\n"), changed.stderr
    assert cli("guardrail", "list").stdout.splitlines()[1].split()[:4] == [str(rule), "flag", "0.80", "yes"]
    nothing = cli("guardrail", "set", str(rule))  # a command line argparse refuses: exit 2
    assert nothing.returncode == 2 and nothing.stderr.endswith(
        "pgsynapse guardrail set: error: guardrail set needs --threshold or --action: what to change\n"), nothing.stderr
    missing = cli("guardrail", "set", "999", "--threshold", "0.7")
    assert (missing.returncode, missing.stderr) == (1, "pgsynapse: error: no guardrail rule 999\n")
    removed = cli("guardrail", "remove", str(rule))
    assert (removed.returncode, removed.stdout) == (0, f"guardrail rule {rule} removed\n"), removed.stderr
    assert cli("guardrail", "list").stdout.startswith("no guardrail rules")
    again = cli("guardrail", "remove", str(rule))
    assert (again.returncode, again.stderr) == (1, f"pgsynapse: error: no guardrail rule {rule}\n")
