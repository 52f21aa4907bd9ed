"""The first hour with the command line (issue 24): help texts, exit codes, which stream gets what, suggested
next commands that survive a path with spaces, and notices a user would otherwise miss."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.cli.app import shell_command
from tests.artifacts import sample_export, shared_export

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
COMMANDS = ["inspect", "calibrate", "merge", "onnx", "trt", "validate", "bench", "kernels", "generate", "triton"]


def _moe_export(*args: str) -> subprocess.CompletedProcess:
    """The installed console script in a real process (streams and exit codes as a shell sees them)."""
    exe = shutil.which("moe-export") or str(Path(sys.executable).parent / "moe-export")
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_bare_command_prints_help_on_stdout_and_exits_0() -> None:
    """As pip does: asking what there is is not an error (it was click's usage error, exit 2, on stderr)."""
    proc = _moe_export()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: moe-export") and "Commands:" in proc.stdout and proc.stderr == ""
    assert _moe_export("no-such-command").returncode == 2  # a wrong command stays a usage error


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_names_arguments_in_capitals(command: str) -> None:
    usage = _help(command).splitlines()[0]
    words = usage.split()[3:]  # Usage: moe-export CMD ...
    assert words and all(w == w.upper() or w.startswith("[") for w in words), usage


def test_calibrate_help_speaks_only_of_calibrate() -> None:
    """The shared options' help used to mention merge's held-out check and `onnx`."""
    text = " ".join(_help("calibrate").split())
    for foreign in ("held-out", "onnx", "(merge:"):
        assert foreign not in text, foreign
    merge_help = " ".join(_help("merge").split())
    assert "held-out" in merge_help


def test_help_states_ranges_and_the_prompt_rule() -> None:
    for command in ("onnx", "merge"):
        text = " ".join(_help(command).split())
        assert "0 < T <= 1" in text and "B >= 0" in text, command
    text = " ".join(_help("generate").split())
    assert "exactly one of --prompt-ids or --prompt" in text


def test_shell_command_quotes_paths_with_spaces() -> None:
    line = shell_command("moe-export", "validate", Path("/tmp/my exports/a'b"), "--junit", "j.xml")
    assert shlex.split(line) == ["moe-export", "validate", "/tmp/my exports/a'b", "--junit", "j.xml"]


def test_calibrate_says_it_ran_fewer_samples_and_what_to_run_next(tmp_path: Path) -> None:
    """The built-in text has 25 calibration samples: --samples 32 used to run 25 without a word. The suggested
    merge command is one a shell runs as printed, even with spaces in the paths."""
    out = tmp_path / "my stats" / "stats.json"
    out.parent.mkdir()
    result = CliRunner().invoke(app, ["calibrate", str(SAMPLES / "goat"), "-o", str(out), "--seq-len", "8"])
    assert result.exit_code == 0, result.output
    recorded = json.loads(out.read_text())["samples"]
    assert recorded < 32  # the text ran out: what the notice is about
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: --samples 32")]
    assert len(notes) == 1 and f"gave {recorded} calibration samples" in notes[0], result.stderr
    suggestion = next(line for line in result.stdout.splitlines() if line.startswith("next: "))
    argv = shlex.split(suggestion.removeprefix("next: ").split("   (")[0])
    assert argv[:3] == ["moe-export", "merge", str(SAMPLES / "goat")] and argv[argv.index("--stats") + 1] == str(out)
    enough = CliRunner().invoke(app, ["calibrate", str(SAMPLES / "goat"), "-o", str(out), "--samples", "4"])
    assert enough.exit_code == 0 and "note: --samples" not in enough.stderr


def test_progress_leaves_no_blank_lines_in_a_log(tmp_path: Path) -> None:
    """A transient progress bar on a non-terminal used to leave an empty line on stderr for each bar."""
    proc = _moe_export("calibrate", "samples/goat", "-o", str(tmp_path / "s.json"), "--samples", "2", "--seq-len", "8")
    assert proc.returncode == 0, proc.stderr
    assert not proc.stderr.startswith("\n") and "\n\n" not in proc.stderr, repr(proc.stderr[:200])
    assert re.search(r"^wrote .*s\.json$", proc.stdout, flags=re.M)  # the result on stdout


def test_readme_commands_block_names_only_real_options() -> None:
    """Every flag the README's Commands block shows is one its command accepts (issue 24: the block had drifted);
    the block lists every command."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("moe-export inspect   CKPT") :]
    block = block[: block.index("```")]
    flags: dict[str, set[str]] = {}
    command = ""
    for line in block.splitlines():
        found = re.match(r"moe-export (\w+)", line)
        command = found.group(1) if found else command
        flags.setdefault(command, set()).update(re.findall(r"--[a-z0-9-]+", line.replace("/--", " --")))
    assert sorted(flags) == sorted(COMMANDS)
    # What the issue found missing (a check of the other direction would fail each time someone adds an option).
    assert "--json" in flags["merge"] and {"--base", "--family", "--data"} <= flags["onnx"]
    assert "onnxruntime-body" in block[block.index("moe-export validate") :]
    for command, shown in flags.items():
        accepted = set(re.findall(r"--[a-z0-9-]+", _help(command)))
        assert shown <= accepted, (command, sorted(shown - accepted))


def test_mixlora_routing_line_counts_units_as_the_export_does(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 24: for MixLoRA, `onnx` said 2 GroupedLoRA units and the routing line 6 units: it counted the
    GroupedLoRASlots nodes (one per gate/up/down projection of each unit)."""
    import onnx
    from rich.console import Console

    import moe_export

    result = sample_export(tmp_path_factory, SAMPLES / "mixlora")
    routed = len(result.manifest.routed_units)
    nodes = sum(
        n.domain == "moe_export" for n in onnx.load(str(result.model_path), load_external_data=False).graph.node
    )
    assert routed == 2 and nodes == 6  # the sample's facts, read from export.json and the graph
    console = Console(record=True, width=300, soft_wrap=True)
    moe_export.validate(result.out_dir, new_tokens=0).render(console)
    (line,) = [line for line in console.export_text().splitlines() if line.startswith("routing (")]
    # route replay's per-unit captures count units (a MixLoRA unit's projections are judged together)
    assert f": {routed} units," in line, line


def test_kernel_notice_is_said_once(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, tiny_base: Path
) -> None:
    """Issue 24: without the native library, its reason was printed as a notice and again in the report."""
    from moe_export.runtimes.native import library

    export = shared_export(tmp_path_factory, tiny_base)
    monkeypatch.setenv("MOE_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOE_EXPORT_ORT_INCLUDE", str(tmp_path / "no-headers"))  # no library can be built
    monkeypatch.delenv("MOE_EXPORT_KERNELS", raising=False)
    monkeypatch.setattr(library, "_session_library", {})  # this process may have found the library before
    result = CliRunner().invoke(app, ["validate", str(export), "--new-tokens", "0"])
    assert result.exit_code == 0, result.output
    reason = "no onnxruntime_cxx_api.h in that folder"
    assert (result.stdout + result.stderr).count(reason) == 1, result.stdout + result.stderr
    assert "onnxruntime: function bodies" in result.stdout  # the report still says what ran
