"""Ports held the way another job on the node holds them: bound and listening."""

import contextlib
import socket


@contextlib.contextmanager
def held_ports(count: int):
    """`count` consecutive ports held (bound and listening), below the ephemeral range, as another job would."""
    for base in range(20000, 32000, 97):
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("", port))
                s.listen()
        except OSError:
            for s in sockets:
                s.close()
            continue
        try:
            yield base
        finally:
            for s in sockets:
                s.close()
        return
    raise RuntimeError(f"no {count} free consecutive ports below 32000 on this machine")
