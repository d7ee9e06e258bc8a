"""Download a published model by repo id and generate, as any user would: plain transformers
(or llama.cpp, for a GGUF repo).

It runs in a child process with a fresh cache (`HF_HOME`), so what it proves is what the Hub
serves, not what this process still holds in memory. No peft is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from llm_finetune.errors import UserError
from llm_finetune.exports.llama_child import signal_name
from llm_finetune.hub import is_loopback


def generate_from_hub(
    repo_id: str, revision: str, prompt: str, max_new_tokens: int
) -> dict[str, Any]:
    """In this process: from_pretrained(repo_id) and one greedy generation."""
    import torch
    from transformers import AutoTokenizer

    from llm_finetune.checkpoint_names import load_pretrained

    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision)
    model = load_pretrained(repo_id, revision=revision)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return {"repo_id": repo_id, "revision": revision, "dtype": str(model.dtype), "generation": text}


def generate_from_gguf_repo(
    repo_id: str, file: str, revision: str, prompt: str, max_new_tokens: int
) -> dict[str, Any]:
    """In this process: download one GGUF file of a repo and generate in llama.cpp, greedily."""
    from huggingface_hub import hf_hub_download
    from llama_cpp import Llama

    path = hf_hub_download(repo_id, file, revision=revision)
    llm = Llama(model_path=path, n_ctx=512, verbose=False, seed=0)
    output = llm(prompt, max_tokens=max_new_tokens, temperature=0.0)
    return {"repo_id": repo_id, "file": file, "generation": output["choices"][0]["text"]}


def load_back(
    repo_id: str,
    revision: str,
    endpoint: str,
    prompt: str,
    token: str | None = None,
    max_new_tokens: int = 16,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """Run `generate_from_hub` (or, for `gguf_file`, `generate_from_gguf_repo`) in a child
    process against `endpoint`, with a fresh cache."""
    if gguf_file is None:
        request = ["model", repo_id, revision, prompt, max_new_tokens]
    else:
        request = ["gguf", repo_id, gguf_file, revision, prompt, max_new_tokens]
    return _in_child(request, endpoint, token)


def _in_child(request: list[Any], endpoint: str, token: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llm-finetune-loadback-") as cache:
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": cache}
        env.pop("HF_TOKEN", None)
        if token:
            env["HF_TOKEN"] = token  # the child's environment only; never printed
        if is_loopback(endpoint):
            env.update(HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
        child = subprocess.run(
            [sys.executable, "-m", "llm_finetune.loadback", json.dumps(request)],
            env=env,
            capture_output=True,
            text=True,
        )
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        if child.returncode < 0:  # native code (llama.cpp, torch) died: no Python error
            last = f"its process died of {signal_name(-child.returncode)}"
        what = "GGUF file" if request[0] == "gguf" else "model"
        raise UserError(f"the published {what} did not load back from {endpoint}: {last}")
    return json.loads(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    kind, *arguments = json.loads(sys.argv[1])
    generate = generate_from_gguf_repo if kind == "gguf" else generate_from_hub
    print(json.dumps(generate(*arguments)))
