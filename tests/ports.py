"""A free loopback port for a test's launcher, and the torchrun command line that uses one: fixed ports collide when
tests (or two CI jobs) run at once."""

import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *target: str) -> tuple[str, ...]:
    """A torchrun launcher on a free port; ``target`` is ``("-m", "fastbert")`` (the default) or a script and its
    arguments."""
    return (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        *(target or ("-m", "fastbert")),
    )
