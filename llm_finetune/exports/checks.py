"""The check every export goes through: how far it is from the 16-bit merged model.

The 16-bit merged model is the model verification proved to be what was trained; an export
(an fp32 folder, a 4-bit one, a GGUF file run in llama.cpp) is judged by how its next-token
distributions differ from that model's on held-out token sequences formatted as in training,
and by whether greedy generation still stops where the 16-bit model's does. The reference is
computed once and every format is measured against it, one sequence at a time.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from llm_finetune.errors import UserError

if TYPE_CHECKING:
    from llm_finetune.config import Config
    from llm_finetune.exports.formats import Limits


class Runner(Protocol):
    """What the check drives: one loaded export."""

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: the next-token logits at every position."""

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy: the new ids, ending with an EOS id if one was produced (stopping there)."""

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------
# What the check runs on


@dataclass(frozen=True)
class HeldOut:
    sequences: list[list[int]]  # prompt + answer, tokenized as trl tokenized them to train
    prompts: list[list[int]]  # generation prompts in the training format
    eos_ids: tuple[int, ...]  # the merged model's generation_config EOS ids
    max_new_tokens: int
    source: str  # where the sequences come from, in words (for the table and the cards)
    # Per prompt, the answer trained on when answers are short enough for exact match (else
    # None), and how generated ids read as text: each format's answers are scored too.
    expected: tuple[str | None, ...] = ()
    decode: Callable[[list[int]], str] | None = field(default=None, compare=False, repr=False)

    @property
    def answers_expected(self) -> int:
        return sum(e is not None for e in self.expected)

    def answers(self, generations: list[list[int]]) -> tuple[int | None, list[list[str]]]:
        """How many greedy answers equal the expected ones (evaluate.normalise), None when
        no prompt has a short expected answer; and the first few [expected, answer] pairs."""
        from llm_finetune.evaluate import SAMPLES, normalise

        pairs = [(g, e) for g, e in zip(generations, self.expected, strict=False) if e is not None]
        if not pairs or self.decode is None:
            return None, []
        texts = [[e, self.decode(g).strip()] for g, e in pairs]
        return sum(normalise(e) == normalise(a) for e, a in texts), texts[:SAMPLES]


def generation_eos_ids(folder: Path) -> tuple[int, ...]:
    """The EOS ids generation stops on for the model in `folder` (its generation_config.json,
    else its config.json); () when it names none."""
    for name in ("generation_config.json", "config.json"):
        file = Path(folder) / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
    return ()


def held_out(
    config: Config, tokenizer: Any, rows: int, max_tokens: int, merged: Path | None = None
) -> HeldOut:
    """The check's data: the first `rows` rows of the test split training held out
    (`data.test_size`; the same split: datasets draws it from the number of rows and
    `data.shuffle_seed` only), else `rows` training rows drawn with `data.shuffle_seed`;
    formatted and tokenized as for training (DPO: prompt + chosen), each cut to its first
    `max_tokens` tokens (and `model.max_seq_length`): the reference keeps a vocabulary of
    logits per token. Generation prompts: each row's prompt, then the `verify.prompts`, in
    the training format, whole (a cut prompt would be another prompt; generating keeps no
    logits). EOS ids: those of `merged` (default: the run's merged folder)."""
    from llm_finetune.data import held_out_split, inference_prompt, load_raw, prompt_and_answer
    from llm_finetune.evaluate import EXACT_MATCH, choose_metric

    data = config.data
    raw = load_raw(data)
    if (test := held_out_split(raw, data)) is not None:
        chosen = test.select(range(min(rows, len(test))))
        source = f"{len(chosen)} rows of the test split (data.test_size {data.test_size:g})"
    else:
        picked = random.Random(data.shuffle_seed).sample(range(len(raw)), min(rows, len(raw)))
        chosen = raw.select(picked)
        source = f"{len(chosen)} training rows drawn with seed {data.shuffle_seed} (no test split)"
    limit = min(max_tokens, config.model.max_seq_length)
    sequences, prompts, expected = [], [], []
    for row in chosen:
        ids = tokenizer(_training_text(row, data.format, tokenizer))["input_ids"][:limit]
        if len(ids) >= 2:  # at least one next token to predict
            sequences.append(ids)
        if (pair := prompt_and_answer(row, data.format, tokenizer)) is not None:
            prompts.append(tokenizer(pair[0])["input_ids"])
            expected.append(pair[1])
    if choose_metric(config.evaluate.metric, config.method, expected) != EXACT_MATCH:
        expected = [None] * len(expected)  # long answers: exact match says nothing
    for prompt in config.verify.prompts:
        prompts.append(tokenizer(inference_prompt(data.format, prompt, tokenizer))["input_ids"])
        expected.append(None)
    merged = Path(merged) if merged is not None else config.output_path / "merged"
    eos_ids = generation_eos_ids(merged) or (tokenizer.eos_token_id,)
    return HeldOut(
        sequences=sequences,
        prompts=prompts,
        eos_ids=eos_ids,
        max_new_tokens=config.verify.max_new_tokens,
        source=source,
        expected=tuple(expected),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )


def _training_text(row: dict[str, Any], data_format: str, tokenizer: Any) -> str:
    """The text trained on (DPO: prompt + chosen)."""
    from llm_finetune.data import format_alpaca, format_chat, format_dpo

    eos = tokenizer.eos_token
    if data_format == "alpaca":
        return format_alpaca(row, eos)
    if data_format == "dpo":
        pair = format_dpo(row, eos)
        return pair["prompt"] + pair["chosen"]
    return format_chat(row, tokenizer)


@dataclass
class Reference:
    """The 16-bit merged model's results on a HeldOut, computed once.

    Its next-token logits (float32, the positions that have a next token) are in one .npy
    file in `folder`, mapped, not read: 4 bytes x vocabulary x positions, at most
    4 x vocab x rows x (max_tokens - 1) bytes (32 rows of 512 tokens with a 152k vocabulary:
    9.9 GB). Logits rather than log-probs, so max |Δlogit| is exact; float32 so that the
    16-bit model measured against itself gives exactly 0.
    """

    held_out: HeldOut
    logits_file: Path
    starts: list[int]  # row of the file where each sequence's positions begin, then the end
    generations: list[list[int]]  # greedy, from each prompt
    perplexity: float  # on the sequences' next tokens

    def logits(self, index: int) -> np.ndarray:
        """[len(sequence) - 1, vocab]: the logits predicting each next token of sequence `index`."""
        start, end = self.starts[index], self.starts[index + 1]
        return np.load(self.logits_file, mmap_mode="r")[start:end]


def reference(merged: Path, held_out: HeldOut, folder: Path, device: str = "cpu") -> Reference:
    """Run the 16-bit merged model (float32 compute) over every sequence and prompt; its
    logits go to `folder`/reference-logits.npy (see Reference for the size)."""
    from llm_finetune.exports.safetensors_exports import TransformersRunner

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "reference-logits.npy"
    runner = TransformersRunner(merged, device=device, eos_ids=held_out.eos_ids)
    try:
        starts = np.cumsum([0] + [len(s) - 1 for s in held_out.sequences]).tolist()
        stored = None
        nll = 0.0
        for index, ids in enumerate(held_out.sequences):
            logits = runner.logits(ids)[:-1]
            if stored is None:
                shape = (starts[-1], logits.shape[1])
                stored = np.lib.format.open_memmap(file, "w+", np.float32, shape)
            stored[starts[index] : starts[index + 1]] = logits
            nll += _nll(_torch(logits).log_softmax(-1), ids[1:])
        if stored is not None:
            stored.flush()
            del stored
        generations = [runner.generate(p, held_out.max_new_tokens) for p in held_out.prompts]
    finally:
        runner.close()
    return Reference(
        held_out=held_out,
        logits_file=file,
        starts=starts,
        generations=generations,
        perplexity=math.exp(nll / max(1, starts[-1])),
    )


# ---------------------------------------------------------------------------------------
# Measuring an export, judging it


@dataclass(frozen=True)
class Measured:
    kl: float  # mean per-token KL(16-bit || export), nats
    kl_max: float  # at the worst position
    top1: float  # share of positions where the export's top token is the 16-bit model's (TIE)
    perplexity: float  # the export's, on the sequences' next tokens
    reference_perplexity: float  # the 16-bit model's, on the same tokens
    max_abs_logit_diff: float
    eos_stops: int  # prompts where the export ends the 16-bit model's answer with EOS ...
    eos_expected: int  # ... of those where the 16-bit model's does
    same_generations: int  # greedy generations identical to the 16-bit model's
    generations: int
    positions: int
    seconds: float
    answers_right: int | None = None  # greedy answers equal to the expected ones ...
    answers_expected: int = 0  # ... of the prompts with a short expected answer
    sample_answers: list[list[str]] = field(default_factory=list)  # [expected, answer]

    @property
    def stops_at_eos(self) -> str:
        """'3/3': the export stops on 3 of the 3 prompts the 16-bit model stops on."""
        return f"{self.eos_stops}/{self.eos_expected}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"stops_at_eos": self.stops_at_eos}


# Top-1 agreement: the export's most likely token counts as the 16-bit model's choice when the
# 16-bit model rates it within this many logits (a probability ratio of 1.05) of its own top:
# a near-tie that rounding alone flips (e.g. the next digit of a number, all about equally
# likely) is not a disagreement.
TIE = 0.05

# "Stops at EOS": the export's EOS logit at most this far below its top one (a ratio of 2).
EOS_MARGIN = math.log(2)

# Positions per step of the KL computation: ~16 M float32 per array, whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 24


def measure(reference: Reference, runner: Runner) -> Measured:
    """Run the export over the reference's sequences and prompts, one sequence at a time."""
    import torch

    start = time.perf_counter()
    held = reference.held_out
    kl_sum, kl_max, agree, nll, logit_diff = 0.0, 0.0, 0, 0.0, 0.0
    for index, ids in enumerate(held.sequences):
        mine = runner.logits(ids)[:-1]
        theirs = reference.logits(index)
        if mine.shape != theirs.shape:
            raise UserError(
                f"the export gives logits of shape {list(mine.shape)} for a sequence where the "
                f"16-bit model gives {list(theirs.shape)}: its vocabulary or tokenization "
                "differs; write the export again from the merged model"
            )
        step = max(1, CHUNK_ELEMENTS // mine.shape[1])
        for rows in range(0, len(mine), step):
            ref = _torch(theirs[rows : rows + step])
            exp = _torch(mine[rows : rows + step])
            log_ref, log_exp = ref.log_softmax(-1), exp.log_softmax(-1)
            p = log_ref.exp()
            terms = torch.where(p > 0, p * (log_ref - log_exp), torch.zeros(()))
            kl = terms.sum(-1).clamp(min=0)  # below 0 only by rounding
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            mine_top = exp.argmax(-1, keepdim=True)
            agree += int((ref.gather(-1, mine_top).squeeze(-1) >= ref.max(-1).values - TIE).sum())
            logit_diff = max(logit_diff, float((ref - exp).abs().max()))
            nll += _nll(log_exp, ids[rows + 1 : rows + 1 + len(exp)])
    positions = reference.starts[-1]
    eos = set(held.eos_ids)
    generations = [runner.generate(p, held.max_new_tokens) for p in held.prompts]
    expected = [bool(g) and g[-1] in eos for g in reference.generations]
    stops = [
        stop and _stops_there(runner, prompt + answer[:-1], eos)
        for prompt, answer, stop in zip(held.prompts, reference.generations, expected, strict=True)
    ]
    return Measured(
        kl=kl_sum / max(1, positions),
        kl_max=kl_max,
        top1=agree / max(1, positions),
        perplexity=math.exp(nll / max(1, positions)),
        reference_perplexity=reference.perplexity,
        max_abs_logit_diff=logit_diff,
        eos_stops=sum(s for s, e in zip(stops, expected, strict=True) if e),
        eos_expected=sum(expected),
        same_generations=sum(
            a == b for a, b in zip(generations, reference.generations, strict=True)
        ),
        generations=len(generations),
        positions=positions,
        seconds=round(time.perf_counter() - start, 2),
        answers_expected=held.answers_expected,
        **answer_fields(held, generations),
    )


def answer_fields(held: HeldOut, generations: list[list[int]]) -> dict[str, Any]:
    """Measured's answers_right and sample_answers for these greedy generations."""
    right, samples = held.answers(generations)
    return {"answers_right": right, "sample_answers": samples}


def _stops_there(runner: Runner, ids: list[int], eos: set[int]) -> bool:
    """Whether the export, given the 16-bit model's own answer so far, ends it where that
    model did: it rates an EOS id at least half as likely as its most likely token (a model
    that lost its EOS rates it thousands of times lower). Fed the 16-bit answer rather than
    its own, so that one near-tie early in a long answer cannot send it down another path
    that merely ends elsewhere."""
    logits = runner.logits(ids)[-1]
    best_eos = max(float(logits[i]) for i in eos if i < len(logits))
    return best_eos >= float(logits.max()) - EOS_MARGIN


def judge(measured: Measured, limits: Limits) -> list[str]:
    """One short reason per limit exceeded, with the numbers; [] when within all of them.
    A NaN fails (an export that produces NaNs is broken)."""
    reasons = []
    if not measured.kl <= limits.kl:
        reasons.append(f"KL {measured.kl:.3g} > limit {limits.kl:g}")
    if not measured.top1 >= limits.top1:
        reasons.append(f"top-1 agreement {measured.top1:.3f} < limit {limits.top1:g}")
    if limits.stops_at_eos and measured.eos_stops < measured.eos_expected:
        reasons.append(
            f"stops at EOS on {measured.stops_at_eos} of the prompts the 16-bit model stops "
            "on (given its answer)"
        )
    return reasons


def _torch(array: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: memmaps are read-only


def _nll(log_probs: Any, next_ids: Sequence[int]) -> float:
    """-Σ log p(next token), row i of `log_probs` predicting `next_ids[i]`."""
    import torch

    targets = torch.tensor(list(next_ids))[:, None]
    return -float(log_probs.gather(1, targets).sum())
