from __future__ import annotations

from pathlib import Path

import pytest

from pgsynapse import config, config_file
from pgsynapse.cli_args import parse_args
from pgsynapse.client import Client
from pgsynapse.config import load_settings, unknown_environment
from pgsynapse.daemon import file_overridden
from pgsynapse.db import tcp_params
from pgsynapse.errors import ConfigError


def test_defaults_and_environment():
    s = load_settings(environ={"DATABASE_URL": "postgresql://x/y", "PGSYNAPSE_BATCH_SIZE": "64",
                               "PGSYNAPSE_KINDS": "embed, answer"})
    assert s.database_url == "postgresql://x/y" and s.batch_size == 64 and s.kinds == ("embed", "answer")
    assert s.poll_interval == 5.0 and s.max_attempts == 5
    assert not load_settings(environ={}).database_url


def test_a_worker_of_no_kinds_is_refused():
    # `--kinds " , "` or PGSYNAPSE_KINDS=","; a worker that processes nothing would start and idle, silently
    for environ, overrides, where in (({"PGSYNAPSE_KINDS": " , "}, {}, "PGSYNAPSE_KINDS"),
                                      ({}, {"kinds": ()}, "--kinds")):
        with pytest.raises(ConfigError, match=rf"^invalid setting kinds \[{where}\]: .*at least 1 item"):
            load_settings(environ=environ, **overrides)


def test_an_unknown_job_kind_is_refused_with_the_settings():
    # it was refused by the worker only, after the embedded server had started and the migrations had run
    with pytest.raises(ConfigError, match=r"^invalid setting kinds \[PGSYNAPSE_KINDS\]: unknown job kind\(s\) "
                       r"'bogus' \(the kinds: embed, answer, "):
        load_settings(environ={"PGSYNAPSE_KINDS": "embed,bogus"})


def test_an_invalid_command_line_value_is_named_as_its_option():
    # `pgsynapse --database-url ... status` was told to look at PGSYNAPSE_DATABASE_URL or DATABASE_URL
    with pytest.raises(ConfigError, match=r"^invalid setting database_url \[--database-url\]: not a PostgreSQL"):
        load_settings(environ={"DATABASE_URL": "postgresql://h/db"}, database_url="mysql://h/db")


def test_log_level_and_format_are_taken_in_any_case():
    # PGSYNAPSE_LOG_LEVEL=INFO (Python's logging spells its levels so) stopped every command with exit 78: "Input
    # should be 'debug', 'info', 'warning' or 'error'"
    s = load_settings(environ={"PGSYNAPSE_LOG_LEVEL": "INFO", "PGSYNAPSE_LOG_FORMAT": "Json"})
    assert (s.log_level, s.log_format) == ("info", "json")
    assert config_file.early_log_format(environ={"PGSYNAPSE_LOG_FORMAT": "JSON"}) == "json"
    assert parse_args(["--log-level", "WARNING", "--log-format", "JSON", "status"]).log_level == "warning"
    with pytest.raises(ConfigError, match=r"^invalid setting log_level \[PGSYNAPSE_LOG_LEVEL\]: .*'debug'"):
        load_settings(environ={"PGSYNAPSE_LOG_LEVEL": "verbose"})


def test_prefixed_url_wins_over_database_url():
    s = load_settings(environ={"DATABASE_URL": "postgresql://a/a", "PGSYNAPSE_DATABASE_URL": "postgresql://b/b"})
    assert s.database_url == "postgresql://b/b"


def test_an_empty_prefixed_url_leaves_database_url_in_charge():
    # `PGSYNAPSE_DATABASE_URL=` (an env file's blank line, compose's `${X:-}`) is unset: DATABASE_URL must still win
    # over the embedded server, not be dropped for it without a word
    s = load_settings(environ={"DATABASE_URL": "postgresql://a/a", "PGSYNAPSE_DATABASE_URL": ""})
    assert s.database_url == "postgresql://a/a" and not s.embedded


