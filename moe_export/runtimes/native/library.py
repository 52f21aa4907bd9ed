"""Build and find the native ONNX Runtime kernel library (`grouped_lora.cc`).

The library is compiled on demand into a user cache dir, one folder per source/flags hash, so an
upgraded package never loads a stale build. It needs a C++ compiler and the ONNX Runtime C/C++ API
headers, which no PyPI wheel ships: `MOE_EXPORT_ORT_INCLUDE` names a folder holding them, else a
system install (`/usr/include/onnxruntime`, Debian 13's `libonnxruntime-dev`) or a copy fetched by
`fetch_headers()` (that one package from Debian trixie, with a private apt configuration) is used.
The library does not link against libonnxruntime: ONNX Runtime hands it the API at registration.

Environment: MOE_EXPORT_CACHE (cache root), MOE_EXPORT_ORT_INCLUDE (headers), CXX (compiler),
MOE_EXPORT_KERNELS=off (never use the library: the model's function bodies run).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moe_export.errors import MoeExportError

SOURCES = ("grouped_lora.cc", "grouped_lora_kernels.inc")
LIBRARY_NAME = "libmoe_export_ort.so"
HEADER = "onnxruntime_cxx_api.h"
FLAGS = ("-O3", "-std=gnu++17", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall")
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_SUITE = "trixie"  # the first Debian release that packages the ONNX Runtime headers
# The one version fetched, and its .deb's SHA-256 per architecture (from trixie's Packages index, 2026-12):
# a newer upload is not taken silently, and a file that differs from the pinned one is refused.
DEBIAN_VERSION = "1.21.0+dfsg-1"
DEBIAN_SHA256 = {
    "amd64": "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08",
    "arm64": "d4b1967893865756c0fa8536be165259a8eb0e9068e60d322ba707ef4527e44e",
}
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class KernelBuildError(MoeExportError):
    """The native library cannot be built here (no compiler, no headers, compile error)."""


def source_dir() -> Path:
    return Path(__file__).resolve().parent


def cache_root() -> Path:
    if os.environ.get("MOE_EXPORT_CACHE"):
        return Path(os.environ["MOE_EXPORT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moe-export"


def disabled() -> bool:
    return os.environ.get("MOE_EXPORT_KERNELS", "").strip().lower() in ("off", "0", "no", "false")


def compiler() -> str | None:
    wanted = os.environ.get("CXX")
    if wanted:
        return shutil.which(wanted)
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def _fetched_headers_dir() -> Path:
    return cache_root() / "ort-headers"


def find_headers() -> Path | None:
    """The folder holding onnxruntime_cxx_api.h; MOE_EXPORT_ORT_INCLUDE must be right when set."""
    override = os.environ.get("MOE_EXPORT_ORT_INCLUDE")
    if override:
        folder = Path(override).expanduser()
        if not (folder / HEADER).is_file():
            raise KernelBuildError(f"MOE_EXPORT_ORT_INCLUDE={override}: no {HEADER} in that folder")
        return folder
    for folder in (_fetched_headers_dir() / "usr/include/onnxruntime", Path("/usr/include/onnxruntime")):
        if (folder / HEADER).is_file():
            return folder
    return None


def fetch_headers(timeout_s: float = 120) -> Path:
    """Fetch `libonnxruntime-dev` from Debian trixie into the cache; the system's apt sources stay untouched.

    apt reads a private sources list, lists dir and cache dir (all under the cache root), downloads the
    one .deb and dpkg-deb unpacks it: no install, no root needed beyond what apt-get download needs.
    """
    apt, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt or not dpkg_deb:
        raise KernelBuildError(
            "cannot fetch the ONNX Runtime headers: apt-get/dpkg-deb not found; "
            "set MOE_EXPORT_ORT_INCLUDE to a folder holding onnxruntime_cxx_api.h"
        )
    arch = _debian_arch(dpkg_deb)
    if arch not in DEBIAN_SHA256:
        raise KernelBuildError(
            f"no pinned {DEBIAN_PACKAGE} checksum for architecture {arch!r} (pinned: {', '.join(DEBIAN_SHA256)}); "
            "set MOE_EXPORT_ORT_INCLUDE to a folder holding onnxruntime_cxx_api.h"
        )
    dest = _fetched_headers_dir()
    problem = cache_problem(dest.parent)
    if problem:  # before any download: the headers would have nowhere to go
        raise KernelBuildError(f"{problem}; set MOE_EXPORT_CACHE to a writable folder")
    with tempfile.TemporaryDirectory(prefix="moe-export-apt-") as tmp:
        work = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial", "download"):
            (work / sub).mkdir(parents=True)
        signed = f"[signed-by={DEBIAN_KEYRING}] " if Path(DEBIAN_KEYRING).is_file() else ""
        (work / "sources.list").write_text(f"deb {signed}{DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
        options = [
            f"-oDir::Etc::sourcelist={work / 'sources.list'}",
            "-oDir::Etc::sourceparts=-",
            f"-oDir::State::Lists={work / 'lists'}",
            f"-oDir::Cache={work / 'cache'}",
            "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oDebug::NoLocking=1",
        ]
        pinned = f"{DEBIAN_PACKAGE}={DEBIAN_VERSION}"
        steps = [[apt, *options, "-qq", "update"], [apt, *options, "-qq", "download", pinned]]
        for step in steps:
            _run(step, cwd=work / "download", timeout_s=timeout_s, what=f"apt-get {step[-1]} ({DEBIAN_SUITE})")
        debs = sorted((work / "download").glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise KernelBuildError(f"apt-get download {pinned}: no .deb was written")
        _check_sha256(debs[-1], DEBIAN_SHA256[arch])
        unpacked = work / "unpacked"
        _run([dpkg_deb, "-x", str(debs[-1]), str(unpacked)], cwd=work, timeout_s=timeout_s, what="dpkg-deb -x")
        if not (unpacked / "usr/include/onnxruntime" / HEADER).is_file():
            raise KernelBuildError(f"{debs[-1].name}: holds no usr/include/onnxruntime/{HEADER}")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(unpacked / "usr/include", dest / "usr/include")
    return dest / "usr/include/onnxruntime"


def _debian_arch(dpkg_deb: str) -> str:
    dpkg = shutil.which("dpkg") or str(Path(dpkg_deb).with_name("dpkg"))
    try:
        return subprocess.run([dpkg, "--print-architecture"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"dpkg --print-architecture: {exc}") from None


def _check_sha256(path: Path, expected: str) -> None:
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != expected:
        raise KernelBuildError(f"{path.name}: SHA-256 {got} is not the pinned {expected}; refusing to use it")


def _run(cmd: list[str], cwd: Path, timeout_s: float, what: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise KernelBuildError(f"{what}: timed out after {timeout_s:.0f}s") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
        raise KernelBuildError(f"{what} failed (exit {done.returncode}): {detail.strip()[:300]}")


def compiler_version(cxx: str) -> str:
    """`cxx --version` as printed: part of the build key, so an upgraded compiler at the same path rebuilds."""
    try:
        stat = os.stat(cxx)
    except OSError as exc:
        raise KernelBuildError(f"compiler {cxx}: {exc.strerror}") from None
    return _version_output(cxx, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _version_output(cxx: str, mtime_ns: int, size: int) -> str:  # keyed by the file's identity: a new binary reruns
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"{cxx} --version: {exc}") from None
    if done.returncode != 0:
        raise KernelBuildError(f"{cxx} --version failed (exit {done.returncode})")
    return (done.stdout or done.stderr).strip()


def _build_key(cxx: str, headers: Path) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((source_dir() / name).read_bytes())
    digest.update((headers / "onnxruntime_c_api.h").read_bytes())
    digest.update(" ".join([cxx, *FLAGS, platform.machine(), sys.platform]).encode())
    digest.update(compiler_version(cxx).encode())
    return digest.hexdigest()[:16]


def library_path(cxx: str | None = None, headers: Path | None = None) -> Path | None:
    """Where the library for these sources, compiler and headers lives (built or not); None if not buildable."""
    cxx = cxx or compiler()
    headers = headers or find_headers()
    if cxx is None or headers is None:
        return None
    return cache_root() / "kernels" / _build_key(cxx, headers) / LIBRARY_NAME


def build(fetch: bool = False, force: bool = False, temp_ok: bool = False) -> Path:
    """Compile the library (if not already built) and return its path; errors say what is missing.

    The cache is optional: when it cannot take the build (read-only, a file, no permission), `temp_ok` builds in
    a temporary folder for this process (what sessions do) instead of failing (what `kernels build` does)."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    headers = find_headers()
    if headers is None and fetch:
        headers = fetch_headers()
    if headers is None:
        raise KernelBuildError(
            "no ONNX Runtime headers: run `moe-export kernels build --fetch-headers`, install "
            "libonnxruntime-dev (Debian 13+), or set MOE_EXPORT_ORT_INCLUDE"
        )
    target = library_path(cxx, headers)
    assert target is not None
    if target.is_file() and not force:
        return target  # a read-only cache that holds the library is fine: it is only read
    problem = cache_problem(target.parent)
    if problem and temp_ok:
        target = _temp_build_dir(problem) / target.parent.name / LIBRARY_NAME
        if target.is_file():
            return target
        problem = cache_problem(target.parent)
    if problem:
        raise KernelBuildError(f"{problem}; set MOE_EXPORT_CACHE to a writable folder")
    compile_library(cxx, headers, target)
    return target


