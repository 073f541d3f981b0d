"""The Hugging Face libraries' environment, set when this module is imported, so before any of them is: models load
from local paths only (no hub download at run time), tokenizers start no thread pool of their own beside the
worker's threads, and no progress bar is written between the log events (transformers' "Loading weights" goes by
huggingface_hub's switch; its GGUF loader's "Converting and de-quantizing GGUF tensors" is plain tqdm, which only
TQDM_DISABLE turns off). Each is a default: a value already in the environment wins (``TQDM_DISABLE=`` empty
shows the bars again: tqdm reads any other value as true)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
