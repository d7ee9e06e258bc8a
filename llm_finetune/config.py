"""The YAML schema: validated in full before any model, dataset or heavy library is touched.

Only pydantic and yaml are imported here, so `llm-finetune validate` answers in a fraction
of a second and a typo never costs a GPU minute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llm_finetune.errors import UserError
from llm_finetune.exports.formats import (
    FP32,
    GGUF_TYPES,
    MERGED_4BIT,
    MERGED_16BIT,
    unknown_format_error,
)

DEFAULT_VERIFY_PROMPT = "Write a paragraph to introduce supervised fine-tuning."


class _Strict(BaseModel):
    # coerce_numbers_to_str: `model.revision=20240101` on the command line is a string.
    # use_attribute_docstrings: a field's docstring is its description in configs/schema.json.
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        coerce_numbers_to_str=True,
        use_attribute_docstrings=True,
    )


PositiveFloat = Annotated[float, Field(gt=0)]
# Experiment trackers by trl/transformers' names (TrainingArguments.report_to).
Tracker = Literal["tensorboard", "wandb", "comet_ml", "mlflow", "trackio", "none"]


class ModelConfig(_Strict):
    """The base model to fine-tune."""

    name: str = Field(min_length=1)
    """Hub id, local folder, or builtin:tiny-llama."""
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_seq_length: int = Field(2048, ge=8)
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None


class LoraConfig(_Strict):
    """The LoRA adapter: rank, scale (alpha/r), dropout and the modules it wraps."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class DatasetSource(_Strict):
    """One dataset: a local file (json/jsonl/csv/parquet), a Hub name, or builtin:<name>."""

    path: str = Field(min_length=1)
    split: str = "train"
    name: str | None = None
    """Hub dataset config name."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Our column name -> the file's column name, e.g. {output: answer}."""


class DataConfig(_Strict):
    """The training data: its sources, their format and the held-out split."""

    datasets: list[DatasetSource] = Field(min_length=1)
    format: Literal["alpaca", "chat", "dpo"] = "alpaca"
    test_size: float = Field(0.0, ge=0, lt=1)
    max_samples: int | None = Field(None, ge=1)
    shuffle_seed: int = 0