def cache_problem(folder: Path) -> str:
    """Why `folder` (created here if missing) cannot take the build's files, or "" when it can.

    A read-only or full file system, a file where a folder should be, or a folder we may not write: each is
    a fact about this machine, not a bug, and decides between the cache and a temporary folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe_name = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe_name)
    except OSError as exc:
        return f"kernel cache {cache_root()} is not usable ({exc.strerror or type(exc).__name__}: {exc.filename or folder})"
    return ""


def _unwritable(folder: Path) -> str:
    """Why `folder` could not be created or written (judged without writing, for `status`), or ""."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"is under a file ({existing})" if existing != folder else "is a file"
    return "" if os.access(existing, os.W_OK) else f"is not writable ({existing})"


_temp_dirs: dict[str, Path] = {}


def _temp_build_dir(problem: str) -> Path:
    """One temporary folder per process for builds the cache cannot hold, removed at exit; says so once."""
    if "dir" not in _temp_dirs:
        try:
            folder = Path(tempfile.mkdtemp(prefix="moe-export-kernels-"))
        except OSError as exc:
            raise KernelBuildError(f"{problem}, and no temporary folder either ({exc.strerror})") from None
        atexit.register(shutil.rmtree, folder, True)
        _temp_dirs["dir"] = folder
        print(f"note: {problem}; building the native kernels in {folder} for this run", file=sys.stderr)
    return _temp_dirs["dir"]


