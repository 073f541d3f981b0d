"""The safety check of generated SQL: a statement runs only when PostgreSQL's own grammar (pglast) shows it is one
plain SELECT over allowed tables that calls only allow-listed functions.

The check walks the whole raw parse tree (subqueries, CTEs, LATERAL, set operations, every expression of every
clause) and refuses by default: a node type, a function, an operator schema or a table it does not know is refused.
What it allows, and why:

- statements: exactly one SELECT (``WITH``, ``UNION``/``INTERSECT``/``EXCEPT``, ``VALUES``, ``TABLE t``), without
  ``INTO`` or a locking clause (``FOR UPDATE``/``SHARE``...), nowhere a data-modifying CTE;
- tables: only ``allowed`` (schema, table) pairs. An unqualified name is a CTE when one of that name is in scope
  (non-recursive ``WITH``: the earlier CTEs of the list; ``WITH RECURSIVE``: all of them), else the first schema
  of ``search_path`` where it is allowed. System schemas (pg_catalog, information_schema, pg_toast, pg_temp...) and
  pgsynapse are refused even when listed;
- functions: :data:`ALLOWED_FUNCTIONS`, plain and side-effect free ones an analytics query needs; everything else
  (``pg_*``, ``dblink*``, ``lo_*``, file access, settings, sequences, advisory locks, ``query_to_xml``, sleeps, and
  harmless but useless ones such as ``version()`` or ``current_user``) is refused. XML is refused as a whole;
- types: casts to ``reg*`` types and ``aclitem`` are refused (their input functions look names up in the catalog);
- attribute notation (``t.f``, ``(expr).f``) is ``f(t)`` when ``f`` is no column: the one-argument functions of
  pg_catalog that are not allowed are refused there by name (``pg_*``, ``nextval``, ``current_setting``...); those
  of the schemas of the question (its ``search_path``), which the parser cannot know, are refused when the
  statement runs: :func:`pgsynapse.textsql.execute.run_readonly` looks its attribute names up in the catalog, and
  its allowed functions called unqualified (``lower(o)`` calls a ``lower(orders)`` of the schema, an exact match,
  rather than pg_catalog's ``lower(text)``: one the schema defines, not an extension's, is refused);
- system columns (``ctid``, ``xmin``, ``xmax``, ``cmin``, ``cmax``, ``tableoid``) are refused, as ``t.ctid`` and as
  ``(t).ctid``: no question about the data needs them, and they show storage and transaction ids. PostgreSQL
  forbids user columns of these names, so only an output alias of such a name can be refused wrongly.

:attr:`CheckedSQL.sql` is the original text, not pglast's reprint (comments and layout stay as the model wrote
them), cut to the one statement (no ``;``, no comment before or after it) and with every table reference
schema-qualified in place (``FROM orders`` becomes ``FROM "public".orders``): the table run is then the table
checked whatever the session's ``search_path`` and temporary tables are. The result is parsed and checked again.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import pglast.ast as ast
from pglast.enums import SQLValueFunctionOp
from pglast.parser import ParseError, parse_sql, scan

from pgsynapse.errors import InputError
from pgsynapse.wording import listed

MAX_SQL_CHARS = 20_000

# -- the function allow-list: plain functions with no side effect that read nothing but their arguments --------
_AGGREGATES = """count sum avg min max array_agg string_agg json_agg jsonb_agg json_agg_strict jsonb_agg_strict
    json_object_agg jsonb_object_agg json_object_agg_strict jsonb_object_agg_strict json_object_agg_unique
    jsonb_object_agg_unique json_object_agg_unique_strict jsonb_object_agg_unique_strict bool_and bool_or every
    bit_and bit_or bit_xor stddev stddev_pop stddev_samp variance var_pop var_samp corr covar_pop covar_samp
    regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy percentile_cont
    percentile_disc mode any_value range_agg range_intersect_agg"""
_WINDOW = """row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value"""
_MATH = """abs cbrt ceil ceiling degrees div exp factorial floor gcd lcm ln log log10 min_scale mod pi power pow
    radians round scale sign sqrt trim_scale trunc width_bucket random random_normal acos acosd asin asind atan
    atand atan2 atan2d cos cosd cot cotd sin sind tan tand sinh cosh tanh asinh acosh atanh erf erfc gamma lgamma"""
_STRING = """ascii bit_length btrim char_length character_length chr concat concat_ws format initcap left length
    lower lpad ltrim md5 normalize is_normalized octet_length overlay position quote_ident quote_literal
    quote_nullable regexp_count regexp_instr regexp_like regexp_match regexp_matches regexp_replace
    regexp_split_to_array regexp_split_to_table regexp_substr repeat replace reverse right rpad rtrim split_part
    starts_with string_to_array string_to_table strpos substr substring translate upper unistr casefold to_hex
    to_bin to_oct encode decode sha224 sha256 sha384 sha512 crc32 crc32c convert_from convert_to bit_count
    get_bit get_byte like_escape similar_to_escape gen_random_uuid uuidv4 uuidv7 uuid_extract_timestamp
    uuid_extract_version"""
_DATETIME = """age clock_timestamp date_add date_bin date_part date_subtract date_trunc extract isfinite
    justify_days justify_hours justify_interval make_date make_interval make_time make_timestamp make_timestamptz
    now statement_timestamp timeofday transaction_timestamp timezone overlaps to_char to_date to_number
    to_timestamp"""
_ARRAY = """array_append array_cat array_dims array_fill array_length array_lower array_ndims array_position
    array_positions array_prepend array_remove array_replace array_reverse array_sample array_shuffle array_sort
    array_to_string array_upper cardinality trim_array unnest generate_subscripts generate_series"""
_JSON = """to_json to_jsonb array_to_json row_to_json json_build_array jsonb_build_array json_build_object
    jsonb_build_object json_object jsonb_object json_array_length jsonb_array_length json_each jsonb_each
    json_each_text jsonb_each_text json_extract_path jsonb_extract_path json_extract_path_text
    jsonb_extract_path_text json_object_keys jsonb_object_keys json_populate_record jsonb_populate_record
    jsonb_populate_record_valid json_populate_recordset jsonb_populate_recordset json_to_record jsonb_to_record
    json_to_recordset jsonb_to_recordset json_array_elements jsonb_array_elements json_array_elements_text
    jsonb_array_elements_text json_typeof jsonb_typeof json_strip_nulls jsonb_strip_nulls jsonb_set jsonb_set_lax
    jsonb_insert jsonb_pretty jsonb_path_exists jsonb_path_match jsonb_path_query jsonb_path_query_array
    jsonb_path_query_first jsonb_path_exists_tz jsonb_path_match_tz jsonb_path_query_tz
    jsonb_path_query_array_tz jsonb_path_query_first_tz"""
_RANGE_NET_TEXTSEARCH = """int4range int8range numrange tsrange tstzrange daterange int4multirange int8multirange
    nummultirange tsmultirange tstzmultirange datemultirange isempty lower_inc upper_inc lower_inf upper_inf
    range_merge multirange abbrev broadcast family host hostmask inet_merge inet_same_family masklen netmask network
    set_masklen to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank ts_rank_cd
    ts_headline setweight strip numnode querytree tsvector_to_array array_to_tsvector ts_delete ts_filter"""
_MISC = """num_nulls num_nonnulls bool int2 int4 int8 float4 float8 numeric text varchar bpchar date time timetz
    timestamp timestamptz interval"""  # function-style casts: date(created_at) is common
ALLOWED_FUNCTIONS: frozenset[str] = frozenset(" ".join(
    (_AGGREGATES, _WINDOW, _MATH, _STRING, _DATETIME, _ARRAY, _JSON, _RANGE_NET_TEXTSEARCH, _MISC)).split())

TABLESAMPLE_METHODS = frozenset({"system", "bernoulli", "system_rows", "system_time"})

# functions of other databases that small models write for PostgreSQL's: a refusal names the database and what
# PostgreSQL writes instead, so it reads as "not PostgreSQL" rather than "forbidden" (none of them is allowed)
OTHER_DIALECTS: dict[str, tuple[str, str]] = {
    **{unit: ("MySQL", f"EXTRACT({unit.upper()} FROM x)") for unit in ("year", "month", "day", "hour", "minute")},
    "dayofmonth": ("MySQL", "EXTRACT(DAY FROM x)"), "dayofweek": ("MySQL", "EXTRACT(DOW FROM x) + 1"),
    "ifnull": ("MySQL", "coalesce(x, y)"), "nvl": ("Oracle", "coalesce(x, y)"),
    "isnull": ("SQL Server", "coalesce(x, y)"),
    "group_concat": ("MySQL", "string_agg(x, ',')"), "curdate": ("MySQL", "current_date"),
    "curtime": ("MySQL", "current_time"), "getdate": ("SQL Server", "now()"), "sysdate": ("Oracle", "now()"),
    "datediff": ("MySQL", "a - b (dates) or EXTRACT(EPOCH FROM a - b) (timestamps)"),
    "date_format": ("MySQL", "to_char(x, 'YYYY-MM-DD')"), "str_to_date": ("MySQL", "to_date(x, 'YYYY-MM-DD')"),
    "date_sub": ("MySQL", "x - interval '1 day'"),
    "strftime": ("SQLite", "to_char(x, 'YYYY')"), "julianday": ("SQLite", "EXTRACT(JULIAN FROM x)"),
    "instr": ("MySQL", "strpos(s, t)"), "charindex": ("SQL Server", "strpos(s, t)"),
    "ucase": ("MySQL", "upper(x)"), "lcase": ("MySQL", "lower(x)"), "len": ("SQL Server", "length(x)"),
    "rand": ("MySQL", "random()"), "iif": ("SQL Server", "CASE WHEN c THEN a ELSE b END"),
}

REFUSED_TYPES = frozenset({"regclass", "regcollation", "regconfig", "regdictionary", "regnamespace", "regoper",
                           "regoperator", "regproc", "regprocedure", "regrole", "regtype", "aclitem"})
SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})
# Attribute notation calls a function: ``t.f`` and ``(expr).f`` are ``f(t)`` and ``f(expr)`` when ``f`` is no column
# of ``t`` (a scalar ``FROM generate_series(...) g`` makes ``g.pg_sleep`` a call). A column name cannot be refused
# by default, so the functions of pg_catalog that such a one-argument call could reach and that are not allowed
# are refused by name (the reader role stays the boundary for functions the operator creates).
_ATTRIBUTE_REFUSED_PREFIXES = ("pg_", "dblink", "txid_", "to_reg", "binary_upgrade", "lo_")
_ATTRIBUTE_REFUSED = REFUSED_TYPES | frozenset('''current_setting current_schemas currval nextval setseed
    obj_description amvalidate brin_summarize_new_values gin_clean_pending_list row_security_active
    satisfies_hash_partition ts_stat ts_debug ts_token_type'''.split())  # those taking one argument
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema", "pgsynapse"})  # and every pg_* schema
_ALLOWED_SQL_VALUES = frozenset({  # CURRENT_DATE & co; CURRENT_USER, CURRENT_SCHEMA... are refused
    SQLValueFunctionOp.SVFOP_CURRENT_DATE, SQLValueFunctionOp.SVFOP_CURRENT_TIME,
    SQLValueFunctionOp.SVFOP_CURRENT_TIME_N, SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP,
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N, SQLValueFunctionOp.SVFOP_LOCALTIME,
    SQLValueFunctionOp.SVFOP_LOCALTIME_N, SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP,
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N})

# raw parse nodes a checked SELECT may hold (SelectStmt, WithClause and CommonTableExpr are walked by hand)
_PLAIN_NODES = frozenset(getattr(ast, n) for n in """ResTarget Alias RangeVar RangeSubselect RangeFunction
    RangeTableSample JoinExpr SortBy WindowDef GroupingSet GroupingFunc ColumnDef CollateClause TypeName TypeCast
    A_Const Integer Float Boolean String BitString A_Expr BoolExpr NullTest BooleanTest ColumnRef A_Star A_Indices
    A_Indirection A_ArrayExpr FuncCall NamedArgExpr SubLink CaseExpr CaseWhen CoalesceExpr MinMaxExpr RowExpr
    SQLValueFunction CTESearchClause CTECycleClause JsonObjectConstructor JsonArrayConstructor
    JsonArrayQueryConstructor JsonObjectAgg JsonArrayAgg JsonAggConstructor JsonKeyValue JsonValueExpr JsonFormat
    JsonOutput JsonReturning JsonIsPredicate JsonParseExpr JsonScalarExpr JsonSerializeExpr JsonFuncExpr
    JsonArgument JsonBehavior JsonTable JsonTableColumn JsonTablePathSpec""".split())
_XML_NODES = (ast.XmlExpr, ast.XmlSerialize, ast.RangeTableFunc, ast.RangeTableFuncCol)
_WRITES = {"InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE", "MergeStmt": "MERGE",
           "TruncateStmt": "TRUNCATE"}
_DDL_WORDS = ("CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE", "REINDEX", "CLUSTER", "REFRESH",
              "SECURITY", "IMPORT", "REASSIGN")
_SIMPLE_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")


class UnsafeSQL(InputError):
    """A statement the safety check refuses; it is never run. ``reason`` is a short code (``empty``,
    ``too_long``, ``syntax``, ``many_statements``, ``not_select``, ``write``, ``ddl``, ``select_into``,
    ``locking``, ``table``, ``schema``, ``function``, ``type``, ``system_column``, ``parameter``, ``unsupported``);
    the message, for the row's error, starts with ``refused:`` and names what was refused."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses process boundaries (a gate in a training process) with its reason
        return type(self), (self.reason, str(self))


