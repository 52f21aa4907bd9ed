"""Base models named by Hugging Face hub id (`meta-llama/Llama-2-7b-hf`, `ORG/NAME@REVISION`), from the local cache.

Real adapters name their base by hub id in `base_model_name_or_path`; after training, the base sits in the
user's cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`). The cache is asked first,
without the network; only when the id is not cached, downloads are allowed (`HF_HUB_OFFLINE` unset) and the
hub answers does anything download (huggingface_hub's progress bar), and only the files a causal LM loads from.
Environment variables are read at call time: huggingface_hub reads its own at import.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from moe_export.errors import FormatError

# ORG/NAME[@REVISION]: hub names are letters, digits, '-', '_', '.'; a revision is a branch, tag or commit.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
TRUE_VALUES = {"1", "on", "yes", "true"}
# What a transformers causal LM loads from (weights, configs, tokenizer); never the other formats a repo holds.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `spec` is spelled like a hub id, else None (a path)."""
    match = HUB_ID.match(spec)
    if match is None or any(part in (".", "..") for part in match["repo"].split("/")):
        return None
    return match["repo"], match["revision"]


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_hub_id(repo_id: str, revision: str | None, where: str) -> Path:
    """The snapshot directory of `repo_id` at `revision` (default: main), from the cache, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    spelled = f"{repo_id}@{revision}" if revision else repo_id
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        snapshot = None
    if snapshot is not None:
        return _check_snapshot(snapshot, repo_id, revision, where)
    if offline():
        raise FormatError(
            f"{spelled}: base model not in the Hugging Face cache {cache} ({where}), and HF_HUB_OFFLINE forbids "
            f"downloading it; on a machine with network run `{download_command(repo_id, revision)}` into the same "
            "cache (HF_HOME / HF_HUB_CACHE), "
            "or unset HF_HUB_OFFLINE, or pass --base PATH to a local model directory"
        )
    return _check_snapshot(_download(repo_id, revision, cache, spelled, where), repo_id, revision, where)


def _download(repo_id: str, revision: str | None, cache: Path, spelled: str, where: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    print(f"{spelled}: not in the Hugging Face cache {cache}; downloading it ({where})", file=sys.stderr)
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                allow_patterns=DOWNLOAD_PATTERNS,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
        )
    except GatedRepoError as exc:
        hint = f"the repository is gated: accept its terms on the hub, then `hf auth login` ({where})"
        raise FormatError(f"{spelled}: {hint}") from exc
    except RevisionNotFoundError as exc:
        raise FormatError(f"{spelled}: the hub has no revision {revision!r} of {repo_id} ({where})") from exc
    except RepositoryNotFoundError as exc:
        raise FormatError(
            f"{spelled}: no such model on the hub, or a private one (`hf auth login`) ({where}); "
            "pass --base PATH to a local model directory"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise FormatError(
            f"{spelled}: base model not in the Hugging Face cache {cache} and the hub could not be reached ({reason}) "
            f"({where}); run `{download_command(repo_id, revision)}` where there is network, or pass --base PATH"
        ) from exc


def _check_snapshot(snapshot: Path, repo_id: str, revision: str | None, where: str) -> Path:
    """A cached snapshot may hold only what was once fetched (a config alone): say so instead of failing later."""
    missing = None
    if not (snapshot / "config.json").is_file():
        missing = "no config.json"
    elif not any(any(snapshot.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing = "no weights"
    if missing:
        raise FormatError(
            f"{snapshot}: the cached snapshot of {repo_id} holds {missing} ({where}); run "
            f"`{download_command(repo_id, revision)}` to complete it, or pass --base PATH"
        )
    return snapshot


def download_command(repo_id: str, revision: str | None) -> str:
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
