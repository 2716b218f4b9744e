"""`sftkit ui`: a local web dashboard over a runs folder (optional extra: pip install sftkit[ui]).

The core never imports this package; the CLI imports it only for `sftkit ui`.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from ..config import ConfigError


def check_port(host: str, port: int) -> None:
    """A clear message when the port is taken, before the server starts (uvicorn's own is a traceback)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"ui: port {port} on {host} is taken (another program, or another `sftkit ui`); "
                                  f"choose another with --port") from None
            raise ConfigError(f"ui: cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(runs_dir: str, host: str = "127.0.0.1", port: int = 7860) -> None:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise ConfigError(f"ui: the dashboard needs its extra ({e.name} is missing): pip install 'sftkit[ui]'") from None
    root = Path(runs_dir)
    if not root.is_dir():
        raise ConfigError(f"ui: {root} is not a folder (the runs folder, e.g. runs/)")
    check_port(host, port)
    print(f"sftkit ui: {root.resolve()} at http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(root), host=host, port=port, log_level="warning")
