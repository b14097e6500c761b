"""A free loopback port for a test's launcher: fixed ports collide when tests (or two CI jobs) run at once."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
