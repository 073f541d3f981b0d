"""The Hugging Face libraries' environment, set when this module is imported, so before any of them is: models load
from local paths only (no hub download at run time), tokenizers start no thread pool of their own beside the
worker's threads, and no progress bar (transformers' "Loading weights") is written between the log events. Each
is a default: a value already in the environment wins."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