@pytest.mark.parametrize("variable, value", [("PGSYNAPSE_LEASE_SECONDS", "inf"), ("PGSYNAPSE_POLL_INTERVAL", "inf"),
                                             ("PGSYNAPSE_STALL_SECONDS", "1e400")])
def test_a_value_that_is_not_a_finite_number_is_refused_at_start(variable, value):
    # an infinite lease was accepted, and the worker died at its first maintenance step with an OverflowError
    name = variable.removeprefix("PGSYNAPSE_").lower()
    with pytest.raises(ConfigError, match=rf"^invalid setting {name} \[{variable}\]: .*finite"):
        load_settings(environ={variable: value})


def test_listen_url_is_optional_secret_and_needs_a_database_url():
    assert load_settings(environ={"DATABASE_URL": "postgresql://pooler/app"}).listen_url is None
    s = load_settings(environ={"DATABASE_URL": "postgresql://pooler/app",
                               "PGSYNAPSE_LISTEN_URL": "postgresql://u:pw-S3CRET-42@primary/app"})
    assert s.listen_url == "postgresql://u:pw-S3CRET-42@primary/app" and "S3CRET" not in repr(s)
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={"PGSYNAPSE_LISTEN_URL": "postgresql://u:pw-S3CRET-42@primary/app"})
    msg = str(exc.value)
    assert msg.startswith("invalid setting listen_url [PGSYNAPSE_LISTEN_URL]: needs database_url") and "S3CRET" not in msg


def test_invalid_value_is_one_line_naming_the_setting():
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={"PGSYNAPSE_BATCH_SIZE": "zero"})
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("invalid setting batch_size [PGSYNAPSE_BATCH_SIZE]:") and "'zero'" in msg


def test_cross_field_rule_names_the_setting():
    with pytest.raises(ConfigError, match=r"^invalid setting chunk_overlap"):
        load_settings(environ={"PGSYNAPSE_CHUNK_TOKENS": "64", "PGSYNAPSE_CHUNK_OVERLAP": "40"})


def test_toml_file_then_environment_then_overrides(tmp_path: Path):
    f = tmp_path / "pgsynapse.toml"
    f.write_text('[pgsynapse]\nbatch_size = 8\npoll_interval = 2.5\nlog_format = "json"\n')
    s = load_settings(f, environ={"PGSYNAPSE_POLL_INTERVAL": "1"}, log_format="console")
    assert (s.batch_size, s.poll_interval, s.log_format) == (8, 1.0, "console")


def test_list_settings_of_the_file_are_lists_or_comma_separated_as_in_the_environment(tmp_path: Path):
    # the docs give kinds and image_roots comma-separated (PGSYNAPSE_KINDS=embed,answer): the same string in the
    # file was refused with pydantic's "Input should be a valid tuple", though TOML has no tuples
    f = tmp_path / "pgsynapse.toml"
    f.write_text('kinds = "embed, answer"\nimage_roots = "/srv/images,/mnt/photos"\n')
    s = load_settings(f, environ={})
    assert s.kinds == ("embed", "answer") and s.image_roots == (Path("/srv/images"), Path("/mnt/photos"))
    f.write_text('kinds = ["embed"]\nimage_roots = ["/srv/images"]\n')
    s = load_settings(f, environ={})
    assert s.kinds == ("embed",) and s.image_roots == (Path("/srv/images"),)


def test_unknown_key_in_toml_is_rejected(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text("bach_size = 8\n")
    with pytest.raises(ConfigError, match=r"^invalid setting bach_size"):
        load_settings(f, environ={})


def test_missing_or_broken_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})


def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path: Path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes("chunk_tokens = 128 # réglé\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^config file .*latin.toml is not UTF-8 text \(byte 22\): TOML files are UTF-8$"):
        load_settings(latin, environ={})
    with pytest.raises(ConfigError, match=r"^config file .* cannot be read: Is a directory$"):
        load_settings(tmp_path, environ={})


