"""The whole run, as the handbook's steps: preflight, model, data, train, merge, verify, publish.

This module only wires the stages; each lives in its own module and runs alone from the CLI,
and each stage function here returns what it did for `run` to record in the run summary.
Everything that can fail without a GPU is checked first, in `llm_finetune.preflight`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_finetune.config import Config, config_to_dict
from llm_finetune.data import format_dataset, inference_prompt
from llm_finetune.distributed import (
    OtherProcessFailed,
    announce_outcome,
    check_same_resume_point,
    is_main_process,
    wait_for_main,
)
from llm_finetune.errors import UserError, exit_code_for, first_line
from llm_finetune.exports.formats import LORA, display_name, is_gguf, kind_of
from llm_finetune.hub import PublishTarget
from llm_finetune.manifest import source_commit, write_manifest
from llm_finetune.plots import PLOT_FILE, plot_training
from llm_finetune.preflight import PUSH_STAGING, Preflight, preflight
from llm_finetune.resume import merge_fingerprint, train_fingerprint
from llm_finetune.runlog import SUMMARY_FILE, StageClock, log, print_table, write_summary

if TYPE_CHECKING:
    from llm_finetune.backends.base import Backend
    from llm_finetune.base_model import BaseModel
    from llm_finetune.evaluate import Evaluation


def run(config: Config, until: str = "publish") -> dict[str, Any]:
    """Run the pipeline up to `until` ("train" or "publish"); return the run summary."""
    out = config.output_path
    clock = StageClock()
    exit_code = 0  # what the CLI will exit with; the other processes exit with it too
    summary: dict[str, Any] = {
        "run_name": config.run_name,
        "status": "running",
        "output_dir": str(out),
        "stages": clock.seconds,
        "llm_finetune": _this_code(),
        "config": config_to_dict(config),
    }
    try:
        with contextlib.ExitStack() as stack:
            with clock.stage("preflight", "checking config, outputs, data, base model, Hub access"):
                checks = preflight(config, until, stack)
            backend = checks.backend
            summary["backend"] = {"name": backend.name, "reason": checks.backend_reason}
            summary["base"] = checks.base.as_dict()
            summary["reused"] = checks.reuse.describe()
            if checks.lora_targets is not None:
                summary["lora_targets"] = checks.lora_targets.as_dict()

            model, tokenizer, trained = train_stage(config, checks, clock)
            if trained is not None:
                summary.update(trained)
            if model is not None and backend.samples_after_training:
                summary["sample_after_training"] = sample_stage(
                    config, clock, backend, model, tokenizer
                )
            if until == "train":
                summary["status"] = "trained"
                return summary
            if not is_main_process():  # its share is done: wait for the main one's outcome
                _wait_for_main_process()
                summary["status"] = "succeeded"
                return summary

            facts = merge_stage(config, checks, clock, model, tokenizer)
            summary["merge"] = facts["merge"]
            summary["merged_dir"] = str(out / "merged")
            if not backend.pushes_merged(config):
                model = None  # freed before verification; a backend that pushes needs it
                gc.collect()
            prompts = [
                inference_prompt(config.data.format, p, tokenizer) for p in config.verify.prompts
            ]
            if config.verify.enabled:
                summary["verify"] = verify_stage(config, checks, clock, prompts, facts)
                summary["verify_max_abs_logit_diff"] = summary["verify"]["max_abs_logit_diff"]
            if config.data.test_size > 0 and config.method == "sft":
                summary["heldout"] = heldout_stage(config, checks, clock, facts)
            evaluation = evaluate_stage(config, checks, clock, facts) if config.evaluates else None
            if evaluation is not None:
                summary["evaluation"] = evaluation.as_dict()
            gate_stage(config, checks, clock, summary, evaluation)

            if config.export.exported:
                summary["exports"] = export_stage(config, checks, clock, tokenizer)

            target = checks.publish
            if target is not None:
                card_stage(config, checks, clock, summary, prompts[0], facts, evaluation)
                message = config.publish.commit_message or f"llm-finetune run {config.run_name}"
                if model is not None:
                    summary[f"{backend.name}_push"] = push_stage(
                        config, target, clock, backend, model, tokenizer, message, facts
                    )
                with (
                    clock.stage("publish", f"uploading to {target.repo_id} on {target.endpoint}"),
                    _rerun_hint(target),
                ):
                    summary["published"] = upload(
                        config,
                        target,
                        out / "merged",
                        target.repo_id,
                        f"{message}: merged_16bit ({config.merge.dtype})",
                        # after a backend's own push, our card replaces its generic one
                        config.publish.replace_readme or backend.pushes_merged(config),
                    )
                    if config.publish.adapter_repo_id and _passed(summary, LORA):
                        summary["published_adapter"] = upload(
                            config,
                            target,
                            out / "adapter",
                            config.publish.adapter_repo_id,
                            f"{message}: LoRA adapter",
                            config.publish.replace_readme,
                        )
                    summary["published_exports"] = publish_exports(
                        config, target, summary.get("exports", []), message
                    )
                if config.publish.load_back:
                    summary["load_back"] = load_back_stage(
                        config, target, clock, prompts[0], target.repo_id
                    )
                    if "gguf" in summary["published_exports"]:
                        summary["load_back_gguf"] = load_back_stage(
                            config,
                            target,
                            clock,
                            prompts[0],
                            config.export_repos()["gguf"],
                            smallest_gguf(summary["exports"]),
                        )
            summary["status"] = "succeeded"
            return summary
    except BaseException as exc:
        exit_code = exit_code_for(exc)
        summary["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        summary["failed_stage"] = clock.current
        summary["error"] = (
            str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        )
        if isinstance(exc, KeyboardInterrupt) and (out / "adapter").is_dir():
            log(f"interrupted during {clock.current}; the adapter is kept in {out / 'adapter'}")
        raise
    finally:
        if is_main_process():
            write_summary(out, summary)  # also for a failed run: it says where and why
            if until == "publish":
                announce_outcome(exit_code)
        if summary["status"] in ("succeeded", "trained"):
            print_table(summary)
            log(f"summary: {out / SUMMARY_FILE}")


def _this_code() -> dict[str, str | None]:
    """Which llm-finetune made the outputs: its version, and its commit in a checkout."""
    from llm_finetune import __version__

    return {"version": __version__, "commit": source_commit()}


def _wait_for_main_process() -> None:
    """A process other than the main one, after training: free the model's memory, then wait
    for the main process to merge, verify and publish, and share its outcome."""
    from llm_finetune.verify_memory import free_memory

    free_memory()
    exit_code = wait_for_main()
    if exit_code:
        raise OtherProcessFailed(exit_code)


def train_stage(
    config: Config, checks: Preflight, clock: StageClock
) -> tuple[Any, Any, dict[str, Any] | None]:
    """Load the model with LoRA, format the data, train (or reuse a finished adapter of this
    config); the adapter and its manifest are on disk afterwards. Returns the trained model
    (None when reused), the tokenizer, and the summary's training facts (None in processes
    other than the main one)."""
    from llm_finetune.backends.hf import load_tokenizer
    from llm_finetune.resume import prepare_checkpoints
    from llm_finetune.train import train, training_arguments

    out = config.output_path
    backend, base = checks.backend, checks.base
    if checks.reuse.adapter is not None:
        model, result = None, checks.reuse.adapter["train"]
        tokenizer = load_tokenizer(
            str(out / "adapter"), trust_remote_code=config.model.trust_remote_code
        )
    else:
        with clock.stage("load_model", f"loading {config.model.name} with LoRA ({backend.name})"):
            args = training_arguments(config, out / "checkpoints")  # starts the process group
            check_same_resume_point(checks.reuse.checkpoint)
            model, tokenizer = backend.load_for_training(config, base)
        with clock.stage("data", f"formatting {config.data.format} data"):
            splits = format_dataset(checks.raw_data, config.data, tokenizer)
            log("    first example: " + json.dumps(splits["train"][0])[:300])
        with clock.stage("train", f"{config.method.upper()} with trl"):
            if is_main_process():
                prepare_checkpoints(out / "checkpoints", config, base)
            trained = train(
                config,
                args,
                model,
                tokenizer,
                splits,
                out / "adapter",
                resume_from=checks.reuse.checkpoint,
            )
        if trained is None:  # not the main process
            return None, None, None
        result = trained.as_dict()
        fingerprint = train_fingerprint(config, base)
        write_manifest(out / "adapter", "adapter", fingerprint, train=result, base=base.as_dict())
    log(
        f"    adapter: {result['adapter_dir']} "
        f"(loss {result['train_loss_first']:.4g} -> {result['train_loss_last']:.4g})"
    )
    facts = {
        "train": result,
        "train_loss_first": result["train_loss_first"],
        "train_loss_last": result["train_loss_last"],
        "adapter_dir": result["adapter_dir"],
    }
    if result.get("eval_loss") is not None:
        facts["eval_loss_last"] = result["eval_loss"]
        facts["eval_loss_best"] = result.get("eval_loss_best")
    title = f"{config.run_name}: {config.method.upper()} of {config.model.name}"
    if plot_training(result.get("history", []), out / PLOT_FILE, title) is not None:
        facts["plot"] = str(out / PLOT_FILE)
        log(f"    curves: {out / PLOT_FILE}")
    return model, tokenizer, facts


def sample_stage(
    config: Config, clock: StageClock, backend: Backend, model: Any, tokenizer: Any
) -> dict[str, str]:
    """The trained model answers the first verify prompt (the handbook's look after training).
    A look, not a gate: the adapter is saved, and verification judges the merged model."""
    prompt = config.verify.prompts[0]
    with clock.stage("sample", "one generation from the trained model"):
        try:
            text = backend.sample(
                model,
                tokenizer,
                inference_prompt(config.data.format, prompt, tokenizer),
                config.verify.max_new_tokens,
            )
        except Exception as exc:
            log(f"    warning: the sample generation failed: {first_line(exc)}")
            return {"prompt": prompt, "error": first_line(exc)}
    log(f"    {prompt!r} -> {text!r}")
    return {"prompt": prompt, "generation": text}


def merge_stage(
    config: Config, checks: Preflight, clock: StageClock, model: Any, tokenizer: Any
) -> dict[str, Any]:
    """Merge (or reuse a finished merge of this config); returns the merged folder's facts."""
    out = config.output_path
    if checks.reuse.merged is not None:
        recorded = ("merge", "verify", "heldout", "evaluate")
        return {k: v for k, v in checks.reuse.merged.items() if k in recorded}
    with clock.stage("merge", f"merging into the 16-bit base ({config.merge.dtype})"):
        merged = checks.backend.save_merged(
            model, tokenizer, checks.base, out / "adapter", out / "merged", config
        )
        from llm_finetune.exports.prompt_format import training_chat_template, write_prompt_format

        for change in write_prompt_format(out / "merged", config.data.format):
            log(f"    prompt format: {change}")
        if tokenizer is not None:  # what a backend's own push saves: the same template
            tokenizer.chat_template = training_chat_template(config.data.format, tokenizer)
    facts = {"merge": merged}
    seal_merged(config, checks.base, facts)
    return facts


def seal_merged(config: Config, base: BaseModel, facts: dict[str, Any]) -> None:
    """(Re)write the merged folder's manifest after each change to it (merge, check, card)."""
    folder = config.output_path / "merged"
    write_manifest(folder, "merged", merge_fingerprint(config, base), base=base.as_dict(), **facts)


def verify_stage(
    config: Config,
    checks: Preflight,
    clock: StageClock,
    prompts: list[str],
    facts: dict[str, Any],
) -> dict[str, Any]:
    """The merged model against base+adapter (or the reused merge's recorded check)."""
    from llm_finetune.verify import check_cost, verify, verify_in_fresh_process

    out = config.output_path
    if "verify" not in facts:
        fresh = checks.backend.verifies_in_fresh_process
        check = verify_in_fresh_process if fresh else verify
        with clock.stage("verify", "merged model vs base+adapter on fixed prompts"):
            if fresh:
                log("    in a fresh process: stock transformers and peft, not the backend's")
            report = check(
                checks.base.path,
                out / "adapter",
                out / "merged",
                prompts,
                max_new_tokens=config.verify.max_new_tokens,
                revision=checks.base.revision,
                trust_remote_code=config.model.trust_remote_code,
                max_memory=config.verify.max_memory,
            )
        facts["verify"] = report.as_dict()
        seal_merged(config, checks.base, facts)
    result = facts["verify"]
    log(
        f"    max |Δlogit| {result['max_abs_logit_diff']:.3g} "
        f"(tolerance {result['tolerance']:.3g}), greedy generations agree "
        f"{result['generations_agree']}/{result['prompts']}, "
        f"adapter effect {result['adapter_effect_max_abs_logit_diff']:.3g}"
    )
    log(f"    sample: {config.verify.prompts[0]!r} -> {result['sample_generation']!r}")
    if "mode" in result:  # a merge checked before the mode was recorded has none
        log(f"    {check_cost(result)}")
    if result.get("rerouted_tokens"):  # a MoE: near-tied expert choices flipped by rounding
        log(
            f"    {result['rerouted_tokens']} prompt token(s) routed to other experts than by "
            f"base+adapter, left out of max |Δlogit| ({result['routing_agreement']:.1%} of the "
            "expert choices agree)"
        )
    if result["generations_agree"] < result["prompts"]:
        log("    warning: some greedy generations differ (near-tied logits after rounding)")
    if result["adapter_effect_max_abs_logit_diff"] <= result["tolerance"]:
        log("    warning: the adapter barely changes the model; was training effective?")
    return result


def export_stage(
    config: Config, checks: Preflight, clock: StageClock, tokenizer: Any
) -> list[dict[str, Any]]:
    """Every format of export.formats, written beside merged/ and checked against it."""
    from llm_finetune.exports.stage import export_all

    formats = ", ".join(config.export.formats)
    with clock.stage("export", f"writing and checking {formats} against the 16-bit merge"):
        out = config.output_path
        rows = export_all(config, checks.base, out / "merged", out, tokenizer)
    for row in rows:
        if not row["passed"]:
            why = "; ".join(row["problems"])
            log(f"    {display_name(row['format'])} REJECTED: {why} (not published)")
    return rows


def _passed(summary: dict[str, Any], fmt: str) -> bool:
    """Whether `fmt` passed its check; True for a format the run did not check."""
    return all(row["passed"] for row in summary.get("exports", []) if row["format"] == fmt)


def heldout_stage(
    config: Config, checks: Preflight, clock: StageClock, facts: dict[str, Any]
) -> dict[str, Any]:
    """The held-out loss and perplexity of the base and of the merged model on the same rows
    (or the reused merge's recorded ones). A fine-tune that made it worse is flagged; a
    measurement that fails is a warning: the merge is verified and the adapter is kept."""
    from llm_finetune.backends.hf import load_tokenizer
    from llm_finetune.heldout import HELDOUT_ROWS, compare, heldout_loss

    if "heldout" not in facts:
        merged = config.output_path / "merged"
        with clock.stage("heldout", "held-out loss of the base and the merged model"):
            try:
                tokenizer = load_tokenizer(str(merged))
                test = format_dataset(checks.raw_data, config.data, tokenizer)["test"]
                texts = test["text"][:HELDOUT_ROWS]
                measure = dict(
                    texts=texts, tokenizer=tokenizer, max_length=config.model.max_seq_length
                )
                before = heldout_loss(
                    checks.base.path,
                    revision=checks.base.revision,
                    trust_remote_code=config.model.trust_remote_code,
                    **measure,
                )
                after = heldout_loss(str(merged), **measure)
            except Exception as exc:
                log(f"    warning: the held-out loss could not be measured: {first_line(exc)}")
                return {"error": first_line(exc)}
        facts["heldout"] = compare(before, after)
        seal_merged(config, checks.base, facts)
    result = facts["heldout"]
    base, merged_loss = result["base"], result["merged"]
    log(
        f"    held-out loss ({result['rows']} rows): base {base['loss']:.4g} "
        f"(perplexity {base['perplexity']:.4g}) -> merged {merged_loss['loss']:.4g} "
        f"(perplexity {merged_loss['perplexity']:.4g})"
    )
    if result["worse"]:
        log(
            "    warning: fine-tuning made the held-out loss worse; check the learning rate, "
            "the steps and the data"
        )
    return result


def evaluate_stage(
    config: Config, checks: Preflight, clock: StageClock, facts: dict[str, Any]
) -> Evaluation:
    """The base's and the merged model's greedy answers to the held-out prompts, scored (or
    the reused merge's recorded evaluation, when evaluated with the same settings)."""
    from llm_finetune.backends.hf import load_tokenizer
    from llm_finetune.evaluate import Evaluation, choose_metric, evaluate, evaluation_rows

    settings = config.evaluate.model_dump(
        mode="json", exclude={"gate", "min_score", "lm_eval_max_drop"}
    )
    recorded = facts.get("evaluate")
    if recorded is not None and recorded.get("settings") == settings:
        evaluation = Evaluation.from_dict(recorded["result"])
    else:
        merged = config.output_path / "merged"
        tokenizer = load_tokenizer(str(merged))
        rows, source = evaluation_rows(config, checks.raw_data, checks.eval_data, tokenizer)
        metric = choose_metric(config.evaluate.metric, config.method, [r.expected for r in rows])
        what = f"{len(rows)} held-out prompts answered by the base and the merged model"
        with clock.stage("evaluate", what):
            evaluation = evaluate(
                checks.base.path,
                str(merged),
                rows,
                tokenizer,
                metric=metric,
                source=source,
                max_new_tokens=config.evaluate.max_new_tokens,
                batch_size=config.evaluate.batch_size,
                base_revision=checks.base.revision,
                trust_remote_code=config.model.trust_remote_code,
                lm_eval=config.evaluate,
            )
        facts["evaluate"] = {"settings": settings, "result": evaluation.as_dict()}
        seal_merged(config, checks.base, facts)
    base, merged_score = evaluation.base.score, evaluation.merged.score
    log(
        f"    {evaluation.metric_name} on {evaluation.rows} held-out rows: "
        f"base {base:.1%} -> merged {merged_score:.1%}"
    )
    for task, before in evaluation.base.lm_eval.items():
        after = evaluation.merged.lm_eval.get(task, {})
        shown = ", ".join(
            f"{k} {before[k]:.4g} -> {after.get(k, float('nan')):.4g}" for k in before
        )
        log(f"    lm-eval {task}: {shown}")
    for sample in evaluation.samples[:3]:
        log(
            f"    {sample['prompt']!r} -> {sample['merged']!r} "
            f"(expected {sample['expected']!r}; base {sample['base']!r})"
        )
    return evaluation


def gate_stage(
    config: Config,
    checks: Preflight,
    clock: StageClock,
    summary: dict[str, Any],
    evaluation: Evaluation | None,
) -> None:
    """Publish only what validation confirms: the run's measurements against the base's, and
    against the score the target repo's card records on the same rows. A refusal raises
    NotConfirmed (exit code 3) with nothing published; the summary says which check failed."""
    from llm_finetune.gate import enforce, published_scores_at, verdict_for

    out, target = config.output_path, checks.publish
    with clock.stage("gate", "publish only what validation confirms"):
        published = {}
        if target is not None and evaluation is not None:
            published = published_scores_at(target, config.publish.revision)
        verdict = verdict_for(summary.get("heldout"), evaluation, config.evaluate, published)
        summary["gate"] = verdict.as_dict()
        kept = f"the adapter ({out / 'adapter'}) and the merged model ({out / 'merged'})"
        for line in verdict.lines():  # logged before a refusal: which check failed
            log(f"    {line}")
        for line in enforce(verdict, kept, config.publish.replace_better):
            log(f"    {line}")


def card_stage(
    config: Config,
    checks: Preflight,
    clock: StageClock,
    summary: dict[str, Any],
    prompt: str,
    facts: dict[str, Any],
    evaluation: Evaluation | None,
) -> None:
    """README.md in the merged folder: the run's settings and measured results."""
    from llm_finetune.card import card_rows, write_model_card

    target = checks.publish
    assert target is not None
    with clock.stage("model_card", "writing README.md"):
        training_rows, metric_rows = card_rows(config, checks.base, checks.backend.name, summary)
        if "plot" in summary:  # published beside the card, which shows it
            shutil.copyfile(summary["plot"], config.output_path / "merged" / PLOT_FILE)
        write_model_card(
            config.output_path / "merged",
            repo_id=target.repo_id,
            base_model=config.model.name,
            datasets=[d.path for d in config.data.datasets],
            method=config.method,
            dtype=config.merge.dtype,
            license=config.publish.license,
            tags=config.publish.tags,
            training_rows=training_rows,
            metric_rows=metric_rows,
            usage_prompt=prompt,
            exports=summary.get("exports"),
            plot_file=PLOT_FILE if "plot" in summary else None,
            heldout=summary.get("heldout"),
            evaluation=evaluation,
        )
        seal_merged(config, checks.base, facts)


def push_stage(
    config: Config,
    target: PublishTarget,
    clock: StageClock,
    backend: Backend,
    model: Any,
    tokenizer: Any,
    message: str,
    facts: dict[str, Any],
) -> dict[str, Any]:
    """The backend's own push from the trained model (Unsloth: the handbook's
    `model.push_to_hub_merged(repo_id, tokenizer, "merged_16bit")`)."""
    with clock.stage(f"{backend.name}_push", f"{backend.name} pushes to {target.repo_id!r}"):
        pushed = backend.push_merged(
            model,
            tokenizer,
            target,
            config,
            message,
            config.output_path / PUSH_STAGING,
            facts["merge"],
        )
    log(f"    {backend.name} pushed {len(pushed['files'])} files ({pushed['code_path']})")
    return pushed


@contextlib.contextmanager
def _rerun_hint(target: PublishTarget) -> Iterator[None]:
    """A publish error names a command to resume it; for the run's own local server, which
    stops with the run, re-running the run is the way (finished stages are reused)."""
    try:
        yield
    except UserError as exc:
        if target.server is None:
            raise
        reason = str(exc).split("; Re-run", 1)[0].split(". Re-run", 1)[0]
        raise UserError(
            f"{reason}; run the same command again: finished stages are reused and only "
            "missing files are sent"
        ) from None


def upload(
    config: Config,
    target: PublishTarget,
    folder: Path,
    repo_id: str,
    commit_message: str,
    replace_readme: bool,
) -> dict[str, Any]:
    """One folder as one commit; files the branch already holds are not sent again, and every
    file's hash is checked on the server afterwards."""
    from llm_finetune.publish import publish

    published = publish(
        folder,
        repo_id,
        target.endpoint,
        target.token,
        private=config.publish.private,
        revision=config.publish.revision,
        commit_message=commit_message,
        replace_readme=replace_readme,
    )
    state = f"commit {published.commit}" if published.committed else "already up to date"
    kept = f"{len(published.unchanged)} already there"
    log(f"    {state}, {len(published.files)} files ({kept}): {published.url}")
    if published.readme_kept:
        log("    kept the repo's own README.md (publish.replace_readme: true replaces it)")
    return published.as_dict()


def publish_exports(
    config: Config, target: PublishTarget, rows: list[dict[str, Any]], message: str
) -> dict[str, Any]:
    """Each exported kind that passed its check to its own repo, with a card of its own (the
    GGUF repo also with the Ollama files); a kind with nothing that passed is not published."""
    from llm_finetune.card import write_export_card
    from llm_finetune.exports.stage import publish_folder, seal_export
    from llm_finetune.manifest import read_manifest

    published = {}
    for kind, repo_id in config.export_repos().items():
        folder = publish_folder(config.output_path, kind)
        if not any(r["passed"] and kind_of(r["format"]) == kind for r in rows):
            log(f"    {kind}: nothing passed its check, {repo_id} is not published")
            continue
        write_export_card(folder, kind, repo_id, config, target.repo_id, rows)
        seal_export(config.output_path, kind, read_manifest(folder)["inputs_fingerprint"], rows)
        published[kind] = upload(
            config, target, folder, repo_id, f"{message}: {kind}", config.publish.replace_readme
        )
    return published


def load_back_stage(
    config: Config,
    target: PublishTarget,
    clock: StageClock,
    prompt: str,
    repo_id: str,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """The published model, downloaded by repo id in a fresh process, answers a prompt: with
    plain transformers, or for `gguf_file` (a file of a GGUF repo) in llama.cpp."""
    from llm_finetune.loadback import load_back

    stage, how = ("load_back", f"from_pretrained({repo_id!r})")
    if gguf_file is not None:
        stage, how = ("load_back_gguf", f"{repo_id}:{gguf_file} in llama.cpp")
    with clock.stage(stage, f"{how} in a fresh process"):
        loaded = load_back(
            repo_id,
            config.publish.revision,
            target.endpoint,
            prompt,
            token=target.token if config.publish.private else None,
            max_new_tokens=config.verify.max_new_tokens,
            gguf_file=gguf_file,
        )
    log(f"    {repo_id}{f':{gguf_file}' if gguf_file else ''} answers: {loaded['generation']!r}")
    return loaded


def smallest_gguf(rows: list[dict[str, Any]]) -> str:
    """The name of the smallest GGUF file that passed its check: the one loaded back."""
    ggufs = [r for r in rows if r["passed"] and is_gguf(r["format"])]
    return Path(min(ggufs, key=lambda r: r["bytes"])["files"][0]).name
