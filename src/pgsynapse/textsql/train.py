"""Fine-tune the SQL model on corrected questions and gate it by execution accuracy, in its own process.

Run by the ``sql_retrain`` handler as ``python -m pgsynapse.textsql.train`` with the JSON spec (:class:`SqlTrainSpec`)
on stdin (it holds the database URL, password included: a pipe, never a file, argv or the environment); progress
goes to stdout as JSON lines (:func:`pgsynapse.learning.trainer_process.progress`), the results to
``OUT_DIR/metrics.json`` beside the model.

1. **Pairs**: one per corrected question (its latest correction), from ``sql_corrections`` joined to
   ``data_questions``: the question, the schema context its prompt was built from, and the target SQL (the
   corrected statement, or the generated one when the correction approves it). Every target is checked
   (``check_sql``) and run as the reader role once; a target that is refused or fails is dropped (counted by
   reason): it would teach the model a statement that cannot run, and could not judge one either.
2. **Split**: a held-out slice of about ``heldout_fraction`` of the questions, chosen by a hash of the normalised
   question text (:func:`normalise_question`, :func:`split_pairs`): a question asked twice never lands on both
   sides, and keeps its side from one retrain to the next, so the active model (an earlier run's candidate) is
   never judged on questions it was trained on.
3. **Fine-tune** (:func:`fine_tune`) the base model (a transformers directory, a ``.gguf`` file dequantised by
   transformers' gguf loader, or a preset): every weight, or a LoRA adapter (``peft``) merged into the weights
   before saving, so inference loads a plain transformers directory. The loss is on the SQL tokens only; the
   prompt is :func:`pgsynapse.textsql.generate.training_example`'s, exactly what the generator sees at inference.
4. **Export** (:func:`export_candidate`): when the base is a GGUF model and llama-cpp-python is installed, the
   candidate is also written as ``OUT_DIR/model.gguf`` from the base GGUF (:mod:`pgsynapse.textsql.gguf_export`;
   ``sql_retrain_gguf``), so it serves on llama.cpp like the base, and that file is what is evaluated and
   registered. A failed export (event ``sql_gguf_export_failed``) leaves the transformers directory, as before.
5. **Evaluate** (:func:`evaluate`) the candidate and the active model on the held-out pairs: generate ->
   ``check_sql`` -> ``run_readonly`` (the worker's limits and reader role) -> ``same_result`` against the target's
   result, ordered only when the target has a top-level ORDER BY. The gate (:mod:`pgsynapse.textsql.gate`) reads
   both accuracies.

The pairs, the split and execution accuracy live in :mod:`pgsynapse.textsql.pairs`. Entry points for the
benchmark, whose pairs come without a corrections table, are all importable from here: :class:`Pair`,
:func:`split_pairs`, :func:`fine_tune`, :func:`run_targets` and :func:`evaluate`.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg.rows import dict_row

from pgsynapse.answerers.local_models import check_model, load_transformers, resolve_model
from pgsynapse.config import load_settings
from pgsynapse.errors import ConfigError, InputError
from pgsynapse.learning.trainer_process import progress, read_spec
from pgsynapse.textsql import reader
from pgsynapse.textsql.execute import Limits
from pgsynapse.textsql.gate import accuracy
from pgsynapse.textsql.generate import (
    SqlPrompt, auto_runtime, encode_example, fit_prompt, locate_sql_model, make_generator, prompt_text,
    training_example)
from pgsynapse.textsql.gguf_export import export_gguf
from pgsynapse.textsql.pairs import (  # re-exported: the benchmark's entry points are all here
    Evaluation, Outcome, Pair, evaluate, load_pairs, normalise_question, ordered_target, run_statement, run_targets,
    split_pairs)

__all__ = ["Evaluation", "FitReport", "Outcome", "Pair", "SqlTrainSpec", "evaluate", "export_candidate", "fine_tune",
           "load_pairs", "main",
           "normalise_question", "ordered_target", "run_statement", "run_targets", "split_pairs"]

STEP_EVENT = "sql_retrain_step"


@dataclass
class SqlTrainSpec:
    url: str
    out_dir: str
    base_path: str  # what is fine-tuned: a transformers directory, a .gguf file or a preset
    active_runtime: str  # the model the candidate is compared with (transformers, llama-cpp or openai)
    active_path: str
    lora: bool = False
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 4
    micro_batch_tokens: int = 4096  # a batch is run in pieces of at most this many (padded) tokens
    lora_r: int = 16
    lora_alpha: int = 32
    heldout_fraction: float = 0.25
    seed: int = 0
    budget_seconds: float = 3600.0  # training stops here; evaluation and saving follow
    threads: int = 0
    # the worker's settings the evaluation needs (generation, limits, the reader role); see _settings
    settings: dict[str, Any] = field(default_factory=dict)
    # a registered base / active model, as its errors name it (textsql/registry.py entry); None: sql_model_path's
    base_subject: str | None = None
    active_subject: str | None = None
    # what to do when that model cannot be loaded (textsql/registry.py out_of_service), said after its error
    base_hint: str | None = None
    active_hint: str | None = None


# -- fine-tuning -------------------------------------------------------------------------------------------------

@dataclass
class FitReport:
    steps: int
    epochs: int
    examples: int
    too_long: int  # pairs left out: even their question does not fit the prompt budget
    trimmed: int  # examples whose schema context lost tables to fit the prompt budget (as at inference)
    stopped_early: bool  # the budget ran out
    seconds: float  # training steps
    load_seconds: float  # reading (and dequantising) the base model
    save_seconds: float
    lora: bool
    losses: list[float]  # mean loss of each epoch (over the steps run)
    parameters: int
    trained_parameters: int


def encode_pair(tokenizer: Any, pair: Pair, prompt_budget: int) -> tuple[list[int], list[int], bool] | None:
    """(input ids, labels, trimmed) of one pair, or None when even its question does not fit ``prompt_budget``.
    The prompt is exactly the generator's at inference: fitted to the same budget (whole tables dropped from the
    end of the schema context, never the question; ``trimmed`` says so), rendered and tokenised the same way;
    labels are -100 on the prompt, so the loss is on the statement (and its end) only."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = SqlPrompt(pair.question, pair.schema_context, pair.history)
    try:
        fitted, _ = fit_prompt(prompt, lambda p: prompt_text(p, tokenizer), count, prompt_budget)
    except InputError:
        return None
    ids, start = encode_example(*training_example(fitted, pair.sql, tokenizer), tokenizer)
    return ids, [-100] * start + ids[start:], fitted != prompt