class TrainingConfig(_Strict):
    """The trainer's settings (transformers / trl names)."""

    learning_rate: PositiveFloat = 3e-4
    num_train_epochs: PositiveFloat = 3
    max_steps: int = Field(-1, ge=-1)
    per_device_train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    optim: str = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler_type: str = "linear"
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1)
    """A trainer checkpoint every N steps: a re-run resumes from the last one."""
    packing: bool = False
    gradient_checkpointing: bool = False
    beta: PositiveFloat = 0.1
    """DPO only: the strength of the preference loss."""
    max_length: int | None = Field(None, ge=8)
    """DPO only: the longest prompt + answer, in tokens."""
    max_prompt_length: int | None = Field(None, ge=1)
    """DPO only: longer prompts keep their end."""
    report_to: list[Tracker] = Field(default_factory=lambda: ["tensorboard"], min_length=1)
    """Where the curves go: tensorboard writes into <output_dir>/tensorboard."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate every N steps, with data.test_size > 0; null: every logging_steps."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _none_is_alone(self) -> TrainingConfig:
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(
                f"training.report_to: 'none' cannot be combined with trackers, got {self.report_to}"
            )
        return self


class MergeConfig(_Strict):
    """The merge of the adapter into the 16-bit base ("merged_16bit")."""

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


MEMORY_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)
MEMORY_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
MEMORY_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def memory_size(text: str) -> int:
    """Bytes in a size such as "24GB", "1.5GiB" or "800MB" (accelerate's notation)."""
    match = MEMORY_SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a memory size such as '24GB', '1.5GiB' or '800MB'")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])


class VerifyConfig(_Strict):
    """The merge check: the merged model against base + adapter, on the prompts."""

    enabled: bool = True
    prompts: list[str] = Field(default_factory=lambda: [DEFAULT_VERIFY_PROMPT])
    max_new_tokens: int = Field(32, ge=1)
    max_memory: str | None = None
    """The most memory (GPUs and RAM together) the check may hold, e.g. "24GB"; null: what the
    machine has free. Below what the whole model needs, it runs with bounded memory."""

    @model_validator(mode="after")
    def _max_memory_is_a_size(self) -> VerifyConfig:
        if self.max_memory is not None:
            memory_size(self.max_memory)
        return self


class EvaluateConfig(_Strict):
    """Whether the fine-tune answers better: the base and the merged model answer held-out
    prompts greedily, scored against the expected answers; and the gate on publishing."""

    enabled: bool = True
    dataset: DatasetSource | None = None
    """Rows to evaluate on, in data.format; null: the held-out split (data.test_size)."""
    max_rows: int = Field(64, ge=1)
    """Only the first N rows are evaluated: what bounds the stage's cost."""
    metric: Literal["auto", "exact_match", "rouge_l"] = "auto"
    """auto: exact_match (case, whitespace and final punctuation aside) when the median
    expected answer has at most 8 words, else rouge_l. DPO always measures how often the model
    prefers the chosen answer to the rejected one."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Greedy tokens per answer; null: the longest expected answer's plus 8 (at most 512)."""
    batch_size: int = Field(16, ge=1)
    gate: bool = True
    """Publish only what validation confirms: held-out loss below the base's and the metric
    at least the base's (or min_score). Off: the verdict is logged, and publishing goes on."""
    min_score: float | None = Field(None, ge=0, le=1)
    """The merged model's metric must reach this instead of the base's."""
    lm_eval_tasks: list[str] = Field(default_factory=list)
    """lm-evaluation-harness tasks run on the base and the merged model, e.g. [arc_easy,
    hellaswag] (pip install -e '.[eval]'); the gate holds each to the base's score."""
    lm_eval_limit: int | None = Field(None, ge=1)
    """Documents per lm-eval task; null: all of them."""
    lm_eval_include_path: str | None = None
    """A folder of your own lm-eval task YAML files."""
    lm_eval_max_drop: float = Field(0.0, ge=0, le=1)
    """How far below the base's an lm-eval task's score may fall and still pass the gate."""


class PublishConfig(_Strict):
    """Where the merged model is published: the Hub or a Hub-compatible server."""

    enabled: bool = False
    repo_id: str | None = None
    endpoint: str | None = None
    """null: the Hub (or HF_ENDPOINT); "local": a Hub-compatible server started on 127.0.0.1
    for this run; otherwise the URL of a Hub-compatible server."""
    private: bool = False
    revision: str = "main"
    commit_message: str | None = None
    license: str | None = None
    tags: list[str] = Field(default_factory=list)
    load_back: bool = True
    """Download the published model by repo id and generate from it."""
    replace_readme: bool = False
    """An existing repo's README.md is kept unless this is true."""
    adapter_repo_id: str | None = None
    """Also publish the LoRA adapter itself, to this repo."""
    replace_better: bool = False
    """Publish over a model of this project at repo_id whose card records a better score on
    the same held-out rows (by default such a run publishes nothing)."""

    @model_validator(mode="after")
    def _repo_id_when_enabled(self) -> PublishConfig:
        if self.enabled and not self.repo_id:
            raise ValueError("publish.repo_id is required when publish.enabled is true")
        for key in ("repo_id", "adapter_repo_id"):
            value = getattr(self, key)
            if self.enabled and value and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
                raise ValueError(f"publish.{key} must look like 'namespace/name', got {value!r}")
        if self.endpoint not in (None, "local") and not re.match(r"https?://", self.endpoint):
            raise ValueError(
                f"publish.endpoint must be 'local' or an http(s):// URL, got {self.endpoint!r}"
            )
        return self


class ExportLimits(_Strict):
    """A format's own limits, replacing its defaults (exports/formats.py DEFAULT_LIMITS)."""

    kl: float | None = Field(None, ge=0)
    top1: float | None = Field(None, ge=0, le=1)
    stops_at_eos: bool | None = None


class ExportConfig(_Strict):
    """Formats written beside merged/, each checked against the 16-bit merge before publishing."""

    formats: list[str] = Field(default_factory=lambda: [MERGED_16BIT])
    limits: dict[str, ExportLimits] = Field(default_factory=dict)
    check_rows: int = Field(32, ge=1)
    """The held-out rows every format is checked on."""
    check_max_tokens: int = Field(256, ge=8)
    """The tokens of each held-out row the check keeps."""
    check_max_new_tokens: int = Field(64, ge=1)
    """Greedy generation per prompt, to see whether it stops where the 16-bit model stops."""
    gguf_pre_tokenizer: str | None = None
    """llama.cpp's name for the tokenizer's pre-tokenizer, needed only when its converter does
    not recognise a BPE tokenizer (one trained locally, like the demo's)."""
    gguf_repo_id: str | None = None
    """Where the GGUF files are published when publish.enabled (default: <repo_id>-GGUF)."""
    merged_4bit_repo_id: str | None = None
    """Where merged_4bit is published when publish.enabled (default: <repo_id>-bnb-4bit)."""
    fp32_repo_id: str | None = None
    """Where fp32 is published when publish.enabled (default: <repo_id>-fp32)."""

    @model_validator(mode="after")
    def _known_formats(self) -> ExportConfig:
        problems = [p for p in map(unknown_format_error, self.formats) if p]
        if problems:
            raise ValueError(problems[0])
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("export.formats lists a format twice")
        for name in self.limits:
            if name not in self.formats:
                raise ValueError(
                    f"export.limits.{name}: {name!r} is not in export.formats {self.formats}"
                )
        for key in ("gguf_repo_id", "merged_4bit_repo_id", "fp32_repo_id"):
            value = getattr(self, key)
            if value and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
                raise ValueError(f"export.{key} must look like 'namespace/name', got {value!r}")
        if MERGED_16BIT not in self.formats:  # the verified merge everything is compared with
            self.formats = [MERGED_16BIT, *self.formats]
        return self

    @property
    def gguf_types(self) -> list[str]:
        return [f for f in self.formats if f in GGUF_TYPES]

    @property
    def exported(self) -> bool:
        """Whether there is more to write than the merge itself."""
        return self.formats != [MERGED_16BIT]


class Config(_Strict):
    """An llm-finetune config: configs/<model>/<method>.yaml."""

    run_name: str = Field(min_length=1, pattern=r"^[\w.-]+$")
    """Names the run and the default output folder."""
    output_dir: str | None = None
    """Where adapter, merged model and summary go; null: outputs/<run_name>."""
    backend: Literal["auto", "hf", "unsloth"] = "auto"
    method: Literal["sft", "dpo"] = "sft"
    overwrite: bool = False
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _method_matches_data(self) -> Config:
        if (self.method == "dpo") != (self.data.format == "dpo"):
            raise ValueError(
                f"method {self.method!r} needs data.format "
                f"{'dpo' if self.method == 'dpo' else 'alpaca or chat'}, got {self.data.format!r}"
            )
        return self

    @model_validator(mode="after")
    def _gate_has_rows(self) -> Config:
        if self.evaluate.lm_eval_tasks and not self.evaluates:
            raise ValueError(
                "evaluate.lm_eval_tasks run in the evaluation stage, which this run does not "
                "have: set data.test_size or evaluate.dataset, and evaluate.enabled: true"
            )
        if self.publish.enabled and self.evaluate.gate and not self.evaluates:
            raise ValueError(
                "evaluate.gate publishes only what the held-out rows confirm, and this run has "
                "none: set data.test_size (e.g. 0.05) or evaluate.dataset, and evaluate.enabled: "
                "true; or evaluate.gate: false to publish unvalidated"
            )
        return self

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates the merged model on held-out rows."""
        has_rows = self.data.test_size > 0 or self.evaluate.dataset is not None
        return self.evaluate.enabled and has_rows

    def export_repos(self) -> dict[str, str]:
        """Where each exported kind is published: its own key, else publish.repo_id + the
        community's suffix (`-GGUF`, `-bnb-4bit`, `-fp32`). Empty when nothing is published."""
        if not self.publish.enabled or self.publish.repo_id is None:
            return {}
        export, repo = self.export, self.publish.repo_id
        wanted = {
            "gguf": (bool(export.gguf_types), export.gguf_repo_id, "-GGUF"),
            MERGED_4BIT: (MERGED_4BIT in export.formats, export.merged_4bit_repo_id, "-bnb-4bit"),
            FP32: (FP32 in export.formats, export.fp32_repo_id, "-fp32"),
        }
        return {kind: given or repo + suffix for kind, (on, given, suffix) in wanted.items() if on}

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir or f"outputs/{self.run_name}")


