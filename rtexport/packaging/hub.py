"""Upload a package folder to the Hugging Face Hub (``huggingface_hub``: ``create_repo`` + ``upload_folder``).

The token comes from where huggingface_hub looks (the ``token`` argument, ``HF_TOKEN``, the cached ``hf auth login``)
and is never printed. A dry run lists what would go where and needs neither a token nor the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RtexportError
from . import licenses
from .card import CARD_NAME, fmt_bytes, front_matter, license_file

REPORT_NAME = "report.json"
HUB_URL = "https://huggingface.co"


class HubError(RtexportError):
    """The Hub refused or could not be reached."""


@dataclass
class UploadFile:
    local_path: Path
    path_in_repo: str
    size: int


@dataclass
class PushResult:
    repo_id: str
    url: str
    private: bool
    dry_run: bool
    files: list[UploadFile] = field(default_factory=list)
    commit_url: str | None = None
    token_source: str | None = None  # dry runs: where a real push would take its token from (never the token)
    notes: list[str] = field(default_factory=list)  # what the package still lacks (e.g. a licence text)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def summary_lines(self) -> list[str]:
        visibility = "private" if self.private else "public"
        verb = "would upload" if self.dry_run else "uploaded"
        count = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        lines = [f"{verb} {count} ({fmt_bytes(self.total_bytes)}) to {self.url} "
                 f"({visibility} if the repository is created now; an existing one keeps its visibility)"]
        width = max((len(fmt_bytes(f.size)) for f in self.files), default=0)
        lines += [f"  {fmt_bytes(f.size):>{width}}  {f.path_in_repo}" for f in self.files]
        lines += [f"note: {note}" for note in self.notes]
        if self.dry_run:
            lines.append("token: " + (self.token_source or "none found; a real push needs `hf auth login` or HF_TOKEN"))
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id, "url": self.url, "private": self.private, "dry_run": self.dry_run,
            "commit_url": self.commit_url, "total_bytes": self.total_bytes,
            "files": [{"path_in_repo": f.path_in_repo, "bytes": f.size} for f in self.files],
        }


def default_ignore_patterns() -> list[str]:
    """What a package upload leaves out: hidden files and folders (staging leftovers), caches, and the tuner's
    resumable checkpoints (optimizer state, not part of the model)."""
    from ..tuning.trainer import CHECKPOINT_DIR

    return [".*", "**/.*", "__pycache__/**", "**/__pycache__/**", f"{CHECKPOINT_DIR}/**", f"**/{CHECKPOINT_DIR}/**"]


def list_upload(folder: str | os.PathLike, path_in_repo: str | None = None,
                ignore_patterns: list[str] | None = None) -> list[UploadFile]:
    """The files ``upload_folder`` would send, with the same filtering (huggingface_hub's ``filter_repo_objects``)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    patterns = default_ignore_patterns() if ignore_patterns is None else ignore_patterns
    rel = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo and path_in_repo.strip("/") else ""
    return [UploadFile(rel[r], prefix + r, rel[r].stat().st_size)
            for r in filter_repo_objects(rel.keys(), ignore_patterns=patterns)]


def _check_package(folder: Path, repo_id: str) -> list[str]:
    """Checks that need no network: the card's YAML parses, and the repository name obeys the base model's licence.
    Returns notes on what the package still lacks."""
    notes = []
    if not (folder / CARD_NAME).is_file():
        notes.append(f"no {CARD_NAME}: the repository will have no model card")
    card = folder / CARD_NAME
    if card.is_file():
        try:
            front_matter(card.read_text(encoding="utf-8"))
        except Exception as e:  # yaml.YAMLError or ArtifactMismatch
            raise RtexportError(f"{card}: the model card's YAML metadata does not parse ({str(e).splitlines()[0]})") \
                from None
    report = folder / REPORT_NAME
    if report.is_file():
        try:
            model_id = (json.loads(report.read_text(encoding="utf-8")).get("model") or {}).get("model_id")
        except (json.JSONDecodeError, AttributeError):
            model_id = None
        licenses.check_name(repo_id.split("/")[-1], model_id)
        rule = licenses.rule_for(model_id)
        if rule is not None and license_file(folder) is None:
            notes.append(f"the {rule.family} licence asks for a copy of its agreement with the model "
                         f"({rule.license_link}); the folder has no LICENSE file")
    return notes


def _token_source(token: str | None) -> str | None:
    """Where a token would come from, found without reading it and without the network."""
    if token:
        return "given as an argument"
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    from huggingface_hub import constants

    if Path(constants.HF_TOKEN_PATH).is_file():
        return "the cached login (hf auth login)"
    return None


def _resolve_token(token: str | None) -> str | None:
    if token:
        return token
    import huggingface_hub

    try:
        return huggingface_hub.get_token()
    except Exception:  # a failed OIDC exchange or token refresh: the same as no token
        return None


def _one_line(text: str, token: str | None) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    if token:
        line = line.replace(token, "***")
    return line[:300]


def _hub_error(e: BaseException, repo_id: str, endpoint: str, token: str | None) -> HubError:
    from huggingface_hub import errors

    if isinstance(e, errors.LocalTokenNotFoundError):
        return HubError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    if isinstance(e, errors.OfflineModeIsEnabled):
        return HubError("the Hub is offline here (HF_HUB_OFFLINE is set): unset it to push, or use --dry-run")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return HubError("the Hub rejected the token (401): log in again with `hf auth login` or set HF_TOKEN")
        if status == 403:
            return HubError(f"the token may not write to {repo_id} (403): use a token with write access to it")
        return HubError(f"the Hub refused the upload to {repo_id} ({status or 'error'}): {_one_line(str(e), token)}")
    if isinstance(e, (getattr(errors, "HTTPError", OSError), OSError)):
        return HubError(f"could not reach the Hub at {endpoint}: {type(e).__name__}: {_one_line(str(e), token)}")
    return HubError(f"the upload to {repo_id} failed: {type(e).__name__}: {_one_line(str(e), token)}")


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    path_in_repo: str | None = None,
    endpoint: str | None = None,
    ignore_patterns: list[str] | None = None,
    api: Any = None,
) -> PushResult:
    """Upload ``folder`` to the model repository ``repo_id`` (created if missing, ``private`` then), or with
    ``dry_run`` only list what would be uploaded where. ``api``: an ``HfApi`` to use (default: a new one for
    ``endpoint``/``token``). Raises :class:`HubError` (one line, never the token) when not logged in, offline, or
    refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RtexportError(f"{folder} is not a folder: nothing to push")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception:
        raise RtexportError(f"{repo_id!r} is not a valid Hub repository id (owner/name)") from None
    notes = _check_package(folder, repo_id)
    files = list_upload(folder, path_in_repo, ignore_patterns)
    if not files:
        raise RtexportError(f"{folder} has no files to upload")
    base_url = (endpoint or os.environ.get("HF_ENDPOINT") or HUB_URL).rstrip("/")
    result = PushResult(repo_id=repo_id, url=f"{base_url}/{repo_id}", private=private, dry_run=dry_run, files=files,
                        notes=notes)
    if dry_run:
        result.token_source = _token_source(token)
        return result

    if api is None:
        if _resolve_token(token) is None:
            raise HubError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
        from huggingface_hub import HfApi

        from .. import __version__

        api = HfApi(endpoint=endpoint, token=token, library_name="rtexport", library_version=__version__)
    from .. import __version__

    message = commit_message or f"Upload {folder.name} with rtexport {__version__}"
    patterns = default_ignore_patterns() if ignore_patterns is None else ignore_patterns
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                                 commit_message=message, ignore_patterns=patterns, repo_type="model")
    except RtexportError:
        raise
    except Exception as e:  # huggingface_hub and HTTP client errors, mapped to one line without the token
        raise _hub_error(e, repo_id, base_url, token) from None
    result.commit_url = getattr(info, "commit_url", None)
    return result
