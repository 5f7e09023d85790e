"""Run the studio in a subprocess on a free port, for tests and scripted checks (no Gradio import here).

``running_studio(log_path=...)`` is a context manager that yields the page's URL once it answers,
for ``gradio_client.Client(url)`` or a browser, and stops the server on exit. ``python -m
share_diffusers.studio.testing --command share-diffusers app`` checks an installed console script:
it starts the studio, waits for the page, and stops it (exit status 0 if the page answered).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

STUDIO_COMMAND = (sys.executable, "-m", "share_diffusers.studio")
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
def running_studio(
    *args: str,
    log_path: Path,
    home: Path | None = None,
    timeout: float = 240.0,
    command: Sequence[str] = STUDIO_COMMAND,
    cwd: str | Path | None = None,
) -> Iterator[str]:
    """Start ``COMMAND --host 127.0.0.1 --port <free> ARGS``; yield its URL once ``/`` answers.

    Args:
        log_path: the server's stdout and stderr go here (quoted in the error if it never comes up).
        home: if given, the Hugging Face cache and Gradio's temporary files live under it.
        timeout: seconds to wait for the page (imports and the demo styles come first).
        command: how to start the studio (default: this interpreter's ``-m share_diffusers.studio``;
            e.g. ``["share-diffusers", "app"]`` for an installed console script).
        cwd: the server's working folder (default: this process's).
    """
    port = free_port()
    env = {**os.environ, **SERVER_ENV}
    if home is not None:
        env.update(HF_HOME=str(home / "hf-home"), GRADIO_TEMP_DIR=str(home / "gradio"))
    full_command = [*command, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(full_command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Start the studio with ``--command``, wait until its page answers HTTP, stop it; 0 if it answered."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--command", nargs="+", default=list(STUDIO_COMMAND), help="how to start the studio")
    parser.add_argument("--log", default="studio.log", help="the server's output (default studio.log)")
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="after --: arguments for the studio")
    options = parser.parse_args(argv)
    extra = options.args[1:] if options.args[:1] == ["--"] else options.args
    try:
        with running_studio(
            *extra, log_path=Path(options.log), timeout=options.timeout, command=options.command
        ) as url:
            print(f"the studio answered at {url}", flush=True)
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
