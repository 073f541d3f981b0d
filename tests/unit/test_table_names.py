"""How a name of allowed_tables (a data question's tables, `sql-ask --tables`) is read: as written, or, in double
quotes, as SQL reads a quoted identifier."""

from __future__ import annotations

import pytest

from pgsynapse.textsql.names import table_name


@pytest.mark.parametrize(("name", "read"), [
    ("orders", ("shop", "orders")),
    ("Big Orders", ("shop", "Big Orders")),  # as written: case and spaces kept, as before
    ("Orders", ("shop", "Orders")),
    ("public.orders", ("public", "orders")),
    ('"Big Orders"', ("shop", "Big Orders")),  # was looked up with its quotes: "do not exist"
    ('"Shop Data"."Big Orders"', ("Shop Data", "Big Orders")),
    ('public."Big Orders"', ("public", "Big Orders")),
    ('"a.b"', ("shop", "a.b")),  # a dot in a quoted name is part of it (unquoted, it separates the schema)
    ('"say ""hi"""', ("shop", 'say "hi"')),  # a doubled quote is one, as in SQL
])
def test_a_name_is_read_as_written_or_as_sql_reads_a_quoted_one(name, read):
    assert table_name(name, "shop") == read


@pytest.mark.parametrize(("name", "why"), [
    ('"Big Orders', "has a double quote that is not closed"),
    ('Big"Orders', "has a double quote inside a name"),
    ('"Big"Orders', "has a double quote inside a name"),
    ("a.b.c", "has more than a schema and a table"),
    ('"".orders', "has an empty name"),
    ("shop.", "has an empty name"),
])
def test_a_name_that_is_not_one_says_why(name, why):
    with pytest.raises(ValueError, match=why):
        table_name(name, "shop")
