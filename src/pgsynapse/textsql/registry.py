"""The SQL model registry (``pgsynapse.sql_models``): list, add, promote, rollback, traffic, retire.

A :class:`pgsynapse.sideregistry.SideRegistry` (its docstring has the statuses, rollback and routing); with no
active row the worker uses the settings' model (``sql_model_path`` / ``sql_runtime``). These names are the
registry's methods, as the CLI, the SQL answer handler and the tests call them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import psycopg

from pgsynapse.answerers.local_models import PRESETS, preset_not_installed
from pgsynapse.errors import ModelError, RegistryError
from pgsynapse.sideregistry import SideRegistry
from pgsynapse.textsql.generate import auto_runtime

RUNTIMES = ("transformers", "llama-cpp", "openai")
REGISTRY = SideRegistry("sql_models", "SQL model", RUNTIMES, without="the settings' model")


def registered_path(spec: str, runtime: str) -> str:
    """What ``sql-model add`` stores as a model's path: a preset's name as it is, a local model directory or
    ``.gguf`` file made absolute (the worker does not run where the shell that added it did); refused when it is
    not there, rather than failing every question routed to it. ``openai``: the endpoint's model name, as given."""
    if runtime == "openai" or spec in PRESETS:
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"SQL model path does not exist: {path} (a model directory, a .gguf file or a preset: "
                         f"{', '.join(sorted(PRESETS))})")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelError(f"SQL model path {path} is a file but not a .gguf file")
    if runtime == "llama-cpp" and path.is_dir() and len(list(path.glob("*.gguf"))) != 1:
        raise ModelError(f"SQL model path {path}: runtime llama-cpp needs a .gguf file (or a directory with one)")
    if path.is_dir() and not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) != 1:
        raise ModelError(f"SQL model path {path} is a directory without a model in it (a transformers model has "
                         "config.json; a GGUF model directory, exactly one .gguf file)")
    return str(path.resolve())


def refuse_duplicate(conn: psycopg.Connection, path: str, runtime: str) -> None:
    """``sql-model add``: refused (RegistryError, naming it) when a candidate or the active model already has this
    path (as :func:`registered_path` gives it) on this runtime: a copy would serve the same statements under another
    id. A retired or rejected one may be added anew; another runtime is another model to compare (llama.cpp and
    transformers do not write the same statements)."""
    same = next((m for m in list_models(conn) if m["path"] == path and m["runtime"] == runtime
                 and m["status"] in ("candidate", "active")), None)
    if same is None:
        return
    n = same["id"]
    what = ("it serves every session not routed to a candidate" if same["status"] == "active" else
            f"promote it or give it a share of the sessions instead (`pgsynapse sql-model promote {n}`, "
            f"`pgsynapse sql-model traffic {n} PERCENT`)")
    raise RegistryError(f"{path} is already SQL model {n} ({same['status']}, {runtime}): {what}; to add it anew, "
                        f"retire that one first (`pgsynapse sql-model retire {n}`)")


def check_runtime_here(runtime: str, spec: str = "", *, llama_cpp: bool | None = None) -> None:
    """``sql-model add``: refused (ModelError, with what to install) when ``spec`` is a preset whose packages are not
    installed, or the runtime is llama-cpp and llama-cpp-python is not, on the host that runs the command, which is
    taken for the workers' (``--no-runtime-check`` when they run elsewhere). ``llama_cpp``: whether it is installed
    (default: look, here)."""
    if runtime != "openai" and (install := preset_not_installed(spec)):
        raise ModelError(f"SQL model preset {spec!r} is not installed where this command runs: {install}; if the "
                         "workers run on another host that has it, add it with --no-runtime-check")
    installed = importlib.util.find_spec("llama_cpp") is not None if llama_cpp is None else llama_cpp
    if runtime != "llama-cpp" or installed:
        return
    raise ModelError("runtime llama-cpp needs llama-cpp-python, which is not installed where this command runs: "
                     "pip install 'pgsynapse[llama]' (or add the model with --runtime transformers); if the workers "
                     "run on another host that has it, add it with --no-runtime-check")


def choose_runtime(path: str, *, llama_cpp: bool | None = None) -> tuple[str, str]:
    """``sql-model add`` without ``--runtime``: the runtime ``sql_runtime = auto`` would choose (:func:`auto_runtime`:
    llama.cpp for a GGUF model when llama-cpp-python is installed, else transformers), and why, for the user.
    ``llama_cpp``: whether it is installed (default: look, here)."""
    if auto_runtime(path, llama_cpp=True) != "llama-cpp":
        return "transformers", "not a GGUF model (a transformers directory)"
    if auto_runtime(path, llama_cpp=llama_cpp) == "llama-cpp":
        return "llama-cpp", ("a GGUF model, and llama-cpp-python is installed: llama.cpp runs it several times "
                             "faster than transformers (the worker needs pgsynapse[llama] too)")
    return "transformers", ("a GGUF model, but llama-cpp-python is not installed: transformers dequantizes it, "
                            "several times slower (pip install 'pgsynapse[llama]', then add it with "
                            "--runtime llama-cpp)")


def entry(model: dict[str, Any]) -> str:
    """A registered model as an error names it: ``SQL model 3 (tuned, transformers) of the registry``."""
    return f"SQL model {model['id']} ({model['name']}, {model['runtime']}) of the registry"


def out_of_service(model: dict[str, Any]) -> str:
    """What to do when a registered model cannot be loaded: put it back, or stop routing questions to it."""
    how = ("`pgsynapse sql-model rollback`: it is the active one" if model["status"] == "active" else
           f"`pgsynapse sql-model retire {model['id']}`")
    return f"put the model back at {model['path']}, or take it out of service ({how})"


def base_hint(base: dict[str, Any], active: dict[str, Any]) -> str:
    """What to do when the SQL retrain's base, the root of the ``active`` model's lineage, cannot be loaded: as of
    any model when it is the active one (:func:`out_of_service`); else put it back (taking it out of service would
    not change what the retrain fine-tunes)."""
    if base["id"] == active["id"]:
        return out_of_service(base)
    return (f"put the model back at {base['path']}: the SQL retrain fine-tunes the root of the active SQL model's "
            f"lineage (SQL model {active['id']})")


get_model = REGISTRY.get_model
list_models = REGISTRY.list_models
active_sql_model = REGISTRY.active_model
routable_sql_models = REGISTRY.routable_models
choose_sql_model = REGISTRY.choose
add_model = REGISTRY.add_model
promote = REGISTRY.promote
rollback = REGISTRY.rollback
set_traffic = REGISTRY.set_traffic
retire = REGISTRY.retire