def test_an_invalid_value_of_the_file_is_named_as_the_file_has_it(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text("batch_size = 0\n")  # it was labelled [PGSYNAPSE_BATCH_SIZE], a variable nobody set
    with pytest.raises(ConfigError, match=rf"^invalid setting batch_size \[batch_size in {f}\]: "):
        load_settings(f, environ={})
    # the environment's value wins, and is named as its variable
    with pytest.raises(ConfigError, match=r"^invalid setting batch_size \[PGSYNAPSE_BATCH_SIZE\]: "):
        load_settings(f, environ={"PGSYNAPSE_BATCH_SIZE": "-1"})


def test_settings_go_at_the_top_level_or_under_the_pgsynapse_table_not_both(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text("[pgsynapse]\nbatch_size = 8\n")
    assert load_settings(f, environ={}).batch_size == 8
    f.write_text("batch_size = 0\n[pgsynapse]\npoll_interval = 1\n")  # batch_size 0 was dropped unchecked
    with pytest.raises(ConfigError, match=r"not both \(at the top level: batch_size\)$"):
        load_settings(f, environ={})
    f.write_text("pgsynapse = 5\n")
    with pytest.raises(ConfigError, match=r"pgsynapse must be a table \(\[pgsynapse\]\) of settings, not a int$"):
        load_settings(f, environ={})


def test_a_mistyped_environment_variable_is_named_with_the_one_it_meant():
    environ = {"PGSYNAPSE_BACH_SIZE": "5", "PGSYNAPSE_BATCH_SIZE": "4", "PGSYNAPSE_CONFIG": "x.toml",
               "PGSYNAPSE_DB_PORT": "5433", "PGSYNAPSE_TEST_DATABASE_URL": "x", "PGSYNAPSE_BENCH_DATA": "x",
               "PGSYNAPSE_SQL_READER_PASSWORD": "x", "PGSYNAPSE_ZZZ": "1", "PATH": "/bin"}  # sql_reader_password
    assert unknown_environment(environ) == [("PGSYNAPSE_BACH_SIZE", "PGSYNAPSE_BATCH_SIZE"), ("PGSYNAPSE_ZZZ", None)]


def test_root_default_data_dir_is_not_under_root(monkeypatch):
    monkeypatch.setattr(config.os, "geteuid", lambda: 0)
    assert config.default_data_dir() == Path("/var/lib/pgsynapse")


def test_mistyped_toml_key_is_named_and_its_value_never_shown(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text('databse_url = "postgresql://u:pw-S3CRET-42@h/db"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(f, environ={})
    msg = str(exc.value)
    assert msg.startswith("invalid setting databse_url") and "database_url" in msg.split(":", 1)[1]
    assert "S3CRET" not in msg and "S3CRET" not in repr(exc.value.__cause__ or exc.value.__context__)


@pytest.mark.parametrize("name, toml", [
    ("database_url", '["postgresql://u:pw-S3CRET-42@h/db"]'),
    ("listen_url", '["postgresql://u:pw-S3CRET-42@h/db"]'),
    ("openai_api_key", '["sk-S3CRET-42"]'),
    ("openai_base_url", '["https://u:S3CRET-42@llm.example/v1"]'),
])
def test_invalid_secret_setting_never_shows_its_value(tmp_path: Path, name, toml):
    f = tmp_path / "c.toml"
    f.write_text(f"{name} = {toml}\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(f, environ={})
    msg = str(exc.value)
    assert msg.startswith(f"invalid setting {name}") and "S3CRET" not in msg


@pytest.mark.parametrize("variable", ["DATABASE_URL", "PGSYNAPSE_READ_URL"])
@pytest.mark.parametrize("url", ["mysql://u:pw-S3CRET-42@h/db", "u:pw-S3CRET-42@h/db", "host=h password=pw-S3CRET-42 x"])
def test_a_url_that_is_no_connection_string_is_refused_at_start_without_its_value(variable, url):
    # the server's connect error quoted the whole string back, password included ("missing "=" after ...")
    environ = {"DATABASE_URL": "postgresql://h/db", variable: url}
    with pytest.raises(ConfigError) as exc:
        load_settings(environ=environ)
    msg = str(exc.value)
    name = variable.removeprefix("PGSYNAPSE_").lower()
    where = "PGSYNAPSE_DATABASE_URL or DATABASE_URL" if name == "database_url" else variable
    assert msg.startswith(f"invalid setting {name} [{where}]: not a PostgreSQL connection string (postgresql://"), msg
    assert "S3CRET" not in msg


@pytest.mark.parametrize("url", ["postgresql://u:pw-S3CRET-42@h/db?connect_timeout=abc",
                                 "host=h password=pw-S3CRET-42 connect_timeout=10s"])
def test_a_connect_timeout_that_is_no_number_is_refused_at_start(url):
    # psycopg refused it only at connect, as a "database error" with exit 69: restarted every 5 s for a typo
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={"DATABASE_URL": url})
    msg = str(exc.value)
    assert msg.startswith("invalid setting database_url [PGSYNAPSE_DATABASE_URL or DATABASE_URL]: connect_timeout "
                          "must be a number of seconds"), msg
    assert "S3CRET" not in msg


@pytest.mark.parametrize("where", ["url", "listen_url"])
def test_a_client_given_no_connection_string_says_so_without_its_value(where):
    # before: psycopg's ProgrammingError at connect, which quoted the whole string, password included
    bad, good = "mysql://u:pw-S3CRET-42@h/db", "postgresql://h/db"
    with pytest.raises(ConfigError) as exc:
        Client(bad) if where == "url" else Client(good, listen_url=bad)
    assert str(exc.value).startswith(f"Client {where}: not a PostgreSQL connection string") and "S3CRET" not in str(
        exc.value)


def test_settings_repr_hides_the_database_url():
    s = load_settings(environ={"DATABASE_URL": "postgresql://u:pw-S3CRET-42@h/db"})
    assert "S3CRET" not in repr(s) and "S3CRET" not in str(s)


def test_tcp_params_come_from_the_settings_and_never_override_the_url():
    s = load_settings(environ={"PGSYNAPSE_KEEPALIVES_IDLE_SECONDS": "7", "PGSYNAPSE_TCP_USER_TIMEOUT_MS": "9000"})
    assert tcp_params("postgresql://u@db/app", s) == {
        "keepalives": 1, "keepalives_idle": 7, "keepalives_interval": 5, "keepalives_count": 3,
        "tcp_user_timeout": 9000, "connect_timeout": 10}
    # what the URL sets is the user's: keyword arguments would win over it, so they are left out
    given = tcp_params("postgresql://u@db/app?keepalives_idle=60&tcp_user_timeout=0&connect_timeout=3", s)
    assert given == {"keepalives": 1, "keepalives_interval": 5, "keepalives_count": 3}
    assert tcp_params("host=db keepalives=0", None) == {
        "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30_000,
        "connect_timeout": 10}


def test_the_file_settings_overridden_by_the_environment_are_named_and_a_secret_not_shown(tmp_path: Path):
    """A reload (and the start) say which settings of the file do not count (daemon.file_overridden): those the
    environment or the command line set to another value; the same value, or a secret's value, is never shown."""
    f = tmp_path / "c.toml"
    f.write_text('log_format = "console"\nbatch_size = 8\npoll_interval = 2\nkinds = "embed"\n'
                 'database_url = "postgresql://u:file-secret@h/db"\n')
    env = {"PGSYNAPSE_LOG_FORMAT": "json", "PGSYNAPSE_BATCH_SIZE": "8", "PGSYNAPSE_KINDS": "embed,answer",
           "DATABASE_URL": "postgresql://u:env-secret@h/db"}
    s = load_settings(f, environ=env, poll_interval=3)
    assert file_overridden(s) == {
        "database_url": {"by": "DATABASE_URL"},
        "kinds": {"file": ["embed"], "used": ["embed", "answer"], "by": "PGSYNAPSE_KINDS"},
        "log_format": {"file": "console", "used": "json", "by": "PGSYNAPSE_LOG_FORMAT"},
        "poll_interval": {"file": 2, "used": 3.0, "by": "--poll-interval"},
    }  # batch_size: the same value in both
    assert file_overridden(load_settings(f, environ={})) == {}
