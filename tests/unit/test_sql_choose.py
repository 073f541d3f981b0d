"""Self-consistency: the result most candidates agree on wins; the greedy one (first) breaks ties."""

from __future__ import annotations

from pgsynapse.handlers.sql_answer import Answer, Attempt, choose
from pgsynapse.textsql.execute import Result

COLS = [{"name": "n", "type": "bigint"}]


def _ran(sql: str, value: int) -> Attempt:
    return Attempt(sql, result=Result(COLS, [[value]], 1))


def test_the_majority_result_wins_and_the_earliest_of_it_is_kept():
    attempts = [_ran("greedy", 1), _ran("b", 2), Attempt("c", error="refused: writes", refused=True), _ran("d", 2)]
    assert choose(attempts).sql == "b"


def test_a_tie_goes_to_the_greedy_statement_and_nothing_run_gives_the_first_reason():
    assert choose([_ran("greedy", 1), _ran("b", 2)]).sql == "greedy"
    refused = [Attempt("x", error="refused: writes (DELETE)", refused=True), Attempt("y", error="timeout")]
    assert choose(refused).error == "refused: writes (DELETE)"
    assert choose([Attempt("x", error="timeout"), _ran("y", 3)]).sql == "y"  # a result beats a failure


def test_an_answer_after_fix_turns_says_what_was_tried():
    first = Attempt("select manager from orders", error="the statement failed: column \"manager\" does not exist")
    fixed = _ran("select manager from regions", 2)
    ans = Answer(fixed, 1, fixes=[fixed], first=first)
    assert ans.status == "answered" and ans.error is None
    assert ans.fix_metadata() == {"attempts": 1, "first_sql": first.sql, "first_error": first.error}
    still = Attempt("select boss from regions", error="the statement failed: column \"boss\" does not exist")
    ans = Answer(first, 1, fixes=[still], first=first)
    assert ans.status == "failed" and ans.error == (
        f"{first.error}; 1 fix attempt (sql_fix_attempts) did not help, the last: {still.error}")
    assert Answer(first, 1).error == first.error and Answer(first, 1).fix_metadata() is None
