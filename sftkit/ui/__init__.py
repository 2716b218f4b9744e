"""`sftkit ui`: a local web dashboard over a runs folder (optional extra: pip install sftkit[ui]).

The core never imports this package; the CLI imports it only for `sftkit ui`.
"""

from __future__ import annotations

import errno
import secrets
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


def serve(runs_dir: str, host: str = "127.0.0.1", port: int = 7860, token: bool = True) -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM. Every request must carry the launch token printed
    here (a fresh one each launch; `token=False` asks none, for a machine nobody else can reach)."""
    try:
        import uvicorn

        from .app import allowed_hosts, create_app
    except ImportError as e:
        raise ConfigError(f"ui: the dashboard needs its extra ({e.name} is missing): pip install 'sftkit[ui]'") from None
    root = Path(runs_dir)
    if not root.is_dir():
        raise ConfigError(f"ui: {root} is not a folder (the runs folder, e.g. runs/)")
    check_port(host, port)
    secret = secrets.token_urlsafe(24) if token else None
    shown = f"[{host}]" if ":" in host else host
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"sftkit ui: warning: bound to {host}, not to this machine alone: anyone who can reach {shown}:{port} "
              + ("and has the token can read every run, config and data file under the runs folder and chat with its "
                 "models" if secret else "can read every run, config and data file under the runs folder"), flush=True)
    if secret is None:
        print("sftkit ui: warning: --no-token: any program or web page on this machine that can reach the port can "
              "read the runs and their data and chat with the models (the Host check still stops DNS rebinding)",
              flush=True)
    url = f"http://{shown}:{port}/" + (f"?token={secret}" if secret else "")
    print(f"sftkit ui: {root.resolve()} at {url}  (Ctrl-C stops)", flush=True)
    # A chat in flight is cut after a few seconds on Ctrl-C or SIGTERM, rather than waited for.
    uvicorn.run(create_app(root, secret, allowed_hosts(host)), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=3)
