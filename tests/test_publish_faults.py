"""Publishing under injected faults: the real huggingface_hub client against the local Hub.

Every scenario ends in one of two states, never in between: the whole folder in one verified
commit, or the branch exactly as it was (plus, at most, unreferenced LFS objects that a re-run
reuses). Bytes are counted on the server, so "only what the server lacks is re-sent" is
measured, not assumed. Faults are in the server (`HubServer.inject`); a kill -9 hits a real
`llm-finetune publish` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi

from llm_finetune.errors import UserError
from llm_finetune.hub import RetryPolicy, hub_client_settings
from llm_finetune.hub_server import HubServer, HubUser
from llm_finetune.manifest import MANIFEST, write_manifest
from llm_finetune.publish import publish
from tests.conftest import REPO_ROOT

TOKEN = "hf_faults_writer_0123456789abcdef"
CANARY = "hf_CANARY_7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c1e"  # must never show up anywhere
REPO = "alice/model"
BIG = 12 << 20  # above publish.IN_MEMORY_MAX: streamed from disk, like real shards
SHARDS = (BIG, 3 << 20, 2 << 20)
LFS_TOTAL = sum(SHARDS)
FAST = RetryPolicy(attempts=3, first_wait=0.05, max_wait=0.2, timeout=5.0, client_retries=1)
PUT = r"^/lfs-upload/"
COMMIT = r"/commit/main$"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HubServer]:
    users = {TOKEN: HubUser("alice"), CANARY: HubUser("carol")}
    with HubServer(tmp_path / "hub", users) as srv:
        yield srv


def make_model(root: Path, name: str, seed: int) -> Path:
    """A model-like folder: config, sharded weights + index, tokenizer, card, manifest."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (folder / "generation_config.json").write_text('{"do_sample": false}')
    weight_map = {}
    for i, size in enumerate(SHARDS, 1):
        shard = f"model-{i:05d}-of-{len(SHARDS):05d}.safetensors"
        (folder / shard).write_bytes(rng.randbytes(size))
        weight_map[f"layers.{i}.weight"] = shard
    index = {"metadata": {"total_size": LFS_TOTAL}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "tokenizer.json").write_text(
        json.dumps({"vocab": [f"t{seed}-{i}" for i in range(99)]})
    )
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# model\n")  # same card
    write_manifest(folder, "merge", f"inputs-{seed}")
    return folder


def tree(server: HubServer, repo: str, revision: str = "main") -> dict[str, tuple[int, str]]:
    """path -> (size, sha256 for LFS files / git blob id for regular ones) at `revision`."""
    with hub_client_settings(server.url):
        api = HfApi(endpoint=server.url, token=TOKEN)
        entries = api.list_repo_tree(repo, revision=revision, recursive=True)
        return {e.path: (e.size, e.lfs.sha256 if e.lfs else e.blob_id) for e in entries}


def commits(server: HubServer, repo: str) -> list[str]:
    with hub_client_settings(server.url):
        return [c.commit_id for c in HfApi(endpoint=server.url).list_repo_commits(repo)]


def put_bytes(server: HubServer, oid: str = "") -> int:
    """LFS upload body bytes the server read (for one object if `oid`), cut-off ones included."""
    return server.bytes_received(PUT + (f".*/{oid}/" if oid else ""), method="PUT")


def lfs_objects(folder: Path) -> dict[str, int]:
    """sha256 -> size of the folder's weight shards (the files that go through LFS here)."""
    return {
        hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size
        for p in folder.glob("*.safetensors")
    }


def big_oid(folder: Path) -> str:
    return hashlib.sha256((folder / "model-00001-of-00003.safetensors").read_bytes()).hexdigest()


def assert_holds_exactly(server: HubServer, repo: str, folder: Path) -> None:
    """The repo's files are the folder's files, byte for byte (the manifest stays local)."""
    local = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )
    assert sorted(tree(server, repo)) == sorted([".gitattributes", *local])
    with httpx.Client() as http:
        for name in local:
            got = http.get(f"{server.url}/{repo}/resolve/main/{name}")
            assert got.content == (folder / name).read_bytes(), name