def fine_tune(pairs: Sequence[Pair], base: str, out_dir: str | Path, *, lora: bool = False, epochs: int = 3,
              lr: float = 5e-5, batch_size: int = 4, micro_batch_tokens: int = 4096, context_tokens: int = 2048,
              max_new_tokens: int = 160, lora_r: int = 16, lora_alpha: int = 32, seed: int = 0,
              budget_seconds: float = math.inf, threads: int = 0, cache_dir: str | Path | None = None,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> FitReport:
    """Fine-tune ``base`` (a transformers directory, a .gguf file dequantised to float32, or a preset) on ``pairs``
    and save a plain transformers model directory (weights, tokenizer and its chat template) in ``out_dir``: every
    weight, or with ``lora`` a LoRA adapter on every linear layer, merged into the weights before saving.
    ``context_tokens`` and ``max_new_tokens`` are the generator's (``sql_context_tokens``, ``sql_max_new_tokens``):
    prompts are fitted to the same budget as at inference. AdamW, linear warm-up (10 %) and decay, gradient
    clipping at 1; the loss is the mean over the batch's SQL tokens. Stops early (and says so) past
    ``budget_seconds``; ``on_step`` gets each step's figures. ``threads``: torch's threads meanwhile (0: as they
    are)."""
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _fine_tune(pairs, base, out_dir, lora=lora, epochs=epochs, lr=lr, batch_size=batch_size,
                          micro_batch_tokens=micro_batch_tokens, context_tokens=context_tokens,
                          max_new_tokens=max_new_tokens, lora_r=lora_r, lora_alpha=lora_alpha, seed=seed,
                          budget_seconds=budget_seconds, cache_dir=cache_dir, on_step=on_step)
    finally:
        torch.set_num_threads(previous_threads)  # a caller's own setting (the benchmark calls this in-process)


def _fine_tune(pairs: Sequence[Pair], base: str, out_dir: str | Path, *, lora: bool, epochs: int, lr: float,
               batch_size: int, micro_batch_tokens: int, context_tokens: int, max_new_tokens: int, lora_r: int,
               lora_alpha: int, seed: int, budget_seconds: float, cache_dir: str | Path | None,
               on_step: Callable[[dict[str, Any]], None] | None) -> FitReport:
    import torch

    started = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    loaded = load_transformers(base, cache_dir=cache_dir, setting="sql_model_path", what="SQL model")
    model, tokenizer = _trainable(loaded.model, base), loaded.tokenizer
    # activations are recomputed in the backward pass instead of kept: without it a micro-batch of 4,096 tokens on
    # the 0.5B default kept 10+ GB of them (14-19 GB peak measured, above sql_retrain_memory_mb)
    model.config.use_cache = False
    if model.supports_gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    load_seconds = time.time() - started
    prompt_budget = max(16, loaded.context_limit(context_tokens) - max_new_tokens)
    parameters = sum(p.numel() for p in model.parameters())
    if lora:
        try:  # an optional extra: only this recipe needs it
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ValueError("sql_retrain_lora = true needs peft: pip install 'pgsynapse[sql-lora]'") from None

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    trained = [p for p in model.parameters() if p.requires_grad]
    encoded = [e for e in (encode_pair(tokenizer, p, prompt_budget) for p in pairs) if e is not None]
    if not encoded:
        raise ValueError(f"none of the {len(pairs)} pairs fits the prompt budget of {prompt_budget} tokens")
    trimmed = sum(e[2] for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    per_epoch = math.ceil(len(encoded) / batch_size)
    steps = epochs * per_epoch
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    step, stopped, losses = 0, False, []
    t_train = time.time()
    for epoch in range(epochs):
        order = list(range(len(encoded)))
        random.shuffle(order)
        epoch_loss = []
        for b0 in range(0, len(order), batch_size):
            if time.time() - started > budget_seconds:
                stopped = True
                break
            batch = [encoded[i] for i in order[b0:b0 + batch_size]]
            n_target = sum(sum(1 for x in e[1] if x != -100) for e in batch)
            opt.zero_grad()
            total = 0.0
            for micro in _micro_batches(batch, micro_batch_tokens):
                loss = _micro_loss(model, micro, pad) / max(1, n_target)
                loss.backward()
                total += float(loss.item())
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            sched.step()
            step += 1
            epoch_loss.append(total)
            if on_step:
                on_step({"step": step, "steps": steps, "epoch": epoch, "loss": round(total, 4)})
        if epoch_loss:
            losses.append(round(sum(epoch_loss) / len(epoch_loss), 4))
        if stopped:
            break
    train_seconds = time.time() - t_train
    model.eval()
    if lora:
        model = model.merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_save = time.time()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return FitReport(step, epochs, len(encoded), len(pairs) - len(encoded), trimmed, stopped, round(train_seconds, 1),
                     round(load_seconds, 1), round(time.time() - t_save, 1), lora, losses, parameters,
                     sum(p.numel() for p in trained))


def _trainable(model: Any, base: str) -> Any:
    """A model read from a GGUF file keeps transformers' GGUF quantizer attached even when its weights were
    dequantised to plain tensors, and then refuses to be saved: detach it. Weights still in GGUF blocks (a GGUF
    kernel installed) cannot be trained: a clear error."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ValueError(f"the SQL model {base} was loaded with its weights still quantized ({packed[0]}, ...): "
                         "they cannot be fine-tuned; uninstall the GGUF kernels package so transformers dequantises "
                         "it, or give a transformers model directory")
    quantizer.remove_quantization_config(model)
    return model


def _micro_loss(model: Any, micro: list[tuple[list[int], list[int], bool]], pad: int) -> Any:
    """The summed loss of a micro-batch's SQL tokens. Padded on the left, so every statement ends at the last
    position and only the logits of the last (longest statement + 1) positions are computed: a large vocabulary
    times a long prompt is never materialised. Positions count from each example's first real token."""
    import torch

    width = max(len(e[0]) for e in micro)
    span = max(sum(1 for x in e[1] if x != -100) for e in micro)
    keep = min(width, span + 1)
    ids = torch.tensor([[pad] * (width - len(e[0])) + e[0] for e in micro])
    labels = torch.tensor([[-100] * (width - len(e[1])) + e[1] for e in micro])
    mask = torch.tensor([[0] * (width - len(e[0])) + [1] * len(e[0]) for e in micro])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    # the logits at position p predict the token at p + 1: the last ``keep`` positions predict the last keep - 1
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, width - keep + 1:].reshape(-1), ignore_index=-100,
                                             reduction="sum")