@dataclass(frozen=True)
class CheckedSQL:
    sql: str  # the statement as it will be run: one statement, no trailing ';', table names schema-qualified
    tables: frozenset[tuple[str, str]]  # the (schema, table) pairs it reads
    # its attribute notation, (f, as written) of each ``t.f`` and ``(expr).f``: a call of ``f`` when ``f`` is no
    # column, so the run refuses a statement whose f is a function of a schema of its search_path
    # (execute.run_readonly)
    attributes: frozenset[tuple[str, str]] = frozenset()
    # the allowed functions it calls unqualified: the run refuses one the search path's schema defines too
    functions: frozenset[str] = frozenset()


def check_sql(sql: str, *, allowed: Collection[tuple[str, str]], search_path: Sequence[str] = ("public",),
              max_chars: int = MAX_SQL_CHARS) -> CheckedSQL:
    """Check one generated statement; raise :class:`UnsafeSQL` unless it is a plain SELECT over ``allowed``
    (``(schema, table)`` pairs, names as in the catalog: ``("public", "Orders")`` for a table created as
    ``"Orders"``); unqualified names resolve through ``search_path``."""
    allowed = frozenset((str(s), str(t)) for s, t in allowed)
    if len(sql) > max_chars:
        raise UnsafeSQL("too_long", f"refused: the statement is {len(sql):,} characters long (at most {max_chars:,})")
    if "\x00" in sql:
        raise UnsafeSQL("syntax", "refused: the statement contains a NUL character")
    raw = _parse_one(sql)
    checker = _Checker(allowed, tuple(search_path))
    checker.check(raw.stmt)
    start, end = _statement_span(sql, raw)
    text = _qualify(sql, start, end, checker.unqualified)
    # the text that runs is parsed and checked again: every table qualified, the same tables
    again = _Checker(allowed, tuple(search_path))
    again.check(_parse_one(text).stmt)
    if again.unqualified or again.tables != checker.tables:
        raise UnsafeSQL("unsupported", "refused: the table names could not be qualified safely")
    return CheckedSQL(sql=text, tables=frozenset(checker.tables), attributes=frozenset(checker.attributes),
                      functions=frozenset(checker.functions))


