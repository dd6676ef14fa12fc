"""A stand-in for the Hugging Face Hub (unreachable from these machines), serving local folders.

Only the four calls huggingface_hub's `snapshot_download` makes are answered: repo info, the
file tree, and HEAD and GET of each file. Files are announced as LFS objects with their real
sha256, the way the Hub serves weights. So a cache filled from this server is laid out by
huggingface_hub's own download code: blobs, refs/main, snapshots/<commit> links and the tree
listing, exactly what it writes for a real download.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class Repo:
    folder: Path
    commit: str = field(init=False)
    files: dict[str, tuple[str, int]] = field(init=False)  # path -> (sha256, size)

    def __post_init__(self) -> None:
        self.files = {}
        for path in sorted(self.folder.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                rel = path.relative_to(self.folder).as_posix()
                self.files[rel] = (hashlib.sha256(data).hexdigest(), len(data))
        listing = "".join(f"{name} {sha}\n" for name, (sha, _) in self.files.items())
        self.commit = hashlib.sha1(listing.encode()).hexdigest()


class FakeHub:
    """An ASGI app serving `repos` (id -> folder); `requests` counts what was asked."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {repo_id: Repo(folder) for repo_id, folder in repos.items()}
        self.downloads: list[str] = []
        self.app = Starlette(
            routes=[
                Route("/api/models/{org}/{name}/revision/{revision}", self.info),
                Route("/api/models/{org}/{name}/tree/{revision}", self.tree),
                Route(
                    "/{org}/{name}/resolve/{revision}/{path:path}",
                    self.resolve,
                    methods=["GET", "HEAD"],
                ),
            ]
        )

    def _repo(self, request: Request) -> tuple[str, Repo] | None:
        repo_id = f"{request.path_params['org']}/{request.path_params['name']}"
        repo = self.repos.get(repo_id)
        return (repo_id, repo) if repo is not None else None

    @staticmethod
    def _missing() -> Response:
        # The Hub's answer for an unknown repo; huggingface_hub maps it to RepositoryNotFoundError.
        return JSONResponse(
            {"error": "Repository not found"},
            status_code=404,
            headers={"X-Error-Code": "RepoNotFound"},
        )

    async def info(self, request: Request) -> Response:
        found = self._repo(request)
        if found is None:
            return self._missing()
        repo_id, repo = found
        siblings = [{"rfilename": name} for name in repo.files]
        return JSONResponse({"id": repo_id, "sha": repo.commit, "siblings": siblings})

    async def tree(self, request: Request) -> Response:
        found = self._repo(request)
        if found is None:
            return self._missing()
        _, repo = found
        entries = [
            {
                "type": "file",
                "path": name,
                "size": size,
                "oid": hashlib.sha1(name.encode()).hexdigest(),  # the git pointer's id
                "lfs": {"oid": sha, "size": size, "pointerSize": 134},
            }
            for name, (sha, size) in repo.files.items()
        ]
        return JSONResponse(entries)

    async def resolve(self, request: Request) -> Response:
        found = self._repo(request)
        path = request.path_params["path"]
        if found is None or path not in found[1].files:
            return self._missing()
        _, repo = found
        sha, size = repo.files[path]
        headers = {
            "X-Repo-Commit": repo.commit,
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(size),
            "ETag": f'"{sha}"',
        }
        if request.method == "HEAD":
            return Response(headers={**headers, "Content-Length": str(size)})
        self.downloads.append(path)
        return Response((repo.folder / path).read_bytes(), headers=headers)
