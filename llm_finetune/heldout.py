"""Before and after: the held-out loss and perplexity of the base model and of the merged
model, on the same rows, computed the same way, once each.

What a reader of the model page trusts: the published model, not the adapter under peft,
measured against what it started from. Bounded by HELDOUT_ROWS, so it costs seconds.
"""

from __future__ import annotations

import math
import time
from typing import Any

HELDOUT_ROWS = 64  # the first rows of the held-out split (data.test_size)
BATCH_ROWS = 8


def heldout_loss(
    model_path: str,
    texts: list[str],
    tokenizer: Any,
    max_length: int,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Mean next-token cross-entropy over every token of `texts` (as SFT trains on them), and
    its exponential, the perplexity. The model is loaded in float32 on the CPU, in its stored
    dtype on GPUs (spread over them by accelerate), and released afterwards."""
    import torch

    from llm_finetune.evaluate import load_for_evaluation

    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    model = load_for_evaluation(model_path, revision, trust_remote_code)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for first in range(0, len(texts), BATCH_ROWS):
            batch = tokenizer(
                texts[first : first + BATCH_ROWS],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            logits = model(**batch).logits[:, :-1].float()
            padding = batch["attention_mask"][:, 1:] == 0
            targets = batch["input_ids"][:, 1:].masked_fill(padding, -100)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
            )
            tokens += int((targets != -100).sum())
    del model  # freed here (no gc pass: it costs more than the measurement on small models)
    if cuda:
        torch.cuda.empty_cache()
    loss = total / tokens
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 700.0)), 4),
        "rows": len(texts),
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 2),
    }


def compare(base: dict[str, Any], merged: dict[str, Any]) -> dict[str, Any]:
    """The two measurements side by side; `worse`: fine-tuning raised the held-out loss."""
    return {
        "rows": merged["rows"],
        "base": base,
        "merged": merged,
        "loss_change": round(merged["loss"] - base["loss"], 6),
        "worse": merged["loss"] > base["loss"],
    }