def _parse_one(sql: str) -> ast.RawStmt:
    try:
        stmts = parse_sql(sql)
    except ParseError as e:
        at = f" (at character {e.args[1] + 1})" if len(e.args) > 1 and e.args[1] is not None else ""
        raise UnsafeSQL("syntax", f"refused: the statement does not parse: {e.args[0]}{at}") from None
    except RecursionError:
        raise UnsafeSQL("syntax", "refused: the statement is nested too deeply") from None
    if not stmts:
        raise UnsafeSQL("empty", "refused: there is no statement")
    if len(stmts) > 1:
        raise UnsafeSQL("many_statements", f"refused: {len(stmts)} statements; exactly one SELECT may run")
    return stmts[0]


def _statement_span(sql: str, raw: ast.RawStmt) -> tuple[int, int]:
    """[start, end) of the statement in ``sql``, without the comments and blanks around it and without ';'."""
    lo = raw.stmt_location
    hi = lo + raw.stmt_len if raw.stmt_len else len(sql)
    tokens = [t for t in scan(sql) if lo <= t.start < hi and t.name not in ("SQL_COMMENT", "C_COMMENT")]
    return tokens[0].start, tokens[-1].end + 1


def _qualify(sql: str, start: int, end: int, refs: list[tuple[int, str]]) -> str:
    """sql[start:end] with '"schema".' inserted at each (location, schema). Quoted always: ``FROM"orders"`` is
    valid SQL, and an unquoted insertion would glue to the keyword before it."""
    parts, at = [], start
    for location, schema in sorted(refs):
        if not start <= location < end:
            raise UnsafeSQL("unsupported", "refused: the table names could not be qualified safely")
        parts += [sql[at:location], '"' + schema.replace('"', '""') + '".']
        at = location
    parts.append(sql[at:end])
    return "".join(parts)


