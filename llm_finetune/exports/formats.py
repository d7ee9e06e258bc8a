"""The export formats a config may ask for, in Unsloth's vocabulary, their default limits,
and the table their checked results are shown in (log, summary, cards).

Only the standard library is imported here: `config.py` validates `export.formats` with it,
so a misspelt quant type is refused in a fraction of a second, before any training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Safetensors / adapter formats. `merged_16bit` is the verified merge itself.
LORA = "lora"
MERGED_16BIT = "merged_16bit"
FP32 = "fp32"
MERGED_4BIT = "merged_4bit"
SAFETENSORS_FORMATS = (LORA, MERGED_16BIT, FP32, MERGED_4BIT)

# GGUF types -> llama.cpp's `llama_ftype` names (llama.h, LLAMA_FTYPE_<name>). The first
# four are written by llama.cpp's converter itself; every other type is the converter's f16
# (bf16 for a bf16 model) quantized by llama.cpp's quantizer.
GGUF_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q3_k_l": "MOSTLY_Q3_K_L",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q3_k_s": "MOSTLY_Q3_K_S",
    "q2_k": "MOSTLY_Q2_K",
    "tq1_0": "MOSTLY_TQ1_0",
    "tq2_0": "MOSTLY_TQ2_0",
}
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")

ALL_FORMATS = (*SAFETENSORS_FORMATS, *GGUF_TYPES)


def is_gguf(fmt: str) -> bool:
    return fmt in GGUF_TYPES


def kind_of(fmt: str) -> str:
    """The repo kind a format is published in: all GGUF types share one `-GGUF` repo."""
    return "gguf" if is_gguf(fmt) else fmt


def display_name(fmt: str) -> str:
    """How the table names a format: GGUF types upper-case, as llama.cpp and Ollama tags do."""
    return f"GGUF {fmt.upper()}" if is_gguf(fmt) else fmt


def unknown_format_error(fmt: str) -> str | None:
    """The config error for a name that is not a format, listing the valid ones; None if valid."""
    if fmt in ALL_FORMATS:
        return None
    return (
        f"export.formats: unknown format {fmt!r}; valid: {', '.join(SAFETENSORS_FORMATS)}, "
        f"and GGUF types {', '.join(GGUF_TYPES)}"
    )


@dataclass(frozen=True)
class Limits:
    """The most an export may differ from the 16-bit merged model on the held-out tokens.

    kl: mean per-token KL(16-bit || export) in nats; top1: the least share of positions
    whose most likely next token is the same; stops_at_eos: greedy generation must stop
    wherever the 16-bit model's does.
    """

    kl: float
    top1: float
    stops_at_eos: bool = True


# f32/f16/bf16 and fp32 are rounding only; q8_0 is tight; 4-bit and below are looser.
# Chosen from what llama.cpp's own perplexity tables report for these types on real models
# (q8_0 ~0.0004-0.001 nats KL, q4_k_m ~0.01-0.03, q2_k ~0.1-0.2), with headroom.
DEFAULT_LIMITS = {
    LORA: Limits(kl=1e-3, top1=0.99),
    MERGED_16BIT: Limits(kl=0.0, top1=1.0),
    FP32: Limits(kl=1e-3, top1=0.99),
    "f32": Limits(kl=1e-3, top1=0.99),
    "f16": Limits(kl=2e-3, top1=0.98),
    "bf16": Limits(kl=2e-3, top1=0.98),
    "q8_0": Limits(kl=0.01, top1=0.95),
    "q6_k": Limits(kl=0.03, top1=0.9),
    "q5_k_m": Limits(kl=0.05, top1=0.88),
    "q5_k_s": Limits(kl=0.05, top1=0.88),
    "q5_0": Limits(kl=0.05, top1=0.88),
    "q5_1": Limits(kl=0.05, top1=0.88),
    MERGED_4BIT: Limits(kl=0.1, top1=0.8),
    "q4_k_m": Limits(kl=0.1, top1=0.8),
    "q4_k_s": Limits(kl=0.1, top1=0.8),
    "q4_0": Limits(kl=0.15, top1=0.75),
    "q4_1": Limits(kl=0.15, top1=0.75),
    "q3_k_l": Limits(kl=0.25, top1=0.7),
    "q3_k_m": Limits(kl=0.3, top1=0.65),
    "q3_k_s": Limits(kl=0.4, top1=0.6),
    "q2_k": Limits(kl=0.6, top1=0.5),
    "tq1_0": Limits(kl=2.0, top1=0.3),
    "tq2_0": Limits(kl=2.0, top1=0.3),
}


TABLE_HEADER = [
    "format",
    "file(s)",
    "bytes",
    "perplexity",
    "KL vs 16-bit",
    "top-1 agreement",
    "stops at EOS",
    "answers right",
    "check",
]


def table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The size/quality table, header first: the same in the summary, the log and the cards."""
    lines = [TABLE_HEADER]
    for row in rows:
        m, files = row["measured"], row["files"]
        measured = [f"{m['perplexity']:.4g}", f"{m['kl']:.3g}", f"{m['top1']:.1%}"] if m else []
        lines.append(
            [
                display_name(row["format"]),
                Path(files[0]).name if len(files) == 1 else f"{len(files)} files" if files else "-",
                f"{row['bytes'] / 1e6:,.2f} MB",
                *(measured or ["-", "-", "-"]),
                m.get("stops_at_eos", "-"),
                _answers_right(m),
                "passed" if row["passed"] else "rejected: " + "; ".join(row["problems"]),
            ]
        )
    return lines


def _answers_right(measured: dict[str, Any] | None) -> str:
    """'31/32': greedy answers equal to the expected ones; '-' where none is short."""
    if not measured or measured.get("answers_right") is None:
        return "-"
    return f"{measured['answers_right']}/{measured['answers_expected']}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header, *body = table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def answers_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: the first check rows' expected answers and each format's own greedy answer
    (the formats whose check scored answers); "" when none did."""
    scored = [r for r in rows if r["measured"] and r["measured"].get("sample_answers")]
    if not scored:
        return ""
    header = ["expected", *(display_name(r["format"]) for r in scored)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, (expected, _) in enumerate(scored[0]["measured"]["sample_answers"]):
        answers = [r["measured"]["sample_answers"][index][1] for r in scored]
        lines.append("| " + " | ".join(table_cell(t) for t in [expected, *answers]) + " |")
    return "\n".join(lines)


def table_cell(text: str) -> str:
    """Text in one markdown table cell: one line, printable, pipes escaped, at most 120
    characters; "(empty)" for nothing."""
    printable = "".join(c if c.isprintable() else "\ufffd" for c in " ".join(text.split()))
    line = printable.replace("|", "\\|") or "(empty)"
    return line if len(line) <= 120 else line[:117] + "..."
