"""A stand-in for the Hugging Face Hub's API, enough for huggingface_hub's `model_info` and `auth_check`.

It answers as the Hub does (status codes and the `X-Error-Code` / `X-Error-Message` headers that
huggingface_hub turns into its exceptions): a bad token 401 "Invalid credentials in Authorization
header"; a repository that does not exist 404 `RepoNotFound` (401 without a token); a gated repository's
metadata to anyone, its auth-check 200 only for tokens granted access, else 403 `GatedRepo` (401 without a
token); an unknown revision 404 `RevisionNotFound`. Every other repository is public.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.worker_process import serving_in_thread


@dataclass
class HubState:
    valid_tokens: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    gated: dict[str, set[str]] = field(default_factory=dict)  # repository -> tokens granted access
    revisions: set[str] = field(default_factory=lambda: {"main"})
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, bearer token)

    def reset(self) -> None:
        fresh = HubState()
        self.valid_tokens, self.missing, self.gated = fresh.valid_tokens, fresh.missing, fresh.gated
        self.revisions, self.requests = fresh.revisions, fresh.requests


def _error(status: int, code: str | None = None, message: str | None = None) -> Response:
    headers = {}
    if code:
        headers["x-error-code"] = code
    if message:
        headers["x-error-message"] = message
    return JSONResponse({"error": message or code or "error"}, status_code=status, headers=headers)


def build_app(state: HubState) -> Starlette:
    def token_of(request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" and token else None

    def refusal(request: Request, repo: str) -> tuple[Response | None, str | None]:
        token = token_of(request)
        state.requests.append((request.url.path, token))
        if token is not None and token not in state.valid_tokens:
            return _error(401, message="Invalid credentials in Authorization header"), token
        if repo in state.missing:
            return _error(404 if token else 401, "RepoNotFound", "Repository not found"), token
        return None, token

    def info(repo: str) -> Response:
        gated = "manual" if repo in state.gated else False
        return JSONResponse({"id": repo, "modelId": repo, "sha": "0" * 40, "private": False, "gated": gated,
                             "disabled": False, "tags": [], "siblings": []})

    async def model_info(request: Request) -> Response:
        repo = request.path_params["repo"]
        refused, _ = refusal(request, repo)
        return refused or info(repo)

    async def model_revision(request: Request) -> Response:
        repo = request.path_params["repo"]
        refused, _ = refusal(request, repo)
        if refused is not None:
            return refused
        if request.path_params["revision"] not in state.revisions:
            return _error(404, "RevisionNotFound", "Invalid rev id")
        return info(repo)

    async def auth_check(request: Request) -> Response:
        repo = request.path_params["repo"]
        refused, token = refusal(request, repo)
        if refused is not None:
            return refused
        if repo in state.gated and token not in state.gated[repo]:
            return _error(403 if token else 401, "GatedRepo", "Access to this model is restricted")
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/api/models/{repo:path}/auth-check", auth_check),
        Route("/api/models/{repo:path}/revision/{revision}", model_revision),
        Route("/api/models/{repo:path}", model_info),
    ])


@contextmanager
def serve_fake_hub(state: HubState) -> Iterator[str]:
    """Serve the fake hub on a thread (the doctor calls it synchronously) and yield its base URL."""
    with serving_in_thread(build_app(state)) as base_url:
        yield base_url
