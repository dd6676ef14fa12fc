"""Running a command on a pseudo-terminal, as a user in a shell does: progress bars draw there
and nowhere else."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios


def open_terminal(columns: int = 100, rows: int = 40) -> tuple[int, int]:
    """A pseudo-terminal of the given size (tqdm hides its bars on a 0 x 0 one):
    (leader, follower) file descriptors."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return leader, follower


def read_all(leader: int) -> str:
    """Everything written to the terminal until its last writer closed it."""
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def run_on_a_terminal(
    command: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[int, str]:
    """Runs `command` with stdout and stderr on a terminal; returns its exit code and output."""
    leader, follower = open_terminal()
    process = subprocess.Popen(command, env=env, stdout=follower, stderr=follower)
    os.close(follower)
    output = read_all(leader)
    return process.wait(timeout=timeout), output
