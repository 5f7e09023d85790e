"""Run the studio in a subprocess on a free port, for tests and scripted checks (no Gradio import here).

``running_studio(log_path=...)`` is a context manager that yields the page's URL once it answers,
for ``gradio_client.Client(url)`` or a browser, and stops the server on exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# No telemetry or version checks, no Hub traffic (a Hub id fails fast with "not in the local cache"),
# and no proxy between the client and a server on this machine.
SERVER_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running_studio(*args: str, log_path: Path, home: Path | None = None, timeout: float = 240.0) -> Iterator[str]:
    """Start ``python -m app --port <free> ARGS`` from the repo root; yield its URL once ``/`` answers.

    Args:
        log_path: the server's stdout and stderr go here (quoted in the error if it never comes up).
        home: if given, the Hugging Face cache and Gradio's temporary files live under it.
        timeout: seconds to wait for the page (imports and the demo styles come first).
    """
    port = free_port()
    env = {**os.environ, **SERVER_ENV}
    if home is not None:
        env.update(HF_HOME=str(home / "hf-home"), GRADIO_TEMP_DIR=str(home / "gradio"))
    command = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if process.poll() is not None:
                raise RuntimeError(f"the studio exited with status {process.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the studio did not answer at {url} within {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