def _micro_batches(batch: list[tuple[list[int], list[int], bool]], tokens: int) -> list[list[Any]]:
    """The batch in pieces whose padded size (examples x longest) stays within ``tokens`` (one example at least)."""
    out: list[list[Any]] = []
    for e in sorted(batch, key=lambda e: len(e[0])):
        if out and (len(out[-1]) + 1) * max(len(e[0]), *(len(x[0]) for x in out[-1])) <= tokens:
            out[-1].append(e)
        else:
            out.append([e])
    return out


# -- the GGUF export ----------------------------------------------------------------------------------------------

def gguf_base(base: str, cache_dir: Path) -> Path | None:
    """The GGUF file of ``base`` when it is one (a .gguf file, a preset, a directory holding one .gguf file and no
    config.json), else None."""
    try:
        location = resolve_model(base, cache_dir=cache_dir, setting="sql_model_path")
    except ConfigError:
        return None
    return Path(location.directory) / location.gguf_file if location.gguf_file else None


def export_candidate(base: str, out_dir: str | Path, cache_dir: Path, quant: str) -> tuple[str, str, dict[str, Any]]:
    """(runtime, path, record) of the candidate fine-tuned from ``base`` and saved in ``out_dir``: its GGUF export
    ``OUT_DIR/model.gguf`` on llama-cpp when the base is a GGUF model, llama-cpp-python is installed and ``quant``
    (``sql_retrain_gguf``) is not ``off``; else, or when the export fails (event ``sql_gguf_export_failed``), the
    transformers directory. The record says which and why (it goes into the metrics)."""
    directory = ("transformers", str(out_dir))
    if quant == "off":
        return *directory, {"skipped": "sql_retrain_gguf = off"}
    source = gguf_base(base, cache_dir)
    if source is None:
        return *directory, {"skipped": "the base is not a GGUF model"}
    if auto_runtime(str(source)) != "llama-cpp":
        return *directory, {"skipped": "llama-cpp-python is not installed"}
    target = Path(out_dir) / "model.gguf"
    try:
        report = export_gguf(source, out_dir, target, quant=quant)
    except Exception as exc:  # noqa: BLE001 - any failure: the directory serves, as before the export existed
        error = f"{type(exc).__name__}: {exc}"
        progress("sql_gguf_export_failed", base=str(source), error=error)
        return *directory, {"error": error, "base": str(source)}
    return "llama-cpp", str(target), {"path": str(target), "base": str(source), "type": quant,
                                      "replaced": len(report.replaced), "kept": report.kept,
                                      "replaced_as": report.replaced_as, "bytes": report.bytes,
                                      "seconds": report.seconds}


