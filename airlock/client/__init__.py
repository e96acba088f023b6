"""The typed Python client of the Airlock daemon.

::

    from airlock.client import Client

    with Client() as client:
        result = client.validate("rm -rf build", cwd="/home/me/project")
        print(result.verdict.name, result.summary)

Results are the frozen dataclasses of :mod:`airlock.types`; failures raise the
exceptions of :mod:`airlock` (each with a stable ``reason``).
"""

from __future__ import annotations

from airlock.client._client import DEFAULT_SOCKET_PATH, Client, default_socket_path

__all__ = ["DEFAULT_SOCKET_PATH", "Client", "default_socket_path"]
