"""Hub access before training: the token, the namespace, the repo, on the local server."""

from __future__ import annotations

import pytest

from llm_finetune.errors import UserError
from llm_finetune.hub import preflight, require_token
from tests.conftest import GOOD_TOKEN, READ_TOKEN


def test_preflight_rejects_a_bad_token_without_showing_it(hub):
    bad = "hf_this_token_is_wrong_123456"
    with pytest.raises(UserError, match="401") as caught:
        preflight("alice/model", hub.url, bad, private=False)
    assert bad not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_preflight_needs_a_token(hub):
    with pytest.raises(UserError, match="no Hub token"):
        preflight("alice/model", hub.url, None, private=False)


def test_require_token_says_how_to_provide_one():
    assert require_token(GOOD_TOKEN) == GOOD_TOKEN
    with pytest.raises(UserError, match=r"export HF_TOKEN=<token> or run `hf auth login`$"):
        require_token("")
    with pytest.raises(UserError, match=r"`hf auth login` \(or set publish.enabled: false\)$"):
        require_token(None, alternative="set publish.enabled: false")


def test_preflight_checks_the_namespace(hub):
    with pytest.raises(UserError, match="not a member of 'someone-else'"):
        preflight("someone-else/model", hub.url, GOOD_TOKEN, private=False)
    with pytest.raises(UserError, match="read-only"):
        preflight("bob/model", hub.url, READ_TOKEN, private=False)


def test_preflight_creates_the_repo_or_finds_it(hub):
    first = preflight("team/model", hub.url, GOOD_TOKEN, private=True)
    assert (first.user, first.repo_existed) == ("alice", False)
    assert preflight("team/model", hub.url, GOOD_TOKEN, private=True).repo_existed
