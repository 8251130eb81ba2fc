"""Free loopback TCP addresses for tests that start servers (loopback only)."""

import socket


def free_addresses(n: int) -> list[str]:
    """*n* ``tcp://127.0.0.1:PORT`` addresses free right now (bound together, then released,
    so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    out = [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    return out