def compile_library(cxx: str, headers: Path, target: Path, defines: tuple[str, ...] = ()) -> None:
    """Compile grouped_lora.cc to `target` (`defines`: extra -D options, for tests)."""
    # Compile next to the target and rename: a concurrent first use never loads a half-written file.
    fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [
            cxx,
            *FLAGS,
            *(f"-D{d}" for d in defines),
            f"-I{headers}",
            str(source_dir() / SOURCES[0]),
            "-o",
            tmp_name,
        ]
        _run(cmd, cwd=target.parent, timeout_s=300, what=f"{Path(cxx).name} {SOURCES[0]}")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


@dataclass(frozen=True)
class KernelStatus:
    """What `moe-export kernels` prints and what ORT sessions use."""

    library: Path | None  # the built library, or None
    reason: str  # why there is no library, or "" when there is one
    headers: Path | None
    compiler: str | None
    isa: str | None = None  # the instruction set the kernels run with on this CPU
    api_version: int | None = None  # ORT_API_VERSION the library asks for (works with ORT >= it)
    compiler_version: str | None = None  # first line of `compiler --version` (part of the build key)


def probe(path: Path) -> tuple[str, int]:
    """(ISA, ORT API version) reported by a built library."""
    import ctypes

    lib = ctypes.CDLL(str(path))
    lib.MoeExportKernelIsa.restype = ctypes.c_char_p
    return lib.MoeExportKernelIsa().decode(), int(lib.MoeExportOrtApiVersion())


