"""The local Hub stand-in, exercised through the real ``huggingface_hub`` client.

Most tests run the client in-process with the offline/Xet switches monkeypatched (they are read
as module attributes at call time); the transformers end-to-end check runs in a subprocess with
``HF_ENDPOINT`` pointing at the server, exactly as the demo does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from llm_finetune.hub_server import HubServer, HubUser

ALICE, BOB, READER = "tok-alice", "tok-bob", "tok-reader"
USERS = {
    ALICE: HubUser("alice", orgs=("team",)),
    BOB: HubUser("bob"),
    READER: HubUser("rita", can_write=False),
}
LFS_SIZE = 1_500_000  # > 1 MiB, so LFS even without the .safetensors suffix


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub", USERS) as srv:
        yield srv
    if srv.unknown_routes:  # make API gaps visible in the test output
        warnings.warn(f"hub_server: 404 for unknown routes {srv.unknown_routes}", stacklevel=1)


@pytest.fixture
def api(server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Factory for in-process clients; the env-derived switches are patched at call time."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # Agent detection would fetch a registry from huggingface.co: give it an empty one.
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return lambda token=ALICE: HfApi(endpoint=server.url, token=token)


def _status(exc: pytest.ExceptionInfo[HfHubHTTPError]) -> int:
    return exc.value.response.status_code


def _model_folder(root: Path, readme: str = "hello\n") -> Path:
    folder = root / "upload"
    folder.mkdir(exist_ok=True)
    (folder / "README.md").write_text(readme)
    (folder / "model.safetensors").write_bytes(os.urandom(LFS_SIZE))
    return folder


def test_whoami_and_bad_token(api) -> None:
    me = api().whoami()
    assert me["name"] == "alice" and me["orgs"][0]["name"] == "team"
    assert me["auth"]["accessToken"]["role"] == "write"
    assert api(READER).whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as exc:
        api("not-a-token").whoami()
    assert _status(exc) == 401


def test_create_repo_conflict_and_permissions(api) -> None:
    url = api().create_repo("alice/m")
    assert url.repo_id == "alice/m"
    with pytest.raises(HfHubHTTPError) as exc:
        api().create_repo("alice/m")
    assert _status(exc) == 409
    assert api().create_repo("alice/m", exist_ok=True).repo_id == "alice/m"
    assert api().create_repo("team/shared").repo_id == "team/shared"  # an org of alice
    with pytest.raises(HfHubHTTPError) as exc:
        api().create_repo("bob/m")
    assert _status(exc) == 403
    with pytest.raises(HfHubHTTPError) as exc:
        api(READER).create_repo("rita/m")
    assert _status(exc) == 403
    with pytest.raises(HfHubHTTPError) as exc:
        api(READER).upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="alice/m")
    assert _status(exc) == 403
    api().delete_repo("alice/m")
    assert not api().repo_exists("alice/m")


def test_upload_folder_one_commit_and_lfs_dedup(api, server: HubServer, tmp_path: Path) -> None:
    client = api()
    client.create_repo("alice/m")
    folder = _model_folder(tmp_path)
    client.upload_folder(repo_id="alice/m", folder_path=folder)
    commits = client.list_repo_commits("alice/m")
    assert [c.title for c in commits][1:] == ["initial commit"]  # both files in ONE commit
    tree = {f.path: f for f in client.list_repo_tree("alice/m")}
    assert tree["README.md"].lfs is None and tree["README.md"].size == 6
    assert tree["model.safetensors"].lfs.size == LFS_SIZE
    assert server.stats["lfs_bytes_received"] == LFS_SIZE

    client.upload_folder(repo_id="alice/m", folder_path=folder)  # unchanged: no commit, no PUT
    assert len(client.list_repo_commits("alice/m")) == 2
    (folder / "README.md").write_text("changed\n")
    client.upload_folder(repo_id="alice/m", folder_path=folder)  # LFS object already stored
    assert len(client.list_repo_commits("alice/m")) == 3
    assert server.stats["lfs_bytes_received"] == LFS_SIZE
    assert server.stats["lfs_uploads"] == 1


def test_downloads_are_byte_identical(api, server: HubServer, tmp_path: Path) -> None:
    api().create_repo("alice/m")
    folder = _model_folder(tmp_path)
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("nested")
    api().upload_folder(repo_id="alice/m", folder_path=folder)
    files = ["README.md", "model.safetensors", "sub/notes.txt"]
    assert api().list_repo_files("alice/m") == [".gitattributes", *files]

    snap = Path(snapshot_download("alice/m", endpoint=server.url, cache_dir=tmp_path / "c1"))
    for name in files:
        one = hf_hub_download("alice/m", name, endpoint=server.url, cache_dir=tmp_path / "c2")
        assert (snap / name).read_bytes() == (folder / name).read_bytes() == Path(one).read_bytes()
    assert api().file_exists("alice/m", "sub/notes.txt")
    assert not api().file_exists("alice/m", "missing.txt")
    assert api().repo_exists("alice/m") and not api().repo_exists("alice/nope")


def test_resolve_head_and_range(api, server: HubServer, tmp_path: Path) -> None:
    api().create_repo("alice/m")
    folder = _model_folder(tmp_path)
    api().upload_folder(repo_id="alice/m", folder_path=folder)
    data = (folder / "model.safetensors").read_bytes()
    url = f"{server.url}/alice/m/resolve/main/model.safetensors"
    with httpx.Client() as http:
        head = http.head(url)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["X-Linked-Size"] == str(LFS_SIZE) and head.headers["X-Repo-Commit"]
        part = http.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20]
        missing = http.get(f"{server.url}/alice/m/resolve/main/nope.txt")
        assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


def test_branch_and_revision_uploads(api, server: HubServer, tmp_path: Path) -> None:
    client = api()
    client.create_repo("alice/m")
    client.create_branch("alice/m", branch="dev")
    client.upload_folder(repo_id="alice/m", folder_path=_model_folder(tmp_path), revision="dev")
    assert "model.safetensors" in client.list_repo_files("alice/m", revision="dev")
    assert "model.safetensors" not in client.list_repo_files("alice/m")
    refs = {b.name: b.target_commit for b in client.list_repo_refs("alice/m").branches}
    assert set(refs) == {"main", "dev"}
    path = hf_hub_download(
        "alice/m", "README.md", revision=refs["dev"], endpoint=server.url, cache_dir=tmp_path
    )
    assert Path(path).read_text() == "hello\n"
    with pytest.raises(RevisionNotFoundError):
        client.upload_file(
            path_or_fileobj=b"x", path_in_repo="x", repo_id="alice/m", revision="nope"
        )


def test_private_repo_is_invisible_to_others(api, server: HubServer, tmp_path: Path) -> None:
    api().create_repo("alice/secret", private=True)
    api().upload_file(path_or_fileobj=b"s3cret", path_in_repo="s.txt", repo_id="alice/secret")
    assert api().model_info("alice/secret").private
    assert not api(BOB).repo_exists("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "s.txt", endpoint=server.url, cache_dir=tmp_path, token=BOB)
    with pytest.raises(RepositoryNotFoundError):
        api(False).model_info("alice/secret")  # anonymous


def _raw_commit(server: HubServer, repo: str, *ops: dict, parent: str | None = None):
    header = {"summary": "raw", "description": ""} | ({"parentCommit": parent} if parent else {})
    lines = [{"key": "header", "value": header}, *ops]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return httpx.post(
        f"{server.url}/api/models/{repo}/commit/main",
        content=body,
        headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/x-ndjson"},
    )


def test_commits_are_atomic_and_validated(api, server: HubServer) -> None:
    api().create_repo("alice/m")
    head = api().model_info("alice/m").sha
    new_file = {"key": "file", "value": {"path": "a.txt", "content": "YQ==", "encoding": "base64"}}
    ghost = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64}}
    missing = {"key": "deletedFile", "value": {"path": "missing.txt"}}
    assert _raw_commit(server, "alice/m", new_file, ghost).status_code == 422
    assert _raw_commit(server, "alice/m", new_file, missing).status_code == 404
    assert api().model_info("alice/m").sha == head  # nothing landed
    ok = _raw_commit(server, "alice/m", new_file, parent=head)
    assert ok.status_code == 200 and ok.json()["commitOid"] == api().model_info("alice/m").sha
    assert _raw_commit(server, "alice/m", new_file, parent=head).status_code == 412  # stale parent


def test_concurrent_commits_all_land(api, server: HubServer) -> None:
    api().create_repo("alice/m")
    ops = [{"key": "file", "value": {"path": f"f{i}.txt", "content": "eA==", "encoding": "base64"}}
           for i in range(8)]  # fmt: skip
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda op: _raw_commit(server, "alice/m", op).status_code, ops))
    assert codes == [200] * 8
    assert len(api().list_repo_commits("alice/m")) == 9  # a linear history, nothing lost
    assert len(api().list_repo_files("alice/m")) == 9


def test_lfs_upload_is_verified(api, server: HubServer) -> None:
    api().create_repo("alice/m")
    data = b"weights" * 1000
    oid = hashlib.sha256(data).hexdigest()
    auth = {"Authorization": f"Bearer {ALICE}"}
    batch = httpx.post(
        f"{server.url}/alice/m.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
        headers=auth,
    ).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert httpx.put(href, content=data[:-1] + b"X").status_code == 400  # wrong content
    assert httpx.put(href + "0", content=data).status_code == 403  # tampered signature
    assert httpx.post(href, json={"oid": oid, "size": len(data)}).status_code == 404
    chunked = iter([data[:1000], data[1000:]])  # no Content-Length: chunked transfer encoding
    assert httpx.put(href, content=chunked).status_code == 200
    assert httpx.post(href, json={"oid": oid, "size": len(data)}).status_code == 200
    op = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid}}
    assert _raw_commit(server, "alice/m", op).status_code == 200
    assert httpx.get(f"{server.url}/alice/m/resolve/main/w.bin").content == data


def test_storage_survives_restart_and_tokens_stay_out_of_logs(
    api, server: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llm_finetune.hub_server")
    api().create_repo("alice/m")
    api().upload_file(path_or_fileobj=b"kept", path_in_repo="k.txt", repo_id="alice/m")
    assert ALICE not in caplog.text and "Authorization" not in caplog.text
    with HubServer(server.storage, USERS) as again:
        assert httpx.get(f"{again.url}/alice/m/resolve/main/k.txt").content == b"kept"
        assert HfApi(endpoint=again.url, token=ALICE).list_repo_files("alice/m")[-1] == "k.txt"


def test_unknown_route_is_a_json_404(server: HubServer) -> None:
    reply = httpx.get(f"{server.url}/api/definitely-not-a-route")
    assert reply.status_code == 404 and "error" in reply.json()
    assert server.unknown_routes == ["GET /api/definitely-not-a-route"]
    server.unknown_routes.clear()  # expected: keep the fixture's gap report for real gaps


def test_serve_forever_open_dev_mode(tmp_path: Path) -> None:
    """The CLI entry point: any token is user "demo", Ctrl-C (SIGINT) exits cleanly."""
    code = "import sys; from llm_finetune.hub_server import serve_forever; "
    code += "serve_forever(0, sys.argv[1], None)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "hub")],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().split(" at ", 1)[1].split()[0]  # type: ignore[union-attr]
        auth = {"Authorization": "Bearer anything"}
        assert httpx.get(f"{url}/api/whoami-v2", headers=auth).json()["name"] == "demo"
        assert httpx.get(f"{url}/api/whoami-v2").status_code == 401
        created = httpx.post(f"{url}/api/repos/create", json={"name": "x"}, headers=auth)
        assert created.json()["name"] == "demo/x"
        assert httpx.post(f"{url}/api/repos/create", json={"name": "y"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Stopping" in out


def test_from_pretrained_end_to_end(server: HubServer, tmp_path: Path) -> None:
    """A tiny Llama: save_pretrained -> upload_folder -> plain from_pretrained("alice/tiny")."""
    pytest.importorskip("transformers")
    script = textwrap.dedent(
        """
        import sys, torch
        from huggingface_hub import HfApi
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        model = LlamaForCausalLM(config)
        model.save_pretrained(sys.argv[1])
        api = HfApi(token=sys.argv[2])
        api.create_repo("alice/tiny")
        api.upload_folder(repo_id="alice/tiny", folder_path=sys.argv[1])
        loaded = AutoModelForCausalLM.from_pretrained("alice/tiny")
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys(), (ours.keys(), theirs.keys())
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        print("weights equal")
        """
    )
    prefixes = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env |= {
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_ENDPOINT": server.url,
        "NO_PROXY": "127.0.0.1,localhost",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "tiny"), ALICE],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "weights equal" in result.stdout
    assert server.stats["lfs_uploads"] == 1  # model.safetensors went through LFS


# -- fault injection


def _lfs_href(server: HubServer, repo: str, data: bytes) -> str:
    oid = hashlib.sha256(data).hexdigest()
    batch = httpx.post(
        f"{server.url}/{repo}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
        headers={"Authorization": f"Bearer {ALICE}"},
    ).json()
    return batch["objects"][0]["actions"]["upload"]["href"]


def test_injected_status_fires_a_bounded_number_of_times(api, server: HubServer) -> None:
    whoami = f"{server.url}/api/whoami-v2"
    auth = {"Authorization": f"Bearer {ALICE}"}
    rule = server.inject("status", method="GET", path=r"^/api/whoami", status=503, times=2)
    server.inject("status", method="POST", path=r"^/api/whoami", status=500)  # other method
    codes = [httpx.get(whoami, headers=auth).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert rule.claimed == 2 and rule.fired.is_set() and server.stats["faults_fired"] == 2
    server.inject("status", path="whoami", status=401, times=None)
    with pytest.raises(HfHubHTTPError) as exc:
        api().whoami()
    assert _status(exc) == 401
    server.clear_faults()
    assert api().whoami()["name"] == "alice"


def test_injected_drop_cuts_the_body_at_an_exact_offset(api, server: HubServer) -> None:
    api().create_repo("alice/m")
    data = os.urandom(LFS_SIZE)
    href = _lfs_href(server, "alice/m", data)
    rule = server.inject("drop", method="PUT", path=r"^/lfs-upload/", after_bytes=100_000)
    with pytest.raises(httpx.TransportError):  # no answer: the connection just ends
        httpx.put(href, content=data)
    assert rule.fired.is_set()
    assert server.bytes_received(r"^/lfs-upload/", method="PUT") == 100_000
    assert server.stats["lfs_uploads"] == 0  # the cut-off upload was not stored
    assert httpx.put(href, content=data).status_code == 200  # times=1: the next one passes
    assert server.bytes_received(r"^/lfs-upload/", method="PUT") == 100_000 + LFS_SIZE
    assert server.stats["lfs_bytes_received"] == LFS_SIZE


def test_a_lost_reply_still_applies_the_commit(api, server: HubServer) -> None:
    api().create_repo("alice/m")
    server.inject("lose_reply", method="POST", path=r"/commit/")
    op = {"key": "file", "value": {"path": "a.txt", "content": "YQ==", "encoding": "base64"}}
    with pytest.raises(httpx.TransportError):
        _raw_commit(server, "alice/m", op)
    assert "a.txt" in api().list_repo_files("alice/m")  # it landed; the client cannot know


def test_a_stall_ends_when_released_or_hangs_up(api, server: HubServer) -> None:
    whoami = f"{server.url}/api/whoami-v2"
    auth = {"Authorization": f"Bearer {ALICE}"}
    rule = server.inject("stall", path="whoami", seconds=60)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(httpx.get, whoami, headers=auth, timeout=30)
        assert rule.wait_fired(10)
        server.clear_faults()  # goes on as if the wait was over
        assert pending.result().status_code == 200
        rule = server.inject("stall", path="whoami", seconds=60)
        pending = pool.submit(httpx.get, whoami, headers=auth, timeout=30)
        assert rule.wait_fired(10)
        server.clear_faults(hang_up=True)  # ends without an answer
        with pytest.raises(httpx.TransportError):
            pending.result()
    with pytest.raises(httpx.ReadTimeout):  # a stall is what a client timeout is for
        server.inject("stall", path="whoami", seconds=5)
        httpx.get(whoami, headers=auth, timeout=0.3)
    server.clear_faults(hang_up=True)


def test_inject_rejects_what_it_cannot_do(server: HubServer) -> None:
    with pytest.raises(ValueError, match="unknown fault action"):
        server.inject("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be an error"):
        server.inject("status", status=200)
    with pytest.raises(ValueError, match="times must be"):
        server.inject("drop", times=0)
    with pytest.raises(re.error):
        server.inject("drop", path="(")
    assert server.faults == []
