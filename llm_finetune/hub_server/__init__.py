"""A small local stand-in for the Hugging Face Hub HTTP API.

It speaks enough of the Hub's protocol for the real, unpatched ``huggingface_hub`` client and
``transformers``' ``from_pretrained`` to work against it, so demos and tests never need the network.
Point clients at it with ``HF_ENDPOINT=<server.url>`` and ``HF_HUB_DISABLE_XET=1`` (only the
legacy git-LFS upload protocol is implemented, not Xet).

Modules, from the top down: ``server`` (HTTP plumbing, authentication, :class:`HubServer`),
``routes`` (the API endpoints), ``faults`` (failures injected by tests), ``request`` (what an
endpoint may use of its request) and ``storage`` (repos, commits and objects on disk,
surviving restarts). Only stdlib is used so the server can run in any environment the
project runs in.
"""

from llm_finetune.hub_server.request import HubUser
from llm_finetune.hub_server.server import HubServer, serve_forever

__all__ = ["HubServer", "HubUser", "serve_forever"]
