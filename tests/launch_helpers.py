"""Running the training scripts under ``accelerate launch`` on CPU, one or several processes."""

from __future__ import annotations

import os
import socket
import sys

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
