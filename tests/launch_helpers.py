"""Running the training scripts under ``accelerate launch`` on CPU (one or several processes), and the benchmarks."""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One thread a process: two processes on two cores, and the same float32 sums as in one process.
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def accelerate_launch(processes: int = 1) -> list[str]:
    """The command prefix for ``processes`` CPU processes (the script path and its arguments follow).

    Several processes go through accelerate's torchrun path (``--multi_gpu``) with gloo, because its
    ``--cpu`` path with more than one process wants ``mpirun`` (and silently runs one process without it).
    """
    launcher = ["--cpu"] if processes == 1 else ["--multi_gpu", "--main_process_port", str(free_port())]
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes)),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@functools.cache
def script_module(path: Path):
    """A training script as a module, to call its ``main`` or ``cli`` in this process (no interpreter start)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli_in_process(path: Path, argv: list[str], capsys) -> tuple[int, str]:
    """``python path *argv`` in this process: its exit status and stderr, as the interpreter would give them.

    The script's ``cli`` prints its own one-line refusals; a ``SystemExit`` with a message (raised by ``main``)
    is what the interpreter prints on stderr with status 1. Accelerate's process-wide state is reset around it.
    """
    from accelerate.state import AcceleratorState

    capsys.readouterr()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        code = script_module(path).cli([str(argument) for argument in argv])
    except SystemExit as exit_:
        code = exit_.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return (0 if code is None else code), capsys.readouterr().err


def run_benchmark(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``benchmarks/<script> args`` in a subprocess from the repository root, output captured."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if "--quick" in args:  # toy widths gain nothing from threads, and spinning ones slow a busy machine down
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