def cli_env(tmp_path: Path, server: HubServer, token: str) -> dict[str, str]:
    prefixes = ("HF_", "HUGGINGFACE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env |= {
        "HF_TOKEN": token,
        "HF_HOME": str(tmp_path / "cli-hf-home"),
        "HF_ENDPOINT": server.url,
        "HF_HUB_OFFLINE": "1",  # publishing to a loopback endpoint must still work
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    return env


def cli_publish(folder: Path, repo: str, server: HubServer) -> list[str]:
    return [sys.executable, "-m", "llm_finetune.cli", "publish", "--folder", str(folder)] + [
        "--repo-id",
        repo,
        "--endpoint",
        server.url,
    ]


# -- the manifest gate


def test_a_file_changed_after_verification_is_never_sent(server: HubServer, tmp_path: Path):
    folder = make_model(tmp_path, "m", seed=1)
    with open(folder / "model-00002-of-00003.safetensors", "r+b") as f:
        f.write(b"\x00")  # same size, different content
    with pytest.raises(UserError, match=r"changed.*model-00002-of-00003"):
        publish(folder, REPO, server.url, TOKEN, retry=FAST)
    assert server.stats["requests"] == 0  # refused before any request


def test_a_file_touched_during_the_upload_is_not_committed(server: HubServer, tmp_path: Path):
    """The big shard is rewritten while the upload runs (during its LFS verify call): the
    publish stops before the commit, and the branch is untouched."""
    folder = make_model(tmp_path, "m", seed=1)
    shard = folder / "model-00001-of-00003.safetensors"
    rule = server.inject(
        "stall", method="POST", path=f"^/lfs-upload/.*/{big_oid(folder)}/", seconds=30
    )

    def touch_then_release() -> None:
        if rule.wait_fired(30):
            shard.write_bytes(shard.read_bytes())  # same bytes, but written after the check
        server.clear_faults()

    with ThreadPoolExecutor(max_workers=1) as pool:
        toucher = pool.submit(touch_then_release)
        with pytest.raises(UserError, match=r"changed after it was checked.*00001-of-00003"):
            publish(folder, REPO, server.url, TOKEN, retry=FAST)
        toucher.result()
    assert server.stats["commits"] == 0 and sorted(tree(server, REPO)) == [".gitattributes"]


# -- transient faults: retried, only what the server lacks is sent again


@pytest.mark.parametrize(
    ("where", "status"),
    [("put", 500), ("put", 503), ("commit", 500), ("commit", 503)],
)
def test_transient_5xx_is_retried(server: HubServer, tmp_path: Path, where: str, status: int):
    folder = make_model(tmp_path, "m", seed=1)
    oid = big_oid(folder)
    if where == "put":  # the client retries the failed PUT itself, inside our attempt
        rule = server.inject("status", method="PUT", path=f"/{oid}/", status=status)
    else:  # the client never retries a commit (a lost reply could duplicate it): we do
        rule = server.inject("status", method="POST", path=COMMIT, status=status)

    report = publish(folder, REPO, server.url, TOKEN, retry=FAST)

    assert rule.claimed == 1
    assert report.attempts == (1 if where == "put" else 2)
    resent = put_bytes(server) - LFS_TOTAL
    assert resent == (BIG if where == "put" else 0)  # the rejected body, nothing else
    assert put_bytes(server, oid) == BIG + resent
    assert len(commits(server, REPO)) == 2  # "initial commit" + ours: one commit
    assert_holds_exactly(server, REPO, folder)


@pytest.mark.parametrize("where", ["put", "commit", "commit_reply"])
def test_dropped_connections_are_retried(server: HubServer, tmp_path: Path, where: str):
    folder = make_model(tmp_path, "m", seed=1)
    oid = big_oid(folder)
    if where == "put":  # cut after 1 MiB of the big shard
        server.inject("drop", method="PUT", path=f"/{oid}/", after_bytes=1 << 20)
    elif where == "commit":  # cut mid-request: the commit never happens
        server.inject("drop", method="POST", path=COMMIT, after_bytes=200)
    else:  # the commit lands but its reply is lost: the retry must not commit twice
        server.inject("lose_reply", method="POST", path=COMMIT)

    report = publish(folder, REPO, server.url, TOKEN, retry=FAST)

    assert report.attempts == (1 if where == "put" else 2)
    assert put_bytes(server) - LFS_TOTAL == (1 << 20 if where == "put" else 0)
    history = commits(server, REPO)
    assert len(history) == 2 and report.commit == history[0]
    assert server.stats["commits"] == 1
    assert report.committed == (where != "commit_reply")  # the retry found it already there
    assert_holds_exactly(server, REPO, folder)


@pytest.mark.parametrize("where", ["put", "commit"])
def test_a_stall_times_out_and_is_retried(server: HubServer, tmp_path: Path, where: str):
    folder = make_model(tmp_path, "m", seed=1)
    if where == "put":  # stalls after 1 MiB of the body; the client's own retry resends it
        rule = server.inject(
            "stall", method="PUT", path=f"/{big_oid(folder)}/", after_bytes=1 << 20, seconds=60
        )
    else:  # stalls before reading the commit, which goes on later: it must not land twice
        rule = server.inject("stall", method="POST", path=COMMIT, seconds=2.5)
    policy = RetryPolicy(attempts=3, first_wait=0.05, max_wait=0.1, timeout=1.0)

    report = publish(folder, REPO, server.url, TOKEN, retry=policy)

    assert rule.fired.is_set()
    if where == "put":
        server.clear_faults(hang_up=True)  # the timed-out PUT reads nothing more
        assert report.attempts == 1
        assert put_bytes(server) - LFS_TOTAL == 1 << 20
    else:
        # The stalled commit and the retry's both have the old head as parent: whichever
        # comes second gets 412 (a retry that then finds the files there), never a 2nd commit.
        server.clear_faults()
        assert report.attempts >= 2
        assert put_bytes(server) == LFS_TOTAL
    assert len(commits(server, REPO)) == 2
    assert_holds_exactly(server, REPO, folder)


# -- persistent and fatal faults: a clear one-line error, nothing half-published


@pytest.mark.parametrize("where", ["put", "commit"])
def test_persistent_503_gives_up_with_the_command_to_resume(
    server: HubServer, tmp_path: Path, where: str
):
    folder = make_model(tmp_path, "m", seed=1)
    path = PUT if where == "put" else COMMIT
    rule = server.inject(
        "status", method="PUT" if where == "put" else "POST", path=path, times=None
    )

    with pytest.raises(UserError) as caught:
        publish(folder, REPO, server.url, TOKEN, retry=FAST)

    message = str(caught.value)
    assert "\n" not in message and TOKEN not in message
    assert "failed 3 times (last: HTTP 503)" in message
    command = f"llm-finetune publish --folder {folder.resolve()} --repo-id {REPO}"
    assert f"`{command} --endpoint {server.url}`" in message
    # each LFS request: 1 + client_retries tries per attempt, for each of the 3 shards
    assert rule.claimed == (3 * 2 * len(SHARDS) if where == "put" else 3)
    assert len(commits(server, REPO)) == 1 and sorted(tree(server, REPO)) == [".gitattributes"]

    server.clear_faults()  # the Hub is back: the re-run sends only what it lacks
    before = put_bytes(server)
    publish(folder, REPO, server.url, TOKEN, retry=FAST)
    assert put_bytes(server) - before == (LFS_TOTAL if where == "put" else 0)
    assert_holds_exactly(server, REPO, folder)


@pytest.mark.parametrize(
    ("status", "path"),
    [(401, r"/preupload/"), (403, PUT), (403, COMMIT), (404, r"/revision/")],
)
def test_auth_and_missing_repo_errors_fail_at_once(
    server: HubServer, tmp_path: Path, status: int, path: str
):
    folder = make_model(tmp_path, "m", seed=1)
    path = f"/{big_oid(folder)}/" if path == PUT else path  # one shard: uploads run in parallel
    rule = server.inject("status", path=path, status=status, times=None)

    with pytest.raises(UserError, match=f"\\({status}\\)") as caught:
        publish(folder, REPO, server.url, TOKEN, retry=FAST)

    assert rule.claimed == 1  # no retry: neither ours nor the client's
    assert "\n" not in str(caught.value) and TOKEN not in str(caught.value)
    assert server.stats["commits"] == 0


# -- kill -9 of a real `llm-finetune publish`, then a re-run


KILL_POINTS = {
    # point: (fault action, method, path, after_bytes, previous commit on the branch?)
    "during_lfs_upload": ("stall", "PUT", "big", 4 << 20, False),
    "after_lfs_before_commit": ("stall", "POST", COMMIT, 0, True),
    "during_commit": ("stall", "POST", COMMIT, 300, True),
    "after_commit_before_reply": ("stall_reply", "POST", COMMIT, 0, True),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_rerun(server: HubServer, tmp_path: Path, point: str):
    action, method, path, after_bytes, previous = KILL_POINTS[point]
    old, new = make_model(tmp_path, "v1", seed=1), make_model(tmp_path, "v2", seed=2)
    if previous:
        publish(old, REPO, server.url, TOKEN, retry=FAST)
    else:
        with hub_client_settings(server.url):
            HfApi(endpoint=server.url, token=TOKEN).create_repo(REPO)
    before, history = tree(server, REPO), commits(server, REPO)
    path = f"/{big_oid(new)}/" if path == "big" else path
    rule = server.inject(action, method=method, path=path, after_bytes=after_bytes, seconds=120)

    proc = subprocess.Popen(
        cli_publish(new, REPO, server),
        cwd=REPO_ROOT,
        env=cli_env(tmp_path, server, TOKEN),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert rule.wait_fired(60), "the publish never reached the kill point"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    server.clear_faults(hang_up=True)  # what was in flight never arrives

    # Before the re-run: the previous state exactly, or (reply lost) the complete new commit.
    if action == "stall_reply":
        assert len(commits(server, REPO)) == len(history) + 1
        assert_holds_exactly(server, REPO, new)
    else:
        assert tree(server, REPO) == before and commits(server, REPO) == history
        if not previous:
            assert sorted(before) == [".gitattributes"]  # nothing of the model
    stored = {
        oid
        for oid in lfs_objects(new)
        if (server.storage / "repos/models" / REPO / "lfs" / oid).exists()
    }
    missing = sum(size for oid, size in lfs_objects(new).items() if oid not in stored)

    sent_before = put_bytes(server)
    report = publish(new, REPO, server.url, TOKEN, retry=FAST)
    resent = put_bytes(server) - sent_before

    assert resent == missing  # exactly the objects the server lacked, nothing it had
    if point == "during_lfs_upload":
        assert big_oid(new) not in stored and resent >= BIG
    else:
        assert resent == 0  # every LFS object had arrived before the kill
    assert len(commits(server, REPO)) == len(history) + 1  # one commit, never two
    assert report.commit == commits(server, REPO)[0]
    assert_holds_exactly(server, REPO, new)
    publish(new, "alice/clean", server.url, TOKEN, retry=FAST)
    assert tree(server, REPO) == tree(server, "alice/clean")


# -- the token


def test_the_token_never_leaks(server: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A full CLI publish through retried faults, then a refused one: the canary token is in
    no output, no log record, no file under the test's folders and not in the server storage."""
    caplog.set_level("DEBUG")
    folder = make_model(tmp_path, "m", seed=3)
    env = cli_env(tmp_path, server, CANARY)
    server.inject("drop", method="PUT", path=f"/{big_oid(folder)}/", after_bytes=1 << 20)
    server.inject("status", method="POST", path=COMMIT, status=503)  # our retry logs a warning
    ok = subprocess.run(
        cli_publish(folder, "carol/model", server),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout)["repo_id"] == "carol/model"
    assert "attempt 1 of 4 failed (HTTP 503)" in ok.stderr
    server.inject("status", method="POST", path=r"/preupload/", status=403)
    refused = subprocess.run(
        cli_publish(folder, "carol/other", server),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "(403)" in refused.stderr

    for text in (ok.stdout, ok.stderr, refused.stdout, refused.stderr, caplog.text):
        assert CANARY not in text
    needle = CANARY.encode()
    scanned = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.is_relative_to(server.storage) for p in scanned)
    assert [p for p in scanned if needle in p.read_bytes()] == []