def _ident(name: str) -> str:
    return name if _SIMPLE_IDENT.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def _dotted(names: Sequence[str]) -> str:
    return ".".join(_ident(n) for n in names)


def qualified_name(schema: str, name: str) -> str:
    """``schema.name`` as a refusal writes it (quoted only where SQL needs it)."""
    return _dotted([schema, name])


def _names(nodes) -> list[str]:
    return [n.sval for n in nodes or () if isinstance(n, ast.String)]


def _statement_kind(node: ast.Node) -> tuple[str, str]:
    """(reason, command tag) of a statement that is not a SELECT."""
    cls = type(node).__name__
    if cls in _WRITES:
        return "write", _WRITES[cls]
    if isinstance(node, ast.CopyStmt):
        return ("write" if node.is_from else "not_select"), ("COPY FROM" if node.is_from else "COPY")
    if isinstance(node, ast.ExplainStmt):
        analyze = any(getattr(o, "defname", None) == "analyze" for o in node.options or ())
        return "not_select", "EXPLAIN ANALYZE" if analyze else "EXPLAIN"
    if isinstance(node, ast.TransactionStmt):
        return "not_select", node.kind.name.removeprefix("TRANS_STMT_").replace("_", " ")
    if isinstance(node, ast.VariableSetStmt):
        return "not_select", "RESET" if node.kind.name.startswith("VAR_RESET") else "SET"
    if isinstance(node, ast.DropStmt):
        return "ddl", "DROP " + node.removeType.name.removeprefix("OBJECT_").replace("_", " ")
    if isinstance(node, ast.GrantStmt):
        return "ddl", "GRANT" if node.is_grant else "REVOKE"
    if isinstance(node, ast.VacuumStmt):
        return "not_select", "VACUUM" if node.is_vacuumcmd else "ANALYZE"
    special = {"IndexStmt": "CREATE INDEX", "ViewStmt": "CREATE VIEW", "RuleStmt": "CREATE RULE",
               "DefineStmt": "CREATE", "CompositeTypeStmt": "CREATE TYPE", "VariableShowStmt": "SHOW",
               "SecLabelStmt": "SECURITY LABEL", "CheckPointStmt": "CHECKPOINT",
               "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW"}
    tag = special.get(cls) or " ".join(re.findall(r"[A-Z][a-z]*", cls.removesuffix("Stmt"))).upper()
    return ("ddl" if tag.startswith(_DDL_WORDS) else "not_select"), tag