def kernel_calls(path: Path) -> int:
    """How many kernel calls the library at `path` ran in this process, in any session of any client.

    The dynamic loader maps one file once per process, so this reads the same counter that a client which
    registered the library by itself (onnxruntime-genai, from genai_config.json) increments.
    """
    return _counter(path, "MoeExportKernelCalls")


def in_place_calls(path: Path) -> int:
    """How many of those calls were of a *Add op that ONNX Runtime ran in place (its output in base's buffer)."""
    return _counter(path, "MoeExportInPlaceCalls")


def _counter(path: Path, symbol: str) -> int:
    import ctypes

    function = getattr(ctypes.CDLL(str(Path(path).resolve())), symbol)
    function.restype = ctypes.c_ulonglong
    return int(function())


def registration_error(path: Path) -> str:
    """Why this process's onnxruntime refuses the library (its API version check), or "" when it registers."""
    import onnxruntime

    try:
        onnxruntime.SessionOptions().register_custom_ops_library(str(path))
    except Exception as exc:  # ORT's own exception classes
        text = str(exc).strip()
        return text.splitlines()[-1][:300] if text else type(exc).__name__
    return ""


_session_library: dict[str, tuple[Path | None, str]] = {}


def session_library() -> tuple[Path | None, str]:
    """(library or None, reason) for ORT sessions: builds on first use when compiler and headers are here.

    Never fetches headers (no network on first use); the outcome is remembered for the process, so
    the notice about a missing library is printed once.
    """
    if disabled():
        return None, "disabled by MOE_EXPORT_KERNELS=off"
    if "outcome" not in _session_library:
        try:
            path: Path | None = build(fetch=False, temp_ok=True)
            assert path is not None
            reason = registration_error(path)
        except KernelBuildError as exc:
            path, reason = None, str(exc)
        except OSError as exc:  # never an error for a session: the function bodies compute the same
            path, reason = None, f"{exc.strerror or type(exc).__name__}: {exc.filename or ''}"
        if reason:
            path = None
            print(
                f"note: native GroupedLoRA kernels unavailable ({reason}); running the function bodies", file=sys.stderr
            )
        _session_library["outcome"] = (path, reason)
    return _session_library["outcome"]


def status() -> KernelStatus:
    """Status without building anything."""
    cxx = compiler()
    headers = None
    try:
        headers = find_headers()
        path = library_path(cxx, headers)
    except KernelBuildError as exc:
        return KernelStatus(None, str(exc), headers, cxx)
    if path is None or not path.is_file():
        if cxx is None:
            reason = "no C++ compiler"
        elif headers is None:
            reason = "no ONNX Runtime headers (moe-export kernels build --fetch-headers)"
        else:
            reason = "not built yet (moe-export kernels build; sessions build it on first use)"
            unusable = _unwritable(cache_root())
            if unusable:
                reason = (
                    f"not built; the kernel cache {cache_root()} {unusable}: sessions build it in a temporary folder"
                )
        return KernelStatus(None, reason, headers, cxx)
    isa, api = probe(path)
    reason = "disabled by MOE_EXPORT_KERNELS=off" if disabled() else registration_error(path)
    version = compiler_version(cxx).splitlines()[0] if cxx else None
    return KernelStatus(path, reason, headers, cxx, isa, api, version)
