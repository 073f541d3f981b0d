"""The SQL model registry (``pgsynapse.sql_models``): list, add, promote, rollback, traffic, retire.

A :class:`pgsynapse.sideregistry.SideRegistry` (its docstring has the statuses, rollback and routing); with no
active row the worker uses the settings' model (``sql_model_path`` / ``sql_runtime``). These names are the
registry's methods, as the CLI, the SQL answer handler and the tests call them.
"""

from __future__ import annotations

from pgsynapse.sideregistry import SideRegistry

RUNTIMES = ("transformers", "llama-cpp", "openai")
REGISTRY = SideRegistry("sql_models", "SQL model", RUNTIMES, without="the settings' model")

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
