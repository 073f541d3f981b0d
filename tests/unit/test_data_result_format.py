"""What `pgsynapse sql-ask` prints for a data question that was not answered: the reason once, as stored."""

from __future__ import annotations

import unicodedata

from pgsynapse.client import DataResult
from pgsynapse.textsql.cli import format_data_result


def _result(status: str, error: str, sql: str | None = "DELETE FROM orders") -> DataResult:
    return DataResult(id=4, status=status, sql=sql, columns=[], rows=[], row_count=None, truncated=False,
                      error=error, sql_model_id=None, latency_ms=2187.0, session_id=None)


def test_a_refusal_says_refused_once():
    printed = format_data_result(_result("refused", "refused: the statement writes (DELETE)"))
    assert printed.splitlines() == [
        "SQL: DELETE FROM orders",
        "refused: the statement writes (DELETE)",
        "  refused in 2187 ms by the configured SQL model (data question 4)"]


def test_a_failure_names_its_status_before_its_error():
    printed = format_data_result(_result("failed", "InputError: no table of schema public may be read", sql=None))
    assert printed.splitlines()[:2] == ["SQL: (none)", "failed: InputError: no table of schema public may be read"]


def test_a_column_name_with_a_line_break_stays_on_the_header_line():
    # the name's line break split the header, and the rule and the rows no longer lined up under it
    r = DataResult(id=5, status="answered", sql='SELECT 1 AS "a\nb", 2 AS c',
                   columns=[{"name": "a\nb", "type": "integer"}, {"name": "c", "type": "integer"}], rows=[[1, 2]],
                   row_count=1, truncated=False, error=None, sql_model_id=None, latency_ms=3.0, session_id=None)
    table = format_data_result(r).split("b\", 2 AS c\n", 1)[1].splitlines()  # after the statement
    assert table[:3] == ["a b | c", "----+--", "1   | 2"]


def test_a_result_without_columns_says_so_instead_of_blank_lines():
    # SELECT FROM t: a header, a rule and three rows, all empty lines
    r = DataResult(id=6, status="answered", sql="SELECT FROM orders", columns=[], rows=[[], [], []], row_count=3,
                   truncated=False, error=None, sql_model_id=None, latency_ms=3.0, session_id=None)
    assert format_data_result(r).splitlines()[:3] == [
        "SQL: SELECT FROM orders", "(no columns: the statement selects none)", "(3 rows)"]


def _cut(row_count: int, truncated_by: dict | None) -> DataResult:
    return DataResult(id=7, status="answered", sql="SELECT id FROM orders", columns=[{"name": "id", "type": "integer"}],
                      rows=[[i] for i in range(row_count)], row_count=row_count, truncated=True, error=None,
                      sql_model_id=None, latency_ms=3.0, session_id=None, truncated_by=truncated_by)


def test_a_truncated_result_says_which_limit_cut_it_and_the_setting_to_raise():
    # said "(1000 rows (truncated by the row or byte limit))": which one, and what to change, was left to guess
    rows = format_data_result(_cut(3, {"setting": "sql_max_rows", "limit": 3})).splitlines()
    assert "(3 rows; more were cut at sql_max_rows = 3: raise it to keep more)" in rows
    size = format_data_result(_cut(2, {"setting": "sql_max_result_bytes", "limit": 1000000})).splitlines()
    assert ("(2 rows; more were cut at sql_max_result_bytes = 1,000,000 bytes of the result as JSON: raise it to "
            "keep more)") in size
    # a row stored before the limit was recorded
    assert "(2 rows; more were cut by sql_max_rows or sql_max_result_bytes)" in format_data_result(
        _cut(2, None)).splitlines()


def test_wide_characters_keep_the_columns_lined_up():
    # '東京' was padded as 2 characters where a terminal draws 4 columns: the bars after it stood 2 columns right
    # of those above and below (and a cut cell of wide characters was twice as wide as MAX_CELL)
    r = DataResult(id=8, status="answered", sql="SELECT city, n FROM t",
                   columns=[{"name": "city", "type": "text"}, {"name": "n", "type": "integer"}],
                   rows=[["東京", 1], ["Paris", 2], ["Ｖｅｒｙ" * 20, 3], ["e\u0301te\u0301", 4]], row_count=4,
                   truncated=False, error=None, sql_model_id=None, latency_ms=3.0, session_id=None)
    lines = format_data_result(r).splitlines()[1:7]
    # every bar in the same column, where a terminal draws it
    assert len({_columns(line.split("|")[0]) for line in lines if "|" in line}) == 1, lines
    header, rule, tokyo, paris, very, ete = lines
    assert rule.index("+") == _columns(header.split("|")[0]) and header.endswith(" | n")
    assert tokyo.startswith("東京 ") and paris.startswith("Paris ") and ete.startswith("e\u0301te\u0301 ")
    assert very.startswith("ＶｅｒｙＶｅｒｙ") and very.endswith("… | 3") and _columns(very.split(" | ")[0]) <= 40

def _columns(text: str) -> int:
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_a_null_and_the_text_null_print_apart():
    # SELECT NULL AS a, 'NULL' AS b printed "NULL | NULL": a missing value and a word looked the same
    r = DataResult(id=9, status="answered", sql="SELECT NULL AS a, 'NULL' AS b, '' AS c",
                   columns=[{"name": n, "type": "text"} for n in "abc"], rows=[[None, "NULL", ""]], row_count=1,
                   truncated=False, error=None, sql_model_id=None, latency_ms=3.0, session_id=None)
    header, rule, row = format_data_result(r).splitlines()[1:4]
    assert [c.strip() for c in row.split("|")] == ["(null)", "NULL", ""]


def test_a_statement_that_failed_says_failed_once():
    # printed "failed: the statement failed: division by zero (SQLSTATE 22012)"
    printed = format_data_result(_result("failed", "the statement failed: division by zero (SQLSTATE 22012)",
                                         sql="SELECT 1 / 0")).splitlines()
    assert printed[:2] == ["SQL: SELECT 1 / 0", "failed: division by zero (SQLSTATE 22012)"]
    # what the fix turns add reads after it, as stored
    fixed = format_data_result(_result(
        "failed", "the statement failed: division by zero (SQLSTATE 22012); 1 fix attempt (sql_fix_attempts) did not "
        "help, the last: the statement failed: column \"x\" does not exist (SQLSTATE 42703)", sql="SELECT x / 0"))
    assert fixed.splitlines()[1] == ("failed: division by zero (SQLSTATE 22012); 1 fix attempt (sql_fix_attempts) "
                                     "did not help, the last: the statement failed: column \"x\" does not exist "
                                     "(SQLSTATE 42703)")
