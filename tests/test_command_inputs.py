"""Damaged, missing and mismatched inputs of the standalone commands, as a user meets them.

Each corpus is built by the test from valid files (the tiny base, a small adapter, a model
folder to publish), damaged one way per case, and run through the real `llm-finetune` entry
point in this process: every case ends with exit code 2, exactly one `error:` line that names
the path, no traceback, and nothing written. An unexpected exception (a bug of ours) is one
line pointing to a log file that holds the traceback, exit code 1.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub  # imported first: its log handler takes the real stderr, not a test's
import pytest

from llm_finetune.cli import main
from llm_finetune.hub_server import HubServer
from tests.conftest import GOOD_TOKEN, READ_TOKEN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CANARY = "hf_CANARY_never_in_any_output_0123456789"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Relative paths resolve in the test's folder; a bug's log goes to a folder the test
    watches; main's signal handlers are put back afterwards."""
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "bug-logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield logs
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time (folders under `skip`,
    which others write to, left out)."""
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
        if not any(p.is_relative_to(s) for s in skip)
    }


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `llm-finetune ARGV` run in this process."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(err: str, pattern: str) -> str:
    """stderr ends with the one `error:` line, matching `pattern`; no traceback (before it,
    only what a run prints anyway: retry warnings, the client's progress bars)."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


def refused(
    argv: list[str],
    pattern: str,
    root: Path,
    capsys: pytest.CaptureFixture[str],
    skip: tuple[Path, ...] = (),
) -> str:
    """Run a command that must be refused: exit 2, one line, nothing written under `root`."""
    before = snapshot(root, skip)
    code, out, err = run_cli(argv, capsys)
    line = assert_one_error(err, pattern)
    assert code == 2, err
    assert out == ""
    assert snapshot(root, skip) == before
    return line


# -- verify


def base_config(root: Path) -> dict[str, object]:
    """The config.json of ./base under `root`: what an adapter or a merge must match."""
    return json.loads((root / "base/config.json").read_text())


def base_hidden(root: Path) -> int:
    return int(base_config(root)["hidden_size"])


def write_adapter(
    folder: Path, hidden: int, r: int = 2, width: int | None = None, layer: int = 0
) -> Path:
    """A small, well-formed LoRA adapter folder for a base of hidden size `hidden` (untrained:
    these cases never get as far as loading it); `r`, `width`, `layer` make one that does not
    fit."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.zeros(2, width or hidden),
        f"{prefix}.lora_B.weight": torch.zeros(hidden, 2),
    }
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture
def verify_inputs(tmp_path: Path, tiny_base: str) -> Path:
    """./base (the tiny base), ./merged (a copy of it: same architecture) and ./adapter."""
    shutil.copytree(tiny_base, tmp_path / "base")
    shutil.copytree(tiny_base, tmp_path / "merged")
    write_adapter(tmp_path / "adapter", base_hidden(tmp_path))
    return tmp_path


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def split_into_shards(folder: Path) -> None:
    """The single model.safetensors as two shards with their index, the second one gone (a
    download cut short)."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def data_start(path: Path) -> int:
    """Where a safetensors file's tensor data begins: after its 8-byte length and header."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def cut_in_header(path: Path) -> None:
    truncate(path, data_start(path) * 3 // 4)


def cut_in_data(path: Path) -> None:
    """Cut inside the first tensor (the embedding or lm_head: hundreds of kB)."""
    truncate(path, data_start(path) + 45_000)


Damage = Callable[[Path], object]
VERIFY_CASES: dict[str, tuple[Damage, dict[str, str], str]] = {
    # case: (damage under the test folder, arguments replaced, the error line's pattern, in
    # which {vocab_size} and {hidden_size} stand for the base's)
    "merged missing": (
        lambda r: None,
        {"--merged": "./missing"},
        r"^error: --merged './missing': no such folder; check the path$",
    ),
    "merged missing, trailing slash": (
        lambda r: None,
        {"--merged": "gone/"},
        r"--merged 'gone/': no such folder",
    ),
    "base missing": (
        lambda r: None,
        {"--base": "./nope"},
        r"^error: --base './nope': no such folder",
    ),
    "base missing under an existing folder": (
        lambda r: (r / "models").mkdir(),
        {"--base": "models/llama"},
        r"^error: --base 'models/llama': no such folder",
    ),
    "adapter missing": (
        lambda r: None,
        {"--adapter": "./runs/x/adapter"},
        r"^error: --adapter './runs/x/adapter': no such folder",
    ),
    "merged is a file": (
        lambda r: (r / "merged.txt").write_text("hi"),
        {"--merged": "./merged.txt"},
        r"--merged './merged.txt' is a file, not a folder",
    ),
    "merged is a broken link": (
        lambda r: (r / "link").symlink_to(r / "nowhere"),
        {"--merged": "./link"},
        r"--merged './link' is a broken symbolic link",
    ),
    "merged config not JSON": (
        lambda r: (r / "merged/config.json").write_text("{'model_type': llama"),
        {},
        r"merged/config.json' is not valid JSON \(line 1: .*\): copy or download --merged",
    ),
    "merged config empty": (
        lambda r: (r / "merged/config.json").write_text(""),
        {},
        r"merged/config.json' is not valid JSON \(it is empty\)",
    ),
    "merged config binary": (
        lambda r: (r / "merged/config.json").write_bytes(b"\xff\xfe\x00garbage"),
        {},
        r"merged/config.json' is not JSON \(not even UTF-8 text\)",
    ),
    "merged config a list": (
        lambda r: (r / "merged/config.json").write_text("[1, 2]"),
        {},
        r"merged/config.json' holds a JSON list, not an object",
    ),
    "merged config names no model": (
        lambda r: (r / "merged/config.json").write_text('{"hidden_size": 128}'),
        {},
        r"names no model_type or architectures",
    ),
    "merged without config": (
        lambda r: (r / "merged/config.json").unlink(),
        {},
        r"--merged './merged' is not a model folder \(no config.json\)",
    ),
    "base config not JSON": (
        lambda r: truncate(r / "base/config.json", 40),
        {},
        r"base/config.json' is not valid JSON .*: copy or download --base './base' again",
    ),
    "merged tokenizer.json cut short": (
        lambda r: truncate(r / "merged/tokenizer.json", 100),
        {},
        r"merged/tokenizer.json' is not valid JSON",
    ),
    "merged tokenizer not a tokenizer": (
        lambda r: (r / "merged/tokenizer.json").write_text('{"version": "1.0"}'),
        {},
        r"--merged './merged': its tokenizer does not load \(.*\); copy the base model's",
    ),
    "merged without tokenizer": (
        lambda r: [(r / "merged" / f).unlink() for f in TOKENIZER_FILES],
        {},
        r"--merged './merged' has no tokenizer",
    ),
    "merged without weights": (
        lambda r: (r / "merged/model.safetensors").unlink(),
        {},
        r"--merged './merged' has no weights, no \*.safetensors",
    ),
    "merged with pickle weights only": (
        lambda r: (r / "merged/model.safetensors").rename(r / "merged/pytorch_model.bin"),
        {},
        r"has only pickle \(.bin\) weights",
    ),
    "merged shard missing": (
        lambda r: split_into_shards(r / "merged"),
        {},
        r"--merged './merged' is incomplete: model.safetensors.index.json names "
        r"model-00002-of-00002.safetensors, which is not there",
    ),
    "merged shard cut short": (
        lambda r: cut_in_header(r / "merged/model.safetensors"),
        {},
        r"merged/model.safetensors",
    ),
    "merged shard empty": (
        lambda r: truncate(r / "merged/model.safetensors", 0),
        {},
        r"merged/model.safetensors",
    ),
    "base shard cut short": (
        lambda r: cut_in_data(r / "base/model.safetensors"),
        {},
        r"base/model.safetensors",
    ),
    "merged of another vocabulary": (
        lambda r: edit_json(r / "merged/config.json", vocab_size=32000),
        {},
        r"--merged './merged' is not a merge of --base './base': its vocab_size is 32000, "
        r"the base's is {vocab_size}; pass the base the merged model was made from$",
    ),
    "merged of another architecture": (
        lambda r: edit_json(
            r / "merged/config.json", model_type="qwen2", architectures=["Qwen2ForCausalLM"]
        ),
        {},
        r"its model_type is 'qwen2', the base's is 'llama'",
    ),
    "merged of another width": (
        lambda r: edit_json(r / "merged/config.json", hidden_size=64),
        {},
        r"its hidden_size is 64, the base's is {hidden_size}",
    ),
    "adapter without adapter_config.json": (
        lambda r: (r / "adapter/adapter_config.json").unlink(),
        {},
        r"--adapter './adapter' is not a LoRA adapter folder \(no adapter_config.json\)",
    ),
    "adapter config not JSON": (
        lambda r: (r / "adapter/adapter_config.json").write_text('{"r": 8,'),
        {},
        r"adapter/adapter_config.json' is not valid JSON .*: copy --adapter './adapter' again",
    ),
    "adapter without weights": (
        lambda r: (r / "adapter/adapter_model.safetensors").unlink(),
        {},
        r"--adapter './adapter' has no adapter_model.safetensors",
    ),
    "adapter of a wider base": (
        lambda r: write_adapter(r / "adapter", base_hidden(r), width=2 * base_hidden(r)),
        {},
        r"LoRA shape .* does not fit",
    ),
    "adapter of a deeper base": (
        lambda r: write_adapter(r / "adapter", base_hidden(r), layer=30),
        {},
        r"1 adapter tensor\(s\) match no base tensor, .*: the adapter was trained on a "
        r"different base model; pass the base it was trained on$",
    ),
    "adapter config whose r disagrees with its tensors": (
        lambda r: write_adapter(r / "adapter", base_hidden(r), r=8),
        {},
        r"adapter/adapter_config.json",
    ),
    "adapter weights cut short": (
        lambda r: truncate(r / "adapter/adapter_model.safetensors", 200),
        {},
        r"adapter/adapter_model.safetensors",
    ),
    "adapter given as the model": (
        lambda r: None,
        {"--merged": "./adapter"},
        r"--merged './adapter' is not a model folder \(no config.json\)",
    ),
    "prompts file missing": (
        lambda r: None,
        {"--prompts": "prompts.txt"},
        r"^error: --prompts 'prompts.txt': no such file",
    ),
    "prompts file empty": (
        lambda r: (r / "prompts.txt").write_text("\n  \n"),
        {"--prompts": "prompts.txt"},
        r"--prompts 'prompts.txt' holds no prompt",
    ),
    "prompts file binary": (
        lambda r: (r / "prompts.txt").write_bytes(b"\x80\x81\x82"),
        {"--prompts": "prompts.txt"},
        r"--prompts 'prompts.txt' is not UTF-8 text",
    ),
    "prompts a folder": (
        lambda r: None,
        {"--prompts": "merged"},
        r"--prompts 'merged' is a folder",
    ),
    "chat format without a chat template": (
        lambda r: (r / "merged/chat_template.jinja").unlink(),
        {"--format": "chat"},
        r"--format chat: the tokenizer of --merged './merged' has no chat template",
    ),
}


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_refuses_damaged_inputs_in_one_line(
    case: str, verify_inputs: Path, capsys: pytest.CaptureFixture[str], _isolated: Path
) -> None:
    damage, replaced, pattern = VERIFY_CASES[case]
    pattern = pattern.format_map(base_config(verify_inputs))
    damage(verify_inputs)
    options = {"--base": "./base", "--adapter": "./adapter", "--merged": "./merged", **replaced}
    argv = ["verify", *[part for option in options.items() for part in option]]
    refused(argv, pattern, verify_inputs, capsys)
    assert list(_isolated.iterdir()) == []  # and no bug log


def test_a_path_like_base_is_never_looked_up_on_the_hub(
    verify_inputs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Hub lookup")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    for name in ("./llama", "/nonexistent/llama", "llama/", "a/b/c", "merged/llama"):
        argv = ["verify", "--base", name, "--adapter", "./adapter", "--merged", "./merged"]
        refused(argv, f"^error: --base '{re.escape(name)}': no such folder", verify_inputs, capsys)


# -- publish


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A small model folder to publish: config, one safetensors file, tokenizer, manifest."""
    from llm_finetune.manifest import write_manifest

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "architectures": ["X"]}')
    (folder / "model.safetensors").write_bytes(b"\x07" * 4096)
    (folder / "tokenizer.json").write_text('{"model": {}}')
    write_manifest(folder, "merge", "inputs")
    return folder


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replace_manifest(folder: Path, text: str) -> None:
    (folder / "llm-finetune-manifest.json").write_text(text)