# -- the process -------------------------------------------------------------------------------------------------

def _settings(spec: SqlTrainSpec) -> Any:
    return load_settings(environ={}, database_url=spec.url, **spec.settings)


def _limits(settings: Any) -> Any:
    return Limits(statement_timeout_ms=settings.sql_statement_timeout_ms, max_rows=settings.sql_max_rows,
                  max_bytes=settings.sql_max_result_bytes)


def _reporter(label: str, pairs: Sequence[Pair]) -> Callable[[int, Outcome], None]:
    def report(i: int, o: Outcome) -> None:
        # a *_step event: the parent relays one every few seconds, and the last
        progress("sql_retrain_eval_step", model=label, step=i + 1, steps=len(pairs), outcome=o.outcome)
    return report


def _candidate(runtime: str, path: str, directory: str, settings: Any,
               exported: dict[str, Any]) -> tuple[Any, str, str]:
    """(generator, runtime, path) of the candidate: its GGUF export on llama.cpp, or the directory when that export
    does not load (``exported`` records why)."""
    if runtime != "transformers":
        try:
            return make_generator(runtime, path, settings), runtime, path
        except Exception as exc:  # noqa: BLE001 - an export llama.cpp refuses: the directory serves instead
            exported["error"] = f"{type(exc).__name__}: {exc}"
            progress("sql_gguf_export_failed", stage="load", path=path, error=exported["error"])
    return make_generator("transformers", directory, settings), "transformers", directory