def _refuse_statement(node: ast.Node, where: str = "") -> UnsafeSQL:
    reason, tag = _statement_kind(node)
    if reason == "write":
        return UnsafeSQL("write", f"refused: the statement writes ({tag}{where})")
    if reason == "ddl":
        return UnsafeSQL("ddl", f"refused: the statement changes the database's definitions ({tag}{where})")
    return UnsafeSQL("not_select", f"refused: only a SELECT may run, not {tag}{where}")


def _attribute(name: str, written: str) -> None:
    if name not in ALLOWED_FUNCTIONS and (name in _ATTRIBUTE_REFUSED or name.startswith(_ATTRIBUTE_REFUSED_PREFIXES)):
        raise UnsafeSQL("function", f"refused: {written} would call function {name}, which is not allowed")


def is_system_schema(schema: str) -> bool:
    return schema in SYSTEM_SCHEMAS or schema.startswith("pg_")


class _Checker:
    """One walk of a parse tree. Iterative, with an explicit stack: a generated expression may nest deeper than
    Python's recursion limit. Each stack entry carries the CTE names in scope there."""

    def __init__(self, allowed: frozenset[tuple[str, str]], search_path: tuple[str, ...]) -> None:
        self.allowed = allowed
        self.search_path = search_path
        self.allowed_schemas = {s for s, _ in allowed}
        self.type_schemas = {"pg_catalog", *search_path, *self.allowed_schemas}
        self.tables: set[tuple[str, str]] = set()
        self.unqualified: list[tuple[int, str]] = []  # (location, schema) of table names to qualify
        self.attributes: set[tuple[str, str]] = set()  # (f, as written) of each t.f and (expr).f
        self.functions: set[str] = set()  # the allowed functions called unqualified

    def check(self, stmt: ast.Node) -> None:
        if not isinstance(stmt, ast.SelectStmt):
            raise _refuse_statement(stmt)
        stack: list[tuple[object, frozenset[str]]] = [(stmt, frozenset())]
        while stack:
            node, scope = stack.pop()
            if isinstance(node, tuple | list):
                stack.extend((item, scope) for item in node if item is not None)
            elif isinstance(node, ast.SelectStmt):
                stack.extend(self._select(node, scope))
            elif isinstance(node, ast.Node):
                self._node(node, scope)
                stack.extend((child, scope) for child in _children(node))

    def _select(self, node: ast.SelectStmt, scope: frozenset[str]) -> Iterator[tuple[object, frozenset[str]]]:
        if node.intoClause is not None:
            raise UnsafeSQL("select_into", "refused: SELECT INTO creates a table")
        if node.lockingClause:
            strength = node.lockingClause[0].strength.name.removeprefix("LCS_FOR").replace("KEY", " KEY ")
            raise UnsafeSQL("locking", f"refused: FOR {' '.join(strength.split())} locks rows")
        inner = scope
        if node.withClause is not None:
            ctes = node.withClause.ctes or ()
            names = [c.ctename for c in ctes]
            for i, cte in enumerate(ctes):
                if not isinstance(cte.ctequery, ast.SelectStmt):
                    raise _refuse_statement(cte.ctequery, f" in WITH {_ident(cte.ctename)}")
                visible = names if node.withClause.recursive else names[:i]
                yield cte.ctequery, scope | frozenset(visible)
                yield (cte.search_clause, cte.cycle_clause), scope
            inner = scope | frozenset(names)
        for name in type(node).__slots__:
            if name not in ("withClause", "intoClause", "lockingClause"):
                value = getattr(node, name)
                if isinstance(value, ast.Node | tuple | list):
                    yield value, inner

    def _node(self, node: ast.Node, scope: frozenset[str]) -> None:
        if isinstance(node, _XML_NODES):
            raise UnsafeSQL("function", "refused: XML functions are not allowed")
        if isinstance(node, ast.ParamRef):
            raise UnsafeSQL("parameter", f"refused: the statement has a parameter (${node.number}) and none is given")
        if type(node).__name__.endswith("Stmt"):
            raise _refuse_statement(node)
        if type(node) not in _PLAIN_NODES:
            raise UnsafeSQL("unsupported", f"refused: {type(node).__name__} is not allowed in a checked SELECT")
        if isinstance(node, ast.RangeVar):
            self._table(node, scope)
        elif isinstance(node, ast.FuncCall):
            names = _names(node.funcname)
            self._function(names)
            if len(names) == 1:
                self.functions.add(names[0])
        elif isinstance(node, ast.RangeTableSample):
            method = _names(node.method)
            if method[-1] not in TABLESAMPLE_METHODS or len(method) > 2 or method[:-1] not in ([], ["pg_catalog"]):
                raise UnsafeSQL("function", f"refused: TABLESAMPLE method {_dotted(method)} is not allowed")
        elif isinstance(node, ast.A_Expr):
            self._operator(_names(node.name))
        elif isinstance(node, ast.SortBy):
            self._operator(_names(node.useOp))
        elif isinstance(node, ast.SubLink):
            self._operator(_names(node.operName))
        elif isinstance(node, ast.TypeName):
            self._type(node)
        elif isinstance(node, ast.ColumnRef):
            fields = _names(node.fields)
            if fields and len(fields) == len(node.fields):  # not t.*
                if fields[-1] in SYSTEM_COLUMNS:
                    raise UnsafeSQL("system_column", f"refused: system column {fields[-1]} is not allowed")
                if len(fields) > 1:
                    _attribute(fields[-1], _dotted(fields))
                    self.attributes.add((fields[-1], _dotted(fields)))
        elif isinstance(node, ast.A_Indirection):
            for name in _names(node.indirection):
                if name in SYSTEM_COLUMNS:  # (t).ctid reads the row's system column, as t.ctid does
                    raise UnsafeSQL("system_column", f"refused: system column {name} is not allowed")
                _attribute(name, f"(...).{_ident(name)}")
                self.attributes.add((name, f"(...).{_ident(name)}"))
        elif isinstance(node, ast.SQLValueFunction) and node.op not in _ALLOWED_SQL_VALUES:
            name = node.op.name.removeprefix("SVFOP_")
            raise UnsafeSQL("function", f"refused: {name} is not allowed")

    def _table(self, node: ast.RangeVar, scope: frozenset[str]) -> None:
        rel, schema = node.relname, node.schemaname
        if node.catalogname:
            raise UnsafeSQL("table", f"refused: {_dotted([node.catalogname, schema, rel])} names another database")
        if schema is None and rel in scope:
            return  # a CTE
        if schema is None:
            schema = next((s for s in self.search_path if (s, rel) in self.allowed), None)
            if schema is None and rel.startswith("pg_"):  # unqualified pg_* names resolve to pg_catalog first
                raise UnsafeSQL("schema", f"refused: table {_ident(rel)} is not allowed (system catalog)")
            if schema is None:
                raise UnsafeSQL("table", f"refused: table {_ident(rel)} is not allowed ({self._allowed_text()})")
            if not is_system_schema(schema):
                self.unqualified.append((node.location, schema))
        if is_system_schema(schema):
            raise UnsafeSQL("schema", f"refused: table {_dotted([schema, rel])} is not allowed (system schema)")
        if (schema, rel) not in self.allowed:
            reason = "table" if schema in self.allowed_schemas else "schema"
            raise UnsafeSQL(reason, f"refused: table {_dotted([schema, rel])} is not allowed "
                                    f"({self._allowed_text()})")
        self.tables.add((schema, rel))

    def _allowed_text(self) -> str:
        if not self.allowed:
            return "no table is allowed"
        return "allowed: " + listed(sorted(_dotted(t) for t in self.allowed), 8)

    @staticmethod
    def _function(names: list[str]) -> None:
        if len(names) == 2 and names[0] == "pg_catalog":
            name = names[1]
        elif len(names) == 1:
            name = names[0]
        else:
            name = None
        if name not in ALLOWED_FUNCTIONS:
            other = OTHER_DIALECTS.get(name or "")
            hint = f": {name}() is not PostgreSQL's ({other[0]}); PostgreSQL writes {other[1]}" if other else ""
            raise UnsafeSQL("function", f"refused: function {_dotted(names)} is not allowed{hint}")

    @staticmethod
    def _operator(names: list[str]) -> None:
        if len(names) > 1 and names[:-1] != ["pg_catalog"]:
            raise UnsafeSQL("function", f"refused: operator {'.'.join(names)} is not allowed")

    def _type(self, node: ast.TypeName) -> None:
        names = _names(node.names)
        if node.pct_type or not names:
            raise UnsafeSQL("type", f"refused: type {_dotted(names)}%TYPE is not allowed")
        if names[-1] in REFUSED_TYPES:
            raise UnsafeSQL("type", f"refused: type {names[-1]} is not allowed (it reads the system catalog)")
        if len(names) > 2 or (len(names) == 2 and names[0] not in self.type_schemas):
            raise UnsafeSQL("schema", f"refused: type {_dotted(names)} is not allowed (another schema)")


def _children(node: ast.Node) -> Iterator[object]:
    for name in type(node).__slots__:
        value = getattr(node, name)
        if isinstance(value, ast.Node | tuple | list):
            yield value
