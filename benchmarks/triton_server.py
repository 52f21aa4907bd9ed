"""Start and stop the tritonserver bundled with nvidia-pytriton, on 127.0.0.1 only (no moe_export imports).

Used by triton_check.py and triton_bench.py inside the venv that triton_check.sh builds. The server runs in
its own process group so that stopping it also reaches the python-backend stub processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(work: Path) -> Path:
    """A copy of pytriton's server tree with the python-backend stub for this Python (as pytriton does)."""
    import pytriton

    dist = Path(pytriton.__file__).parent / "tritonserver"
    target = work / "tritonserver"
    if not target.exists():
        shutil.copytree(dist, target, ignore=shutil.ignore_patterns("python_backend_stubs"))
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy(stub, target / "backends" / "python" / "triton_python_backend_stub")
    return target


class Server:
    def __init__(self, work: Path, repositories: list[str], log: Path, exit_on_error: bool = True) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        server = prepare(work)
        libs = Path(__import__("pytriton").__file__).parent.parent / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH", ""), str(libs)) if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        self.backends = server / "backends"
        command = [str(server / "bin" / "tritonserver"), f"--backend-directory={self.backends}"]
        command += [f"--model-repository={repo}" for repo in repositories]
        command += [
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false", "--log-verbose=0", "--exit-timeout-secs=20",
            # A repository with a model the server cannot load (checked on purpose) must not stop the server or
            # keep it "not ready": readiness then means the models that can load did.
            f"--exit-on-error={str(exit_on_error).lower()}", f"--strict-readiness={str(exit_on_error).lower()}",
        ]  # fmt: skip
        self.log = log
        self.process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, models: list[str], timeout: float = 120.0) -> float:
        import tritonclient.http as http

        begin = time.monotonic()
        client = http.InferenceServerClient(self.http_url)
        try:
            while time.monotonic() - begin < timeout:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self.process.returncode}; see {self.log}")
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                        return time.monotonic() - begin
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s; see {self.log}")

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM to the server (it unloads models and ends their stubs); the pids still alive after, if any."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + 15  # the stubs end just after the server, once they see it gone
        while (alive := group_members(self.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return alive


def group_members(pgid: int) -> list[int]:
    """Processes still in the process group (the stubs would be here if the server leaked them)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    alive.append(int(entry.name))
            except ProcessLookupError:
                continue
    return alive