def _hinted(load: Callable[[], Any], hint: str | None) -> Any:
    """``load()``; a model it cannot load raises its ConfigError with ``hint`` (what to do) after the reason."""
    try:
        return load()
    except ConfigError as exc:
        if not hint:
            raise
        raise ConfigError(f"{exc}: {hint}") from None


def _check_models(spec: SqlTrainSpec, settings: Any, *, active: bool) -> None:
    """Before the training: the base, and the ``active`` model that the gate loads once the candidate is trained,
    can be there (:func:`check_model`), each named by its registry row when it is one, else by sql_model_path, and
    a registered one with what to do (put it back, or take it out of service)."""
    _hinted(lambda: check_model(spec.base_path, runtime="transformers", setting="sql_model_path",
                                runtime_setting="sql_runtime", subject=spec.base_subject), spec.base_hint)
    if active:  # where make_generator looks for it, on its runtime
        _hinted(lambda: locate_sql_model(spec.active_runtime, spec.active_path, settings,
                                         subject=spec.active_subject), spec.active_hint)


def main(spec: SqlTrainSpec, *, startup_seconds: float | None = None) -> dict[str, Any]:
    """The whole run (see the module's docstring); returns the metrics it wrote to ``OUT_DIR/metrics.json``. The
    sql_retrain handler runs it in its own process; ``startup_seconds``: that process's start to here."""
    started = time.time()
    seconds: dict[str, float] = {} if startup_seconds is None else {"startup": round(startup_seconds, 2)}
    settings = _settings(spec)
    role, limits = settings.sql_reader_role, _limits(settings)
    cache_dir = Path(settings.data_dir) / "models" / "gguf"  # where a preset's joined file lies (as make_generator)
    with psycopg.connect(spec.url, autocommit=True, row_factory=dict_row, prepare_threshold=None) as conn:  # db.NO_PREPARE
        pairs = load_pairs(conn, role, history_turns=settings.history_turns,
                           max_question_chars=settings.max_question_chars)
        max_id = max((p.correction_id or 0 for p in pairs), default=0)
        usable = [p for p in pairs if p.schema_context.strip()]
        with reader.connect(settings) as runner:  # the statements: on the reader's own login (textsql/reader.py)
            kept, target_results, dropped = run_targets(runner, usable, limits, role)
        if len(usable) < len(pairs):
            dropped["no_schema_context"] = len(pairs) - len(usable)
        results = {id(p): r for p, r in zip(kept, target_results)}
        train, held = split_pairs(kept, spec.heldout_fraction, spec.seed)
        seconds["load"] = round(time.time() - started, 2)
        progress("sql_retrain_pairs_built", pairs=len(pairs), train=len(train), heldout=len(held),
                 dropped=dict(dropped))
        if not train:
            raise SystemExit(f"no usable training pair ({len(pairs)} corrected questions; dropped: {dict(dropped)})")
        _check_models(spec, settings, active=bool(held))  # not after minutes of training

        def on_step(ev: dict[str, Any]) -> None:
            progress(STEP_EVENT, **ev)

        fit = fine_tune(train, spec.base_path, spec.out_dir, lora=spec.lora, epochs=spec.epochs, lr=spec.lr,
                        batch_size=spec.batch_size, micro_batch_tokens=spec.micro_batch_tokens,
                        context_tokens=settings.sql_context_tokens, max_new_tokens=settings.sql_max_new_tokens,
                        lora_r=spec.lora_r, lora_alpha=spec.lora_alpha, seed=spec.seed,
                        budget_seconds=spec.budget_seconds, threads=spec.threads, cache_dir=cache_dir,
                        on_step=on_step)
        seconds.update(load_base=fit.load_seconds, train=fit.seconds, save=fit.save_seconds)
        t0 = time.time()
        cand_runtime, cand_path, exported = export_candidate(spec.base_path, spec.out_dir, cache_dir,
                                                             settings.sql_retrain_gguf)
        seconds["export"] = round(time.time() - t0, 2)
        progress("sql_retrain_candidate_saved", runtime=cand_runtime, path=cand_path, gguf=exported)
        progress("sql_retrain_evaluating", heldout=len(held))
        held_targets = [results[id(p)] for p in held]
        cand = act = Evaluation([], 0.0)
        if held:  # nothing to judge on: the gate says so, and neither model is loaded for it
            t0 = time.time()
            candidate, cand_runtime, cand_path = _candidate(cand_runtime, cand_path, spec.out_dir, settings, exported)
            seconds["load_candidate"] = round(time.time() - t0, 2)
            with reader.connect(settings) as runner:
                cand = evaluate(candidate, held, held_targets, runner, limits, role,
                                on_pair=_reporter("candidate", held))
            del candidate
            t0 = time.time()
            active = _hinted(lambda: make_generator(spec.active_runtime, spec.active_path, settings,
                                                    subject=spec.active_subject), spec.active_hint)
            seconds["load_active"] = round(time.time() - t0, 2)
            with reader.connect(settings) as runner:
                act = evaluate(active, held, held_targets, runner, limits, role, on_pair=_reporter("active", held))
    seconds["evaluate_candidate"], seconds["evaluate_active"] = round(cand.seconds, 2), round(act.seconds, 2)
    seconds["total"] = round(time.time() - started, 2)
    metrics: dict[str, Any] = {
        "candidate": cand.summary(), "active": act.summary(),
        "candidate_accuracy": accuracy(cand.correct), "active_accuracy": accuracy(act.correct),
        "active_model": {"runtime": spec.active_runtime, "path": spec.active_path},
        "candidate_model": {"runtime": cand_runtime, "path": cand_path, "directory": spec.out_dir},
        "gguf_export": exported,
        "base": spec.base_path, "pairs": len(pairs), "train_pairs": len(train), "heldout": len(held),
        "dropped": dict(sorted(dropped.items())), "max_correction_id": max_id,
        "train": {k: v for k, v in asdict(fit).items()}, "recipe": "lora" if spec.lora else "full",
        "per_pair": [{"question_id": p.question_id, "correction_id": p.correction_id, "question": p.question,
                      "target": p.sql, "candidate": asdict(c), "active": asdict(a)}
                     for p, c, a in zip(held, cand.outcomes, act.outcomes)],
        "gate_outcomes": {"candidate": cand.correct, "active": act.correct},
        "seconds": seconds, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    (Path(spec.out_dir) / "metrics.json").write_text(json.dumps(metrics, default=str))
    progress("sql_retrain_evaluated", candidate=metrics["candidate_accuracy"], active=metrics["active_accuracy"],
             heldout=len(held), seconds=seconds["total"])
    return metrics


if __name__ == "__main__":
    main(SqlTrainSpec(**read_spec()), startup_seconds=time.time() - psutil.Process().create_time())
