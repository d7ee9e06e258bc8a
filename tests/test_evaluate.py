"""The evaluation stage and the gate on publishing: metrics on known answers, the rows each
format yields, the card's model-index read back, and refusals that publish nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_finetune.config import EvaluateConfig
from llm_finetune.errors import EXIT_NOT_CONFIRMED, NotConfirmed
from llm_finetune.evaluate import (
    EXACT_MATCH,
    PREFERENCE,
    ROUGE_L,
    EvalRow,
    Evaluation,
    ModelAnswers,
    choose_metric,
    eval_rows,
    exact_match,
    normalise,
    rouge_l,
    rows_fingerprint,
)
from llm_finetune.gate import Check, Verdict, enforce, published_check, validation_checks
from tests.conftest import GOOD_TOKEN, REPO_ROOT, tiny_config

DEMO = REPO_ROOT / "configs" / "tiny-llama" / "sft.yaml"


def test_exact_match_ignores_case_whitespace_quotes_and_final_punctuation():
    assert normalise('  "Forty-Seven."  ') == "forty-seven"
    assert normalise("twenty\n one!") == "twenty one"
    predictions = ["Forty-seven.", "twelve", "ninety  nine", "", "forty-seven and more"]
    references = ["forty-seven", "twenty-one", "ninety nine", "zero", "forty-seven"]
    assert exact_match(predictions, references) == pytest.approx(2 / 5)
    assert exact_match([], []) == 0.0


def test_rouge_l_scores_word_overlap_with_the_rouge_score_library():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["completely different words"], ["the cat sat"]) == 0.0
    # LCS "cat sat on mat" (4 of 6 words each way): F1 = 4/6.
    partial = rouge_l(["a cat sat on a mat"], ["the cat sat on the mat"])
    assert partial == pytest.approx(4 / 6)


def test_the_metric_follows_the_answers_length_unless_configured():
    short, long = ["forty-seven", "one"], ["a paragraph " * 10, "another long answer " * 5]
    assert choose_metric("auto", "sft", short) == EXACT_MATCH
    assert choose_metric("auto", "sft", long) == ROUGE_L
    assert choose_metric("rouge_l", "sft", short) == ROUGE_L
    assert choose_metric("auto", "dpo", short) == PREFERENCE


def test_each_data_format_yields_prompts_in_the_training_format_and_the_answer():
    from llm_finetune.data import alpaca_prompt
    from llm_finetune.demo import build_tokenizer

    tokenizer = build_tokenizer()
    alpaca = [{"instruction": "Write 4 in words.", "input": "", "output": "four"}] * 3
    rows = eval_rows(alpaca, "alpaca", tokenizer, limit=2)
    assert rows == [EvalRow("Write 4 in words.", alpaca_prompt("Write 4 in words."), "four")] * 2
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "no answer to score"}]},
    ]
    (row,) = eval_rows(chat, "chat", tokenizer, limit=5)
    assert (row.instruction, row.expected) == ("hi", "yo")
    assert row.prompt.endswith("<|assistant|>\n") and "hi" in row.prompt
    dpo = [{"prompt": "Write 1 in words.", "chosen": "one", "rejected": "two"}]
    (pair,) = eval_rows(dpo, "dpo", tokenizer, limit=5)
    assert (pair.expected, pair.rejected) == ("one", "two")
    assert rows_fingerprint(rows) != rows_fingerprint([pair])


def _evaluation(base: float, merged: float, fingerprint: str = "f" * 16) -> Evaluation:
    return Evaluation(
        metric=EXACT_MATCH,
        rows=40,
        rows_fingerprint=fingerprint,
        source="the held-out split",
        base=ModelAnswers(base, [], 1.0),
        merged=ModelAnswers(merged, [], 1.0),
    )


HELDOUT = {"rows": 40, "base": {"loss": 7.0}, "merged": {"loss": 0.3}}


def test_the_gate_passes_a_model_better_than_its_base():
    checks = validation_checks(HELDOUT, _evaluation(0.0, 0.95), EvaluateConfig())
    assert [(c.name, c.passed) for c in checks] == [("held-out loss", True), ("exact match", True)]
    assert enforce(Verdict(checks, True), "the adapter", replace_better=False) == []


def test_the_gate_refuses_a_worse_model_in_one_line_with_the_numbers():
    worse = {"rows": 40, "base": {"loss": 2.0}, "merged": {"loss": 2.5}}
    checks = validation_checks(worse, _evaluation(0.5, 0.25), EvaluateConfig())
    with pytest.raises(NotConfirmed) as refused:
        enforce(Verdict(checks, True), "the adapter (a) and the merged model (m)", False)
    message = str(refused.value)
    assert "\n" not in message and refused.value.exit_code == EXIT_NOT_CONFIRMED == 3
    assert "held-out loss 2.5 is not below the base's 2 (+0.5)" in message
    assert "exact match 0.25 is below the base's 0.5 (-0.25)" in message
    assert "the adapter (a) and the merged model (m) are kept" in message
    assert "evaluate.gate: false" in message


def test_a_threshold_replaces_the_base_and_nan_never_passes():
    (_, metric) = validation_checks(HELDOUT, _evaluation(0.0, 0.9), EvaluateConfig(min_score=0.95))
    assert (metric.against, metric.passed) == ("evaluate.min_score", False)
    nan = {"rows": 40, "base": {"loss": 7.0}, "merged": {"loss": float("nan")}}
    assert not validation_checks(nan, None, EvaluateConfig())[0].passed


def test_with_the_gate_off_a_failure_is_a_warning():
    checks = validation_checks(HELDOUT, _evaluation(0.5, 0.25), EvaluateConfig())
    lines = enforce(Verdict(checks, False), "kept", replace_better=False)
    assert lines == [
        "warning: exact match 0.25 is below the base's 0.5 (-0.25) "
        "(not enforced: the config allows it)"
    ]


def test_a_held_out_loss_that_could_not_be_measured_confirms_nothing():
    from llm_finetune.gate import verdict_for

    failed = {"error": "CUDA out of memory"}
    verdict = verdict_for(failed, _evaluation(0.0, 0.9), EvaluateConfig(), {})
    assert not verdict.passed and verdict.as_dict()["unmeasured"] == "CUDA out of memory"
    with pytest.raises(NotConfirmed, match=r"could not measure the held-out loss \(CUDA out"):
        enforce(verdict, "kept", replace_better=False)
    off = verdict_for(failed, None, EvaluateConfig(gate=False), {})
    assert enforce(off, "kept", replace_better=False) == [
        "warning: no held-out loss (CUDA out of memory); not enforced",
        "warning: nothing confirms the model: no held-out rows were measured",
    ]


def test_a_better_published_model_is_compared_only_on_the_same_rows_and_metric():
    evaluation = _evaluation(0.0, 0.8, fingerprint="abc")
    assert published_check(evaluation, {"exact_match@other": 0.9}) is None
    assert published_check(evaluation, {"rouge_l@abc": 0.9}) is None
    check = published_check(evaluation, {"exact_match@abc": 0.9})
    assert check == Check("exact match", 0.8, 0.9, "the published model's", True)
    with pytest.raises(NotConfirmed, match="publish.replace_better: true publishes over it"):
        enforce(Verdict([check], True), "kept", replace_better=False)
    assert enforce(Verdict([check], True), "kept", replace_better=True)[0].startswith(
        "warning: exact match 0.8 is below the published model's 0.9"
    )


def _card(folder: Path, evaluation: Evaluation, heldout=HELDOUT, tags=()) -> Path:
    from llm_finetune.card import write_model_card
    from llm_finetune.demo import build_tiny_llama  # noqa: F401  (the card reads config.json)

    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    evaluation.samples = [
        {"prompt": "Write 47 | words", "expected": "forty-seven", "base": "\x0e?", "merged": ""}
    ]
    return write_model_card(
        folder,
        repo_id="alice/demo",
        base_model="builtin:tiny-llama",
        datasets=["builtin:number-words"],
        method="sft",
        dtype="bfloat16",
        license="apache-2.0",
        tags=list(tags),
        training_rows=[],
        metric_rows=[],
        usage_prompt="Write the number 47 in words.",
        heldout={
            **heldout,
            "base": {"loss": 7.0, "perplexity": 1e3, "tokens": 9},
            "merged": {"loss": 0.3, "perplexity": 1.35, "tokens": 9},
        },
        evaluation=evaluation,
    )


def test_the_cards_model_index_is_read_back_by_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard

    from llm_finetune.card import HELD_OUT_DATASET_TYPE, published_scores

    readme = _card(tmp_path, _evaluation(0.0, 0.975, fingerprint="abc"))
    results = ModelCard.load(readme).data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [
        ("exact_match", 0.975),
        ("loss", 0.3),
    ]
    assert {(r.dataset_type, r.dataset_revision, r.task_type) for r in results} == {
        (HELD_OUT_DATASET_TYPE, "abc", "text-generation")
    }
    assert published_scores(readme) == {"exact_match@abc": 0.975, "loss@abc": 0.3}
    text = readme.read_text()
    assert "| exact match | 0.0 | 0.975 |" in text
    # Sample answers, one table row each: pipes escaped, control characters shown, "" named.
    assert "| Write 47 \\| words | forty-seven | \ufffd? | (empty) |" in text
    # Another tool's card, or none, records nothing comparable.
    other = tmp_path / "other.md"
    other.write_text(text.replace("- llm-finetune\n", ""))
    assert published_scores(other) == {}
    (tmp_path / "plain.md").write_text("# just text\n")
    assert published_scores(tmp_path / "plain.md") == {}


def test_a_run_does_not_publish_over_a_better_model_on_the_hub(hub, tmp_path, monkeypatch):
    """The gate reads the target repo's card: a better score on the same rows is refused, a
    worse one or another row set is not, and publish.replace_better allows it."""
    from llm_finetune import pipeline
    from llm_finetune.hub import PublishTarget
    from llm_finetune.publish import publish
    from llm_finetune.runlog import StageClock

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    target = PublishTarget("alice/demo", hub.url, GOOD_TOKEN)
    data = {"datasets": [{"path": "builtin:number-words"}], "test_size": 0.1}
    config = tiny_config(tmp_path, data=data, publish={"enabled": True, "repo_id": "alice/demo"})
    checks = type("Checks", (), {"publish": target})()
    new = _evaluation(0.0, 0.9, fingerprint="abc")
    summary = {"heldout": dict(HELDOUT)}

    def gate(evaluation: Evaluation, config=config) -> dict:
        pipeline.gate_stage(config, checks, StageClock(), summary, evaluation)
        return summary["gate"]

    assert len(gate(new)["checks"]) == 2  # a first publish: nothing to compare with
    folder = tmp_path / "published"
    folder.mkdir()
    _card(folder, _evaluation(0.0, 0.95, fingerprint="abc"))
    (folder / "model.safetensors").write_bytes(b"weights")
    publish(folder, "alice/demo", hub.url, GOOD_TOKEN, kind="model", replace_readme=True)
    with pytest.raises(NotConfirmed) as refused:
        gate(new)
    assert "exact match 0.9 is below the published model's 0.95 (-0.05)" in str(refused.value)
    assert summary["gate"]["passed"] is False
    assert gate(_evaluation(0.0, 0.95, fingerprint="abc"))["passed"]  # a tie is no worse
    assert gate(_evaluation(0.0, 0.5, fingerprint="other-rows"))["passed"]
    allowed = tiny_config(
        tmp_path,
        data=data,
        publish={"enabled": True, "repo_id": "alice/demo", "replace_better": True},
    )
    assert gate(new, config=allowed)["passed"] is False  # recorded, and published anyway


def test_a_config_that_publishes_without_held_out_rows_is_refused_before_any_work(tmp_path):
    from llm_finetune.config import load_config
    from llm_finetune.errors import UserError

    with pytest.raises(UserError, match="evaluate.gate publishes only what the held-out rows"):
        load_config(DEMO, ["data.test_size=0"])
    assert not load_config(DEMO, ["data.test_size=0", "evaluate.gate=false"]).evaluates
    assert load_config(DEMO, ["data.test_size=0", "publish.enabled=false"])


@pytest.mark.slow
def test_a_wrecked_fine_tune_publishes_nothing_and_keeps_what_it_trained(
    hub, tmp_path, monkeypatch, capsys, trained_adapter
):
    """A learning rate that wrecks a fine-tune of a model that already knows the task (the
    demo's base merged with a trained adapter): the run exits 3 with one line naming the
    failed checks, nothing reaches the Hub, and the adapter and the merged model stay on disk.
    (The random demo base itself cannot be made worse: it predicts worse than uniform.)"""
    from huggingface_hub import HfApi

    from llm_finetune.cli import main
    from llm_finetune.merge import merge

    _, base, adapter, _ = trained_adapter
    merge(base, adapter, tmp_path / "good", dtype="bfloat16")

    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    out = tmp_path / "out"
    code = main(
        [
            "run",
            str(DEMO),
            f"output_dir={out}",
            f"publish.endpoint={hub.url}",
            "publish.repo_id=alice/wrecked",
            "export.formats=[merged_16bit]",
            f"model.name={tmp_path / 'good'}",
            "training.max_steps=6",
            "training.warmup_steps=0",
            "training.learning_rate=2000",
        ]
    )
    assert code == EXIT_NOT_CONFIRMED
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("error: validation did not confirm the model: held-out loss")
    assert "Traceback" not in "\n".join(errors)
    summary = json.loads((out / "run-summary.json").read_text())
    assert (summary["status"], summary["failed_stage"]) == ("failed", "gate")
    failed = [c["name"] for c in summary["gate"]["checks"] if not c["passed"]]
    assert failed == ["held-out loss", "exact match"]
    assert summary["evaluation"]["base"]["score"] > summary["evaluation"]["merged"]["score"]
    assert summary["evaluation"]["rows"] == 40 and "published" not in summary
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    files = HfApi(endpoint=hub.url, token=GOOD_TOKEN).list_repo_files("alice/wrecked")
    assert files == [".gitattributes"] or files == []  # created by the preflight, nothing sent


NUMBER_TASK = """task: number_words_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Write the number {{{{number}}}} in words.\\n"
doc_to_target: label
doc_to_choice: choices
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _local_task(folder: Path) -> Path:
    """An lm-eval multiple-choice task of our own, its YAML and data written here."""
    words = ["zero", "one", "two", "three", "four", "five"]
    data = folder / "numbers.jsonl"
    rows = [
        {"number": n, "choices": [words[n], words[(n + 1) % 6], words[(n + 2) % 6]], "label": 0}
        for n in range(6)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "number_words_mc.yaml").write_text(NUMBER_TASK.format(data=data))
    return folder


def test_lm_eval_runs_a_local_task_on_the_loaded_model_and_the_gate_holds_it(
    tiny_base, tmp_path, monkeypatch
):
    """The harness's Python API on a model loaded once: a task YAML and data file written
    here (nothing downloaded, HF_HUB_OFFLINE=1); its score goes into the gate and the card."""
    pytest.importorskip("lm_eval")
    from llm_finetune.backends.hf import load_tokenizer
    from llm_finetune.evaluate import score_model
    from llm_finetune.general_ability import check_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    settings = EvaluateConfig(
        lm_eval_tasks=["number_words_mc"], lm_eval_include_path=str(_local_task(tmp_path))
    )
    assert check_tasks(settings) == "lm-eval tasks: number_words_mc (1 loaded)"
    tokenizer = load_tokenizer(tiny_base)
    rows = [EvalRow("x", "Write the number 4 in words.\n", "four")]
    scored = score_model(
        tiny_base,
        rows,
        tokenizer,
        EXACT_MATCH,
        max_new_tokens=2,
        batch_size=4,
        what="base",
        lm_eval=settings,
    )
    accuracy = scored.lm_eval["number_words_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and accuracy * 6 == round(accuracy * 6)
    evaluation = _evaluation(0.0, 0.5)
    evaluation.base.lm_eval = {"number_words_mc": {"acc,none": 0.5}}
    evaluation.merged.lm_eval = {"number_words_mc": {"acc,none": 1 / 3}}
    checks = validation_checks(None, evaluation, settings)
    assert (
        checks[-1].problem() == "number_words_mc acc,none 0.3333 is below the base's 0.5 (-0.1667)"
    )
    tolerant = settings.model_copy(update={"lm_eval_max_drop": 0.2})
    assert validation_checks(None, evaluation, tolerant)[-1].passed
    (tmp_path / "card").mkdir()
    readme = _card(tmp_path / "card", evaluation)
    from huggingface_hub import ModelCard

    results = ModelCard.load(readme).data.eval_results
    assert ("number_words_mc", "acc", 1 / 3) in {
        (r.dataset_type, r.metric_type, r.metric_value) for r in results
    }
    assert "| lm-eval number_words_mc: acc,none | 0.5 | 0.3333333333333333 |" in readme.read_text()


def test_lm_eval_tasks_that_cannot_run_are_refused_before_training(tmp_path):
    pytest.importorskip("lm_eval")
    from llm_finetune.errors import UserError
    from llm_finetune.general_ability import check_tasks

    with pytest.raises(UserError, match="is not a folder of lm-eval task YAML"):
        check_tasks(EvaluateConfig(lm_eval_tasks=["x"], lm_eval_include_path=str(tmp_path / "no")))
    folder = _local_task(tmp_path)
    with pytest.raises(UserError, match="lm-eval knows no task 'number_wrods_mc'"):
        check_tasks(
            EvaluateConfig(lm_eval_tasks=["number_wrods_mc"], lm_eval_include_path=str(folder))
        )
    (folder / "numbers.jsonl").unlink()
    with pytest.raises(UserError, match="lm-eval cannot load the tasks' data"):
        check_tasks(
            EvaluateConfig(lm_eval_tasks=["number_words_mc"], lm_eval_include_path=str(folder))
        )


def test_dpo_rows_are_scored_by_which_answer_each_model_prefers(tiny_base):
    """log p(answer | prompt) summed over the answer's tokens and EOS, checked against the
    same sum taken one next-token prediction at a time; the model prefers its own greedy
    answer to another text, and so does "the merged model" (here the same weights)."""
    import torch

    from llm_finetune.backends.hf import load_tokenizer
    from llm_finetune.data import alpaca_prompt
    from llm_finetune.evaluate import answer_log_probs, evaluate, load_for_evaluation

    tokenizer = load_tokenizer(tiny_base)
    model = load_for_evaluation(tiny_base, None, False)
    prompt = alpaca_prompt("Write the number 4 in words.")
    ids = tokenizer(prompt, return_tensors="pt")
    greedy = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    own = tokenizer.decode(greedy[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    (scored,) = answer_log_probs(model, tokenizer, [prompt], [own], "test")
    sequence = tokenizer(prompt)["input_ids"]
    answer = tokenizer(own + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    expected = 0.0
    with torch.no_grad():
        for token in answer:
            logits = model(input_ids=torch.tensor([sequence])).logits[0, -1]
            expected += float(logits.log_softmax(-1)[token])
            sequence = [*sequence, token]
    assert scored == pytest.approx(expected, abs=1e-4)

    rows = [EvalRow("4", prompt, own, rejected="zebra quantum"), EvalRow("4", prompt, own, own)]
    evaluation = evaluate(tiny_base, tiny_base, rows, tokenizer, metric=PREFERENCE, source="pairs")
    # A tie (the same answer twice) is no preference: 1 of 2 rows.
    assert evaluation.base.score == evaluation.merged.score == 0.5
    assert evaluation.merged.margin > 0 and evaluation.merged.answers == []
