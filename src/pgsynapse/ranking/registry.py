"""The ranker registry (``pgsynapse.ranker_models``, migration 0020): a
:class:`pgsynapse.sideregistry.SideRegistry`. With no active ranker the vector order stands."""

from __future__ import annotations

from pgsynapse.sideregistry import SideRegistry

RUNTIMES = ("onnx-int8", "torch", "version")  # version: a teacher model version rescoring (ranking/rescore.py)
REGISTRY = SideRegistry("ranker_models", "ranker", RUNTIMES, without="the vector order")
