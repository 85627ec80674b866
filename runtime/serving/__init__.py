"""Serving many cameras: ``Derainer`` behind NVIDIA Triton Inference Server (docs/serving.md).

- :mod:`runtime.serving.contract`: the served model's name and tensors (one place for them).
- :mod:`runtime.serving.server`: ``DerainServer`` (PyTriton's bundled ``tritonserver``, ``rd-run
  serve``) and ``RepositoryServer`` (the same server on a repository from ``rd-export triton``).
- :mod:`runtime.serving.client`: ``DerainClient``, numpy frames over HTTP (needs tritonclient only).
- :mod:`runtime.serving.environment`: whether the bundled server can run under this interpreter,
  and the library-path fix its Python backend stub needs.

Importing this package needs numpy alone; PyTriton and tritonclient are imported when used.
"""

from __future__ import annotations

__all__ = ["DerainClient", "DerainServer", "RepositoryServer", "ServeConfig", "check_server"]


def __getattr__(name: str):
    if name in ("DerainServer", "RepositoryServer", "ServeConfig"):
        from runtime.serving import server

        return getattr(server, name)
    if name == "DerainClient":
        from runtime.serving.client import DerainClient

        return DerainClient
    if name == "check_server":
        from runtime.serving.environment import check_server

        return check_server
    raise AttributeError(f"module 'runtime.serving' has no attribute {name!r}")
