"""The Hugging Face libraries' environment that every pgsynapse process starts with (pgsynapse/hf_env.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, pgsynapse.images.encoders  # a module that imports transformers at its top
import huggingface_hub.constants as hub, transformers.utils.logging as tl
from tqdm.auto import tqdm  # what transformers' GGUF loader draws its bar with
print(json.dumps({"offline": hub.HF_HUB_OFFLINE, "bars": tl.is_progress_bar_enabled(), "tqdm": not tqdm([]).disable}))
"""
KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


def _probe(**env: str) -> dict[str, bool]:
    clean = {k: v for k, v in os.environ.items() if k not in KEYS}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env},
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_process_that_loads_models_is_offline_and_writes_no_progress_bars():
    """transformers' "Loading weights" bars went to stderr between the log events on every torch load (the
    worker's INT8 export at its first start, each retrain), and its GGUF loader's "Converting and de-quantizing"
    bar on the demo's SQL model: a journal or a JSON log reader got tqdm lines."""
    assert _probe() == {"offline": True, "bars": False, "tqdm": False}


def test_a_value_in_the_environment_wins():
    # tqdm reads any non-empty TQDM_DISABLE as true: an empty one turns its bars back on
    assert _probe(HF_HUB_DISABLE_PROGRESS_BARS="0", HF_HUB_OFFLINE="0", TQDM_DISABLE="") == {
        "offline": False, "bars": True, "tqdm": True}
