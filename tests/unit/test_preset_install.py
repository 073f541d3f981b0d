"""Whether a model preset's packages are installed, asked without loading it (the demo skips its data question
with the install line when they are not)."""

from __future__ import annotations

from pgsynapse.answerers.local_models import PRESETS, Preset, preset_not_installed


def _preset(*packages: str) -> Preset:
    return Preset("p", tuple((pkg, "x.bin") for pkg in packages), "0" * 64, 1, "p.gguf", "pip install p-parts")


def test_a_preset_with_a_package_missing_says_what_to_install():
    presets = {"p": _preset("psycopg", "pgsynapse_no_such_part")}
    assert preset_not_installed("p", presets) == "pip install p-parts"


def test_an_installed_preset_or_a_path_needs_nothing():
    presets = {"p": _preset("psycopg", "structlog")}  # installed: its files are checked when it is loaded
    assert preset_not_installed("p", presets) is None
    assert preset_not_installed("/models/some-model", presets) is None
    assert preset_not_installed("smollm2-135m") == PRESETS["smollm2-135m"].install  # not in the [test] extra
