"""Bases named by hub id (issue 24), resolved from a real Hugging Face cache layout built around the tiny samples:
`models--org--name/` with blobs, snapshot symlinks to them and refs/main, the layout huggingface_hub writes.
The network is off in every test: HF_HUB_OFFLINE=1 and an endpoint nobody listens on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.export.manifest import ExportManifest
from moe_export.formats.hub_cache import parse_hub_id
from moe_export.reference.loading import load_without_model
from tests.conftest import SAMPLES

REPO = "meta-llama/Llama-2-7b-hf"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
runner = CliRunner()


def cache_model(hub: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `source`'s files in the cache as snapshot `commit` (files are symlinks to content-addressed blobs)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        if file.is_file():
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no request can leave
    return home


def _checkpoint(tmp_path: Path, base_name: str, sample: str = "lora") -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(SAMPLES / sample, ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    return ckpt


def test_hub_id_spelling() -> None:
    assert parse_hub_id(REPO) == (REPO, None)
    assert parse_hub_id(f"{REPO}@v1.0") == (REPO, "v1.0")
    assert parse_hub_id(f"Qwen/Qwen2-0.5B@{COMMIT_A}") == ("Qwen/Qwen2-0.5B", COMMIT_A)
    for path in ("../tiny-llama", "./x/y", "tiny-llama", "/abs/dir", "a/b/c", "org/"):
        assert parse_hub_id(path) is None, path


def test_onnx_resolves_a_hub_id_base_from_the_cache(tmp_path: Path, hf_home: Path) -> None:
    snapshot = cache_model(hf_home / "hub", REPO, SAMPLES / "tiny-llama", COMMIT_A)
    ckpt, out = _checkpoint(tmp_path, REPO), tmp_path / "out"
    result = runner.invoke(app, ["onnx", str(ckpt), "-o", str(out), "--no-kv-cache"])
    assert result.exit_code == 0, result.output
    assert ExportManifest.load(out).base_model == str(snapshot.resolve())
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (SAMPLES / "tiny-llama" / "config.json").read_text()
    )


def test_base_option_takes_a_revision(tmp_path: Path, hf_home: Path) -> None:
    """ORG/NAME@REV: a commit hash or a branch; without @, refs/main."""
    hub = hf_home / "hub"
    main = cache_model(hub, "mistralai/Mistral-7B-v0.1", SAMPLES / "tiny-mistral", COMMIT_A)
    other = cache_model(hub, "mistralai/Mistral-7B-v0.1", SAMPLES / "tiny-mistral", COMMIT_B, refs=("dev",))
    ckpt = SAMPLES / "goat_mistral"
    for spec, want in (("", main), (f"@{COMMIT_B}", other), ("@dev", other), ("@main", main)):
        loaded = load_without_model(ckpt, base_model=f"mistralai/Mistral-7B-v0.1{spec}")
        assert loaded.base_model_path == want.resolve(), spec


def test_uncached_hub_id_offline_says_what_to_do(tmp_path: Path, hf_home: Path) -> None:
    ckpt, out = _checkpoint(tmp_path, REPO), tmp_path / "out"
    result = runner.invoke(app, ["onnx", str(ckpt), "-o", str(out)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line, line
    for part in (REPO, str(hf_home / "hub"), "HF_HUB_OFFLINE", f"hf download {REPO}", "--base PATH", str(ckpt)):
        assert part in line, (part, line)
    assert not out.exists()
    result = runner.invoke(app, ["inspect", str(ckpt), "--base", f"{REPO}@v2"])
    assert result.exit_code == 2 and f"hf download {REPO} --revision v2" in result.output, result.output


def test_uncached_hub_id_unreachable_hub(tmp_path: Path, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads allowed (HF_HUB_OFFLINE unset) but no hub to reach: one line, exit 2, nothing written."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # conftest sets it for the suite
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    ckpt, out = _checkpoint(tmp_path, REPO), tmp_path / "out"
    result = runner.invoke(app, ["onnx", str(ckpt), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "could not be reached" in result.output and f"hf download {REPO}" in result.output, result.output
    assert not out.exists()


def test_partial_snapshot_is_named(tmp_path: Path, hf_home: Path) -> None:
    """A snapshot that holds only a config (someone once fetched just that) is refused before any load."""
    partial = tmp_path / "config-only"
    partial.mkdir()
    shutil.copy(SAMPLES / "tiny-llama" / "config.json", partial)
    snapshot = cache_model(hf_home / "hub", REPO, partial, COMMIT_A)
    result = runner.invoke(app, ["inspect", str(_checkpoint(tmp_path, REPO))])
    assert result.exit_code == 2 and "holds no weights" in result.output and str(snapshot) in result.output, (
        result.output
    )


def test_a_local_directory_of_that_name_wins(tmp_path: Path, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "meta-llama" / "Llama-2-7b-hf"
    shutil.copytree(SAMPLES / "tiny-llama", local)
    monkeypatch.chdir(tmp_path)
    loaded = load_without_model(SAMPLES / "lora", base_model=REPO)
    assert loaded.base_model_path == local.resolve()
