"""A stand-in for the Hugging Face Hub that serves one model repository's files, enough for huggingface_hub's
`model_info(files_metadata=True)`, the repository tree, `hf_hub_download` and `snapshot_download` over plain
HTTP (no Xet)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.worker_process import serving_in_thread

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _git_blob_id(content: bytes) -> str:
    """The id git gives a file's content (SHA-1 as git uses it, not for security)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def build_app(repo_id: str, files: dict[str, bytes], lfs: frozenset[str]) -> Starlette:
    """Serve `files` as the repository `repo_id` at COMMIT; the names in `lfs` are large files (sha256 etags)."""

    def sibling(name: str) -> dict[str, object]:
        content = files[name]
        entry: dict[str, object] = {"rfilename": name, "size": len(content), "blobId": _git_blob_id(content)}
        if name in lfs:
            entry["lfs"] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "pointerSize": 130}
        return entry

    async def info(request: Request) -> Response:
        if f"{request.path_params['org']}/{request.path_params['name']}" != repo_id:
            return JSONResponse({"error": "Repository not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound"})
        return JSONResponse({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                             "siblings": [sibling(name) for name in files]})

    async def tree(request: Request) -> Response:
        entries = []
        for name in files:
            entry = sibling(name)
            listed: dict[str, object] = {"type": "file", "oid": entry["blobId"], "size": entry["size"], "path": name}
            if "lfs" in entry:
                lfs_info = entry["lfs"]
                assert isinstance(lfs_info, dict)
                listed["lfs"] = {"oid": lfs_info["sha256"], "size": lfs_info["size"], "pointerSize": 130}
            entries.append(listed)
        return JSONResponse(entries)

    async def resolve(request: Request) -> Response:
        name = request.path_params["filename"]
        if name not in files:
            return JSONResponse({"error": "Entry not found"}, status_code=404,
                                headers={"X-Error-Code": "EntryNotFound"})
        content = files[name]
        etag = hashlib.sha256(content).hexdigest() if name in lfs else _git_blob_id(content)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT, "Content-Length": str(len(content))}
        body = b"" if request.method == "HEAD" else content
        return Response(body, headers=headers, media_type="application/octet-stream")

    return Starlette(routes=[
        Route("/api/models/{org}/{name}/revision/{revision}", info),
        Route("/api/models/{org}/{name}/tree/{revision}", tree),
        Route("/api/models/{org}/{name}", info),
        Route("/{org}/{name}/resolve/{revision}/{filename:path}", resolve, methods=["GET", "HEAD"]),
    ])


@contextmanager
def serve_hub_files(repo_id: str, files: dict[str, bytes], lfs: frozenset[str]) -> Iterator[str]:
    """Serve the repository on a thread and yield the endpoint to give huggingface_hub as HF_ENDPOINT."""
    with serving_in_thread(build_app(repo_id, files, lfs)) as base_url:
        yield base_url