PUBLISH_FOLDER_CASES: dict[str, tuple[Damage, str, str]] = {
    # case: (damage, --folder, the error line's pattern)
    "folder missing": (lambda r: None, "./merged", r"^error: --folder './merged': no such folder"),
    "folder is a file": (
        lambda r: (r / "f.bin").write_bytes(b"x"),
        "f.bin",
        r"--folder 'f.bin' is a file, not a folder",
    ),
    "empty folder": (
        lambda r: (r / "empty").mkdir(),
        "empty",
        r"--folder 'empty' is neither a model folder \(config.json\), a LoRA adapter folder "
        r"\(adapter_config.json\) nor a folder of GGUF files: nothing to publish$",
    ),
    "config not JSON": (
        lambda r: (r / "model/config.json").write_text("<html>"),
        "model",
        r"model/config.json' is not valid JSON",
    ),
    "generation config not JSON": (
        lambda r: (r / "model/generation_config.json").write_text("{"),
        "model",
        r"model/generation_config.json' is not valid JSON",
    ),
    "no weights": (
        lambda r: (r / "model/model.safetensors").unlink(),
        "model",
        r"--folder 'model' has no weights",
    ),
    "shard missing": (
        lambda r: split_into_shards(r / "model"),
        "model",
        r"--folder 'model' is incomplete: .* names model-00002-of-00002.safetensors",
    ),
    "manifest not JSON": (
        lambda r: replace_manifest(r / "model", '{"files": '),
        "model",
        r"llm-finetune-manifest.json' is not valid JSON",
    ),
    "manifest lists no files": (
        lambda r: replace_manifest(r / "model", '{"files": ["model.safetensors"]}'),
        "model",
        r"llm-finetune-manifest.json' lists no files, it is damaged",
    ),
    "manifest does not match": (
        lambda r: (r / "model/model.safetensors").write_bytes(b"\x08" * 4096),
        "model",
        r"'model' changed since it was written \(model.safetensors\)",
    ),
    "adapter config not JSON": (
        lambda r: (
            write_adapter(r / "adapter", hidden=16)
            .joinpath("adapter_config.json")
            .write_text("{,}")
        ),
        "adapter",
        r"adapter/adapter_config.json' is not valid JSON",
    ),
    "adapter without weights": (
        lambda r: (
            write_adapter(r / "adapter", hidden=16).joinpath("adapter_model.safetensors").unlink()
        ),
        "adapter",
        r"--folder 'adapter' has no adapter_model.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(PUBLISH_FOLDER_CASES))
def test_publish_refuses_a_damaged_folder_before_any_request(
    case: str,
    model_folder: Path,
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damage, folder, pattern = PUBLISH_FOLDER_CASES[case]
    root = model_folder.parent
    damage(root)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    argv = ["publish", "--folder", folder, "--repo-id", "alice/m", "--endpoint", hub.url]
    refused(argv, pattern, root, capsys, skip=(hub.storage,))
    assert hub.stats["requests"] == 0


class FaultyFront:
    """A stdlib HTTP server in front of the local Hub: requests whose "METHOD path" matches
    `rule` get `reply` (status, content type, body): an HTML page, an empty 500; all others
    are passed to the Hub. The Host header is kept, so the Hub's links point back here."""

    def __init__(self, hub_url: str | None, rule: str, reply: tuple[int, str, bytes]) -> None:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if re.search(rule, f"{self.command} {self.path}"):
                    front.hits += 1
                    status, content_type, payload = reply
                    headers = [("Content-Type", content_type)]
                else:
                    status, headers, payload = front.forward(self, body)
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.hub_url, self.hits = hub_url, 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def forward(self, request: BaseHTTPRequestHandler, body: bytes):
        assert self.hub_url is not None, f"unexpected request {request.command} {request.path}"
        connection = HTTPConnection(self.hub_url.removeprefix("http://"), timeout=30)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "connection"}
        connection.request(request.command, request.path, body=body, headers=headers)
        answer = connection.getresponse()
        payload = answer.read()
        connection.close()
        return answer.status, answer.getheaders(), payload

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


HTML = (200, "text/html", b"<!doctype html><html><body>Sign in to continue</body></html>")
HTML_404 = (404, "text/html", b"<html><body>Not Found</body></html>")
EMPTY_500 = (500, "text/plain", b"")
HTML_502 = (502, "text/html", b"<html><body>Bad gateway</body></html>")
PUBLISH_SERVER_CASES: dict[str, tuple[str, tuple[int, str, bytes], str]] = {
    # case: (requests the fault answers, its answer, the error line's pattern)
    "whoami answers HTML": (
        r"whoami",
        HTML,
        r"the server at \S+ did not answer the token check \(whoami\) as a Hub does \(an HTML "
        r"page, or not JSON\): it is not a Hub API, or a proxy is in the way; check --endpoint",
    ),
    "a web server that is not a Hub": (
        r"whoami",
        HTML_404,
        r"the server at \S+ has no Hub API \(404 for the token check \(whoami\)\): check "
        r"--endpoint",
    ),
    "whoami answers 500 without a body": (
        r"whoami",
        EMPTY_500,
        r"the Hub at \S+ failed for 'alice/m': .*500",
    ),
    "repo creation answers HTML": (
        r"^POST /api/repos/create",
        HTML,
        r"did not answer the creation of 'alice/m' as a Hub does",
    ),
    "preupload answers HTML": (
        r"^POST /api/models/alice/m/preupload/",
        HTML,
        r"did not answer a request of the upload as a Hub does",
    ),
    "commit answers HTML": (
        r"^POST /api/models/alice/m/commit/",
        HTML,
        r"did not answer a request of the upload as a Hub does",
    ),
    "commit answers 500 without a body, every time": (
        r"^POST /api/models/alice/m/commit/",
        EMPTY_500,
        r"publishing 'model' to 'alice/m' on \S+ failed 2 times \(last: HTTP 500\); 'main' "
        r"holds its previous commit .* Re-run `llm-finetune publish --folder ",
    ),
    "preupload answers an HTML 502, every time": (
        r"^POST /api/models/alice/m/preupload/",
        HTML_502,
        r"failed 2 times \(last: HTTP 502\)",
    ),
}


@pytest.mark.parametrize("case", list(PUBLISH_SERVER_CASES))
def test_publish_to_a_server_that_answers_wrong_is_one_line(
    case: str,
    model_folder: Path,
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from llm_finetune import publish
    from llm_finetune.hub import RetryPolicy

    rule, reply, pattern = PUBLISH_SERVER_CASES[case]
    fast = RetryPolicy(attempts=2, first_wait=0.01, max_wait=0.01, timeout=10, client_retries=0)
    monkeypatch.setattr(publish, "RetryPolicy", lambda: fast)  # the retries, without the waits
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    front = FaultyFront(hub.url, rule, reply)
    try:
        argv = ["publish", "--folder", "model", "--repo-id", "alice/m", "--endpoint", front.url]
        refused(argv, pattern, model_folder.parent, capsys, skip=(hub.storage,))
    finally:
        front.close()
    assert front.hits >= 1 and hub.stats["commits"] == 0


def test_publish_where_nothing_listens(
    model_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    url = f"http://127.0.0.1:{closed_port()}"
    argv = ["publish", "--folder", "model", "--repo-id", "alice/m", "--endpoint", url]
    refused(
        argv,
        rf"^error: cannot reach the Hub at {url}: ConnectError: .*; check --endpoint "
        r"\(publish.endpoint in a config\) or HF_ENDPOINT and the network$",
        model_folder.parent,
        capsys,
    )


@pytest.mark.parametrize(
    ("token", "fault", "pattern"),
    [
        (None, None, r"no Hub token found: export HF_TOKEN=<token>"),
        (READ_TOKEN, None, r"the token of 'bob' is read-only"),
        ("hf_unknown_token_0123456789", None, r"the Hub token was rejected by \S+ \(401\)"),
        (GOOD_TOKEN, r"/commit/main$", r"the token may not write to 'alice/m' on \S+ \(403\)"),
        (GOOD_TOKEN, r"/preupload/main$", r"the token may not write to 'alice/m' on \S+ \(403\)"),
    ],
    ids=["no token", "read-only token", "unknown token", "403 on commit", "403 on preupload"],
)
def test_publish_with_a_token_that_may_not_write(
    token: str | None,
    fault: str | None,
    pattern: str,
    model_folder: Path,
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(model_folder.parent / "no-login"))
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    if fault:  # the preflight passes; the Hub refuses the upload itself
        hub.inject("status", method="POST", path=fault, status=403, times=None)
    argv = ["publish", "--folder", "model", "--repo-id", "alice/m", "--endpoint", hub.url]
    line = refused(argv, pattern, model_folder.parent, capsys, skip=(hub.storage,))
    assert hub.stats["commits"] == 0
    assert token is None or token not in line


# -- run, train, validate


def write_config(root: Path, **fields: object) -> Path:
    """A config of the tiny demo whose fields are replaced by `fields` (dotted keys)."""
    data: dict = {
        "run_name": "t",
        "output_dir": str(root / "out"),
        "model": {"name": "builtin:tiny-llama"},
        "data": {"datasets": [{"path": "builtin:number-words"}]},
    }
    for key, value in fields.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    path = root / "c.yaml"
    path.write_text(json.dumps(data))
    return path


CONFIG_CASES: dict[str, tuple[Damage, str]] = {
    # case: (what the test makes, the error line's pattern); ./c.yaml is the config
    "config missing": (lambda r: None, r"^error: config file 'c.yaml' not found"),
    "config is a folder": (lambda r: (r / "c.yaml").mkdir(), r"config file 'c.yaml' not found"),
    "model.name a missing folder": (
        lambda r: write_config(r, model__name="./x"),
        r"^error: model.name './x': no such folder; check the path$",
    ),
    "model.name a missing folder under an existing one": (
        lambda r: write_config(r, model__name=f"{r}/models/llama"),
        r"model.name '.*/models/llama': no such folder",
    ),
    "model.name a folder without config.json": (
        lambda r: [(r / "m").mkdir(), write_config(r, model__name="./m")],
        r"model.name './m' is not a model folder \(no config.json\)",
    ),
    "model.name with a damaged config.json": (
        lambda r: [
            (r / "m").mkdir(),
            (r / "m/config.json").write_text("{"),
            write_config(r, model__name="./m"),
        ],
        r"m/config.json' is not valid JSON .*: copy or download model.name './m' again",
    ),
    "output_dir under a file": (
        lambda r: [(r / "file").write_text("x"), write_config(r, output_dir=str(r / "file/out"))],
        r"output_dir '.*/file/out' is under '.*/file', which is a file, not a folder",
    ),
    "output_dir is a file": (
        lambda r: [(r / "file").write_text("x"), write_config(r, output_dir=str(r / "file"))],
        r"output_dir '.*/file' is a file, not a folder",
    ),
}


@pytest.mark.parametrize("command", ["validate", "train", "run"])
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_paths_are_refused_before_anything_runs(
    command: str, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, pattern = CONFIG_CASES[case]
    make(tmp_path)
    refused([command, "c.yaml"], pattern, tmp_path, capsys)


def test_a_path_like_model_name_is_never_a_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_finetune.base_model import resolve_base
    from llm_finetune.config import ModelConfig
    from llm_finetune.errors import UserError

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("Hub"))
    for name in ("./x", "/nonexistent/x", "x/", "a/b/c"):
        with pytest.raises(UserError, match=f"^model.name '{re.escape(name)}': no such folder"):
            resolve_base(ModelConfig(name=name))


# -- hub-server


@pytest.fixture
def never_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused storage must stop the command before it serves (and so, here, hangs)."""
    from llm_finetune import hub_server

    monkeypatch.setattr(hub_server, "serve_forever", lambda *args: pytest.fail("it served"))


@pytest.mark.usefixtures("never_serves")
def test_hub_server_storage_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "file").write_text("x")
    for storage, pattern in [
        ("file/hub", r"--storage 'file/hub' is under '.*file', which is a file"),
        ("file", r"--storage 'file' is a file, not a folder"),
    ]:
        refused(["hub-server", "--port", "0", "--storage", storage], pattern, tmp_path, capsys)


@pytest.mark.usefixtures("never_serves")
def test_hub_server_storage_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere
    argv = ["hub-server", "--port", "0", "--storage", "hub"]
    refused(argv, r"--storage 'hub': this user may not write in '.*'", tmp_path, capsys)


@pytest.mark.parametrize(
    ("port", "pattern"),
    [
        ("in use", r"^error: --port \d+ is in use on 127.0.0.1 \(another hub-server\?\)"),
        ("70000", r"^error: --port 70000: a port is a number from 0 \(any free port\) to 65535$"),
    ],
)
def test_hub_server_port(
    port: str, pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = str(taken.getsockname()[1]) if port == "in use" else port
        argv = ["hub-server", "--port", number, "--storage", "new/hub"]
        refused(argv, pattern, tmp_path, capsys)  # the storage made before the bind is removed
    assert not (tmp_path / "new").exists()


# -- the bug handler


@pytest.mark.parametrize("world", [1, 2])
def test_a_bug_is_one_line_and_a_log_file_without_the_token(
    world: int,
    tmp_path: Path,
    _isolated: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from llm_finetune import cli

    def broken(args: object) -> int:
        raise RuntimeError(f"boom with {CANARY}\nsecond line")

    monkeypatch.setattr(cli, "cmd_hub_server", broken)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(["hub-server", "--storage", "s"], capsys)

    assert code == 1 and out == ""
    line = assert_one_error(
        err,
        r"^error: unexpected failure, a bug in llm-finetune \(RuntimeError: boom with <token>\); "
        r"the full traceback is in (\S+\.log): please report it with that file$",
    )
    log = Path(re.search(r"is in (\S+\.log):", line)[1])
    assert log.parent == _isolated and log.name.startswith(
        "llm-finetune-bug-rank0-" if world > 1 else "llm-finetune-bug-"
    )
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text
    assert "command: llm-finetune hub-server --storage s" in text
    assert "second line" in text and CANARY not in text + err


def test_a_bug_during_a_run_logs_into_its_output_folder(
    tmp_path: Path,
    _isolated: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from llm_finetune import pipeline

    def broken(config: object, until: str) -> dict:
        (tmp_path / "out").mkdir()
        raise KeyError("stage")

    monkeypatch.setattr(pipeline, "run", broken)
    code, _, err = run_cli(["run", str(write_config(tmp_path))], capsys)

    assert code == 1
    line = assert_one_error(err, r"a bug in llm-finetune \(KeyError: 'stage'\)")
    logs = list((tmp_path / "out").glob("llm-finetune-bug-*.log"))
    assert len(logs) == 1 and str(logs[0]) in line and "KeyError" in logs[0].read_text()
    assert list(_isolated.iterdir()) == []


def test_a_bug_whose_log_cannot_be_written_still_shows_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llm_finetune import cli

    def broken(args: object) -> int:
        raise ValueError("boom")

    def no_space(*args: object, **kwargs: object):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli, "cmd_hub_server", broken)
    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    code, _, err = run_cli(["hub-server", "--storage", "s"], capsys)
    assert code == 1
    assert err.startswith(
        "error: unexpected failure, a bug in llm-finetune (ValueError: boom); no log file could "
        "be written, so here is its traceback:\n"
    )
    assert "Traceback (most recent call last)" in err


def test_a_full_disk_is_the_users_to_fix_not_a_bug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], _isolated: Path
) -> None:
    from llm_finetune import cli

    def full(args: object) -> int:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")
        except OSError as exc:  # as a library wraps it
            raise RuntimeError("file write failed") from exc

    monkeypatch.setattr(cli, "cmd_hub_server", full)
    code, _, err = run_cli(["hub-server", "--storage", "s"], capsys)
    assert code == 2
    assert_one_error(
        err,
        r"^error: the disk is full while writing '/data/out/model.safetensors' \(No space left "
        r"on device\): free space, or write elsewhere",
    )
    assert list(_isolated.iterdir()) == []


def test_a_transport_error_is_found_inside_the_clients_wrappers() -> None:
    import httpx

    from llm_finetune.hub import connection_error

    cause = httpx.ConnectError("[Errno 111] Connection refused")
    try:
        try:
            raise cause
        except httpx.ConnectError as exc:
            raise RuntimeError("Error while uploading 'model.safetensors'") from exc
    except RuntimeError as wrapped:
        assert connection_error(wrapped) is cause
    assert connection_error(ValueError("no")) is None
