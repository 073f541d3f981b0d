"""The SQL model registry (textsql/registry.py) on a real database: add, traffic, routing, promote, rollback and
retire, with their refusals."""

from __future__ import annotations

import argparse
import contextlib
import io

import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.errors import RegistryError
from pgsynapse.model_checks import warn_unavailable
from pgsynapse.status import render, snapshot
from pgsynapse.textsql import registry as reg
from pgsynapse.textsql.cli import run_sql_model_command
from tests.helpers import fast_settings


def _status(conn) -> dict[int, tuple[str, float]]:
    return {m["id"]: (m["status"], float(m["traffic_percent"])) for m in reg.list_models(conn)}


def test_traffic_routing_and_refusals(db_url):
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert reg.active_sql_model(conn) is None and reg.routable_sql_models(conn) == []
        a = reg.add_model(conn, "base", "/models/base", "transformers", status="active")
        assert a["status"] == "active" and float(a["traffic_percent"]) == 100 and a["replaced_id"] is None
        b = reg.add_model(conn, "b", "/models/b", "transformers", base_id=a["id"], metrics={"x": 1}, traffic=30)
        c = reg.add_model(conn, "c", "/models/c", "llama-cpp")
        assert b["base_id"] == a["id"] and b["metrics"] == {"x": 1} and float(b["traffic_percent"]) == 30
        reg.set_traffic(conn, c["id"], 70)
        with pytest.raises(RegistryError, match="add up to 100.5 %"):
            reg.set_traffic(conn, c["id"], 70.5)
        with pytest.raises(RegistryError, match="only a candidate"):
            reg.set_traffic(conn, a["id"], 10)
        with pytest.raises(RegistryError, match="between 0 and 100"):
            reg.set_traffic(conn, b["id"], -1)
        with pytest.raises(RegistryError, match="no SQL model 9999"):
            reg.promote(conn, 9999)
        with pytest.raises(RegistryError, match="unknown SQL model runtime"):
            reg.add_model(conn, "x", "/x", "onnx")
        with pytest.raises(RegistryError, match="add up to"):
            reg.add_model(conn, "x", "/x", "transformers", traffic=1)
        with pytest.raises(RegistryError, match="only a candidate gets a traffic share"):
            reg.add_model(conn, "x", "/x", "transformers", status="rejected", traffic=1)
        rejected = reg.add_model(conn, "r", "/models/r", "transformers", status="rejected")
        with pytest.raises(RegistryError, match="is rejected: only a candidate can be promoted"):
            reg.promote(conn, rejected["id"])

        rows = reg.routable_sql_models(conn)
        assert [r["id"] for r in rows] == [a["id"], b["id"], c["id"]]
        # every session goes to a candidate (30 + 70 %), sticky, in about those shares
        routed = [reg.choose_sql_model(rows, f"s{i}")["id"] for i in range(400)]
        assert routed == [reg.choose_sql_model(rows, f"s{i}")["id"] for i in range(400)]
        assert set(routed) == {b["id"], c["id"]} and 80 <= routed.count(b["id"]) <= 160
        reg.set_traffic(conn, c["id"], 0)
        rows = reg.routable_sql_models(conn)
        assert [r["id"] for r in rows] == [a["id"], b["id"]]
        routed = [reg.choose_sql_model(rows, f"s{i}")["id"] for i in range(400)]
        assert set(routed) == {a["id"], b["id"]}

        # retire: never the active one; a retired model gets no traffic
        with pytest.raises(RegistryError, match="is active"):
            reg.retire(conn, a["id"])
        reg.retire(conn, b["id"])
        assert _status(conn)[b["id"]] == ("retired", 0.0)
        with pytest.raises(RegistryError, match="is retired: only a candidate"):
            reg.set_traffic(conn, b["id"], 5)
        with pytest.raises(RegistryError, match=f"^SQL model {b['id']} is already retired: nothing to do$"):
            reg.retire(conn, b["id"])  # again: it said "retired" again