# ---------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> ${ENV} interpolation -> validation.

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, key_path: str, top: dict[str, Any]) -> Any:
    """Replace ${VAR} and ${VAR:-default} from the environment; ${run_name} from the config."""
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{key_path}.{k}" if key_path else k, top) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{key_path}[{i}]", top) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name == "run_name" and isinstance(top.get("run_name"), str):
            return top["run_name"]
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise UserError(
            f"config error: {key_path}: environment variable {name} is not set "
            f"(export {name}=... or write the value into the config)"
        )

    return _ENV_PATTERN.sub(replace, value)


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in override:
        raise UserError(f"override {override!r} must look like key.path=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise UserError(f"override {override!r} must look like key.path=value")
    node = data
    for key in keys[:-1]:
        if node.get(key) is None:  # a section left empty in the YAML
            node[key] = {}
        child = node[key]
        if not isinstance(child, dict):
            raise UserError(f"override {override!r}: {key} is not a section")
        node = child
    node[keys[-1]] = _parse_value(raw)


def _parse_value(raw: str) -> Any:
    """YAML scalars and [lists]; anything else (`fix: typo`, `{...`) stays the string typed."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) and not raw.lstrip().startswith("{") else value


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key (check the spelling; see docs/configuration.md)"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return message
    given = error.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict | list) else ""
    return f"{path}: {message}{shown}"


def format_validation_error(error: ValidationError) -> str:
    """All problems at once, in one line: the user fixes them in one edit."""
    return "config error: " + "; ".join(_describe(e) for e in error.errors())


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override, interpolate and validate a config. Raises UserError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found (the configs are under configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise UserError(
            f"config file {str(path)!r} is not text (not UTF-8): pass the YAML file"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of keys at the top level")
    # A section whose keys are all commented out reads as null: it means "all defaults".
    data = {key: value for key, value in data.items() if value is not None}
    for override in overrides:
        _apply_override(data, override)
    data = _interpolate(data, "", data)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config, as written beside every artefact (no secrets are ever in it)."""
    return config.model_dump(mode="json")
