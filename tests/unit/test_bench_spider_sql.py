"""bench/spider_sql.py: Spider's gold SQLite SQL as PostgreSQL, and the literals the synthetic rows draw from."""

from bench.spider import Column, Database, Table
from bench.spider_sql import collect_literals, translate


def db() -> Database:
    singer = Table("singer", [Column("singer_id", "number", [1, 2], "bigint"), Column("name", "text", ["Joe"]),
                              Column("country", "text", ["France"]), Column("song_release_year", "text", ["1992"]),
                              Column("home town", "text", ["Oslo"])], pk="singer_id")
    concert = Table("concert", [Column("concert_id", "number", [1], "bigint"),
                                Column("singer_id", "number", [1], "bigint"), Column("year", "text", ["2014"])],
                    fks=[("singer_id", "singer", "singer_id")])
    return Database("concert_singer", {"singer": singer, "concert": concert})


def test_translate_strings_like_identifiers_and_text_numbers() -> None:
    d = db()
    assert translate(d, 'SELECT Name FROM singer WHERE Country = "France" AND name LIKE "%Jo%";') == \
        "SELECT name FROM singer WHERE country = 'France' AND name ILIKE '%Jo%'"
    # a number compared with a text column is quoted; a double-quoted column name stays an identifier
    assert translate(d, 'SELECT count(*) FROM concert WHERE YEAR = 2014') == \
        "SELECT count(*) FROM concert WHERE year = '2014'"
    assert translate(d, 'SELECT "Home Town" FROM singer') == 'SELECT "home town" FROM singer'


def test_translate_adds_bare_columns_to_group_by() -> None:
    got = translate(db(), "SELECT T2.name, count(*) FROM concert AS T1 JOIN singer AS T2 ON T1.singer_id = "
                          "T2.singer_id GROUP BY T1.singer_id ORDER BY count(*) DESC")
    assert "GROUP BY t1.singer_id, t2.name" in got


def test_literals_attach_to_their_columns() -> None:
    d = db()
    collect_literals(d, "SELECT name FROM singer AS T1 WHERE T1.country = 'Norway' AND song_release_year > 2000 "
                        "AND name LIKE '%ohn%' AND singer_id IN (3, 4)")
    cols = {c.name: c for c in d.tables["singer"].columns}
    assert cols["country"].hits == ["Norway"]
    assert cols["song_release_year"].bounds == [2000.0]
    assert "ohn" in cols["name"].hits
    assert cols["singer_id"].hits == [3, 4]