def test_promote_and_rollback_walk_back_through_the_promotions(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:  # tuple rows: the registry gives dicts all the same
        with pytest.raises(RegistryError, match="nothing to roll back"):
            reg.rollback(conn)
        a = reg.add_model(conn, "a", "/models/a", "transformers")["id"]
        b = reg.add_model(conn, "b", "/models/b", "transformers")["id"]
        c = reg.add_model(conn, "c", "/models/c", "transformers", traffic=20)["id"]
        assert reg.promote(conn, a) == {"active": a, "previous": None}  # the settings' model served before
        assert reg.promote(conn, b) == {"active": b, "previous": a}
        with pytest.raises(RegistryError, match="already active"):
            reg.promote(conn, b)
        s = _status(conn)
        assert s[a] == ("retired", 0.0) and s[b] == ("active", 100.0) and s[c] == ("candidate", 20.0)  # c keeps 20 %
        assert reg.promote(conn, c) == {"active": c, "previous": b}
        assert reg.get_model(conn, c)["replaced_id"] == b

        # rollback: c -> b -> a -> the settings' model, one promotion at a time
        assert reg.rollback(conn) == {"active": b, "previous": c}
        s = _status(conn)
        assert s[b] == ("active", 100.0) and s[c] == ("retired", 0.0)
        assert reg.rollback(conn) == {"active": a, "previous": b}
        assert reg.active_sql_model(conn)["id"] == a
        assert reg.rollback(conn) == {"active": None, "previous": a}
        assert reg.active_sql_model(conn) is None and all(st == "retired" for st, _ in _status(conn).values())
        with pytest.raises(RegistryError, match="nothing to roll back"):
            reg.rollback(conn)
        # with no active row the settings' model takes the active model's place in routing
        d = reg.add_model(conn, "d", "/models/d", "transformers", traffic=100)["id"]
        rows = reg.routable_sql_models(conn)
        assert {reg.choose_sql_model(rows, f"s{i}")["id"] for i in range(50)} == {d}
        reg.set_traffic(conn, d, 0)
        assert reg.choose_sql_model(reg.routable_sql_models(conn), "s1") is None
        # at most one active model, whatever happens
        n = conn.execute("SELECT count(*) FROM pgsynapse.sql_models WHERE status = 'active'").fetchone()[0]
        assert n == 0


def test_status_and_sql_model_list_show_the_share_the_active_model_serves(db_url):
    """The active SQL model serves what its routed candidates leave it: `status` and `sql-model list` said 100 %
    beside a candidate at 30 % (its row's figure, whatever the candidates take), as they once did for rankers."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        a = reg.add_model(conn, "base", "/models/base", "transformers", status="active")["id"]
        b = reg.add_model(conn, "b", "/models/b", "transformers", traffic=30)["id"]
        reg.add_model(conn, "r", "/models/r", "transformers", status="rejected")
        snap = snapshot(conn)
    assert [(m["id"], float(m["traffic_percent"])) for m in snap["sql_models"]] == [(a, 70.0), (b, 30.0),
                                                                                     (b + 1, 0.0)]
    assert f"SQL model {a:<5}: active base (transformers), 70% traffic" in render(snap)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_sql_model_command(argparse.Namespace(sql_model_command="list", json=False), fast_settings(db_url))
    assert f"{a:>3}  active     70.00%  transformers" in out.getvalue(), out.getvalue()


def test_a_model_added_twice_is_refused_naming_the_one_registered(db_url, tmp_path):
    """`sql-model add PATH` twice registered a second row for the same model (a copy that splits nothing but the
    registry's history); it is refused, naming the model registered, until that one is retired."""
    model = tmp_path / "tiny-sql"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def add(path: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_sql_model_command(argparse.Namespace(sql_model_command="add", path=path, name=None, runtime=None,
                                                     no_runtime_check=False, activate=False), fast_settings(db_url))
        return out.getvalue()

    assert "SQL model 1 (transformers): candidate" in add(str(model))
    with pytest.raises(RegistryError, match=rf"^{model} is already SQL model 1 \(candidate, transformers\): "):
        add(str(tmp_path / "." / "tiny-sql"))  # the same directory, written another way
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert _status(conn) == {1: ("candidate", 0.0)}
        reg.retire(conn, 1)
    assert "SQL model 2 (transformers): candidate" in add(str(model))  # retired: it may be added again


def test_the_default_sql_model_missing_is_no_warning_while_a_registered_one_serves(db_url, tmp_path):
    """`pgsynapse run` warned at every start that data questions fail until the settings' default SQL model is
    there (sql_model_unavailable), with a registered SQL model active that serves them: a warning about nothing."""
    settings = fast_settings(db_url, data_dir=tmp_path)
    unavailable = [{"model": "qwen2.5-coder-0.5b", "install": "pip install 'pgsynapse[qwen]'",
                    "effect": "questions about the data fail until it is there, unless a registered SQL model is "
                              "active (pgsynapse sql-model list)"}]

    def logged() -> list[tuple[str, str]]:
        with capture_logs() as logs:
            warn_unavailable(unavailable, settings, db_url)
        return [(e["event"], e["log_level"]) for e in logs]

    assert logged() == [("sql_model_unavailable", "warning")]  # no registered model: the default serves
    model = tmp_path / "tuned"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        gone = reg.add_model(conn, "gone", str(tmp_path / "gone"), "transformers", status="active")
        assert logged() == [("sql_model_unavailable", "warning")]  # the active one is not there either
        reg.add_model(conn, "tuned", str(model), "transformers", status="active")
        with capture_logs() as logs:
            warn_unavailable(unavailable, settings, db_url)
    assert [(e["event"], e["log_level"]) for e in logs] == [("sql_model_unavailable", "info")]
    assert logs[0]["effect"] == f"none: SQL model {gone['id'] + 1} (tuned) of the registry is active and serves"
