"""Can the bundled ``tritonserver`` run its Python backend under this interpreter? And the fix.

PyTriton (``nvidia-pytriton``) ships the real ``tritonserver`` 2.51 and, per Python minor version,
a ``triton_python_backend_stub``: the process in which every Python-backend model runs (PyTriton's
own proxy model, and the models of an exported CPU repository). The stub is linked against
``libpython3.X.so.1.0`` by name only (its RPATH points at PyTriton's own libraries), so the dynamic
loader takes the first ``libpython3.X.so.1.0`` it finds: without help, the system's one in
``/lib/x86_64-linux-gnu``. The stub then runs the standard library of the interpreter that started
the server (PyTriton puts that interpreter's ``bin/`` first on ``PATH``), with another Python's C
core. When the two patch releases differ, the stdlib calls C functions the core lacks; measured
here, pyenv's 3.11.7 stdlib on Debian's 3.11.2 ``libpython``::

    multiprocessing/resource_tracker.py: self._lock._recursion_count()
    AttributeError: '_thread.RLock' object has no attribute '_recursion_count'

(``RLock._recursion_count`` appeared in 3.11.5.) With the interpreter's own ``libpython``, any
Python built with ``--enable-shared`` works (pyenv's builds, Debian's and Ubuntu's python3, conda).

The fix (:func:`server_environment`): put the folder of the running interpreter's own
``libpython`` first on ``LD_LIBRARY_PATH`` of the server process, so the stub loads the library
that matches the stdlib. :func:`check_server` refuses, with one line saying what to install or use,
what cannot work: no PyTriton, a non-Linux OS, no stub for this Python, no shared ``libpython``
(a ``--disable-shared`` build), or numpy 2 (PyTriton 0.7 pins numpy < 2; forced past the pin, its
responses come back empty: measured, "cannot reshape array of size 0").
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import DependencyError

__all__ = ["INSTALL_HINT", "check_server", "interpreter_library", "server_environment"]

INSTALL_HINT = "pip install 'raindiffusion-edge[serve]'"


def interpreter_library() -> Path:
    """The running interpreter's own shared ``libpython3.X.so.1.0`` (DependencyError when it has none)."""
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    shared = bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))
    # LIBDIR is where the build installed it; a relocated Python (conda, a moved pyenv) keeps it under
    # its prefix. A venv's interpreter reports its base interpreter's folders here.
    for folder in (sysconfig.get_config_var("LIBDIR"), os.path.join(sys.base_prefix, "lib")):
        if shared and folder and (Path(folder) / soname).is_file():
            return Path(folder) / soname
    version = ".".join(map(str, sys.version_info[:3]))
    raise DependencyError(
        f"the Python interpreter {sys.executable} (Python {version}) has no shared library {soname}; Triton's "
        f"Python backend stub links one and would load another Python's (its standard library then fails to "
        f"start). Serve with a Python built with --enable-shared: pyenv's default builds, Debian/Ubuntu's "
        f"/usr/bin/python3, or conda (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install {version})"
    )


def check_server() -> None:
    """Raise DependencyError (one line: what is wrong, what to do) unless the bundled server can run here."""
    if not sys.platform.startswith("linux"):
        raise DependencyError(f"serving needs Linux (PyTriton bundles a Linux tritonserver); this is {sys.platform}. "
                              f"On other systems run NVIDIA's Triton container with 'rd-export triton'")
    if importlib.util.find_spec("pytriton") is None:
        raise DependencyError(f"serving needs PyTriton and tritonclient: {INSTALL_HINT}")
    import numpy as np

    if int(np.__version__.split(".")[0]) >= 2:
        raise DependencyError(f"PyTriton needs numpy < 2 (numpy {np.__version__} is installed; PyTriton 0.7 pins "
                              f"numpy < 2 and returns empty outputs under numpy 2): pip install 'numpy<2'")
    from pytriton.utils.distribution import get_stub_path

    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not Path(get_stub_path(version)).is_file():
        raise DependencyError(f"this PyTriton has no Python backend stub for Python {version}; use a Python it "
                              f"supports (3.8 to 3.13 for PyTriton 0.7) or upgrade: pip install -U nvidia-pytriton")
    interpreter_library()


@contextlib.contextmanager
def server_environment() -> Iterator[dict[str, str]]:
    """Within the block, ``os.environ`` has the interpreter's own libpython folder first on
    ``LD_LIBRARY_PATH`` (see the module docstring); a server process started inside inherits it,
    and with it every Python stub that server starts. Restores the previous value on exit."""
    check_server()
    folder = str(interpreter_library().parent)
    old = os.environ.get("LD_LIBRARY_PATH")
    parts = [p for p in (old or "").split(os.pathsep) if p and p != folder]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([folder, *parts])
    try:
        yield {"LD_LIBRARY_PATH": os.environ["LD_LIBRARY_PATH"]}
    finally:
        if old is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = old
