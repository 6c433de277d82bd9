"""Starting (or joining) Ray the same way for every command that uses it.

Without ``--address`` every command starts its own local Ray instance (``address="local"``): a
plain ``ray.init()`` would join whatever cluster ``ray start`` last recorded in Ray's temporary
folder, and wait for ever when that head has died. With ``--address`` the cluster must answer
within :data:`CONNECT_TIMEOUT_S`, or the command ends with one line naming the address.
"""

from __future__ import annotations

import logging
import socket
import time

from raytrain_at.runtime import worker_output
from raytrain_at.runtime.console import VERBOSE_ENV, is_verbose
from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0


def init_ray(address: str | None = None, *, dashboard: bool = False) -> None:
    """Join the cluster at ``address`` (``auto`` on a node of it), or start Ray on this machine.

    Args:
        address: a Ray address (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``), or None to start
            a local instance of this process's own.
        dashboard: start the local instance with its dashboard, bound to 127.0.0.1. Tune studies
            need it: Ray Train's placement-group cleaner asks the dashboard's State API whether a
            run's controller is alive, and a trial that Tune stops (ASHA) dies without freeing
            its workers' placement group otherwise, so the next trial waits for ever. Without
            it, Ray's workers run :func:`raytrain_at.training.launch.quiet_ray_internals` to
            silence the cleaner's warnings.

    Raises:
        UserError: ``address`` is given and no Ray cluster answers there.
    """
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        check_reachable(address)
    verbose = is_verbose()
    ray.init(address=address or "local", include_dashboard=dashboard,
             dashboard_host="127.0.0.1", log_to_driver=True, ignore_reinit_error=True,
             logging_level=logging.INFO if verbose else logging.WARNING,
             runtime_env={"worker_process_setup_hook":
                          "raytrain_at.training.launch.quiet_ray_internals",
                          "env_vars": {VERBOSE_ENV: "1" if verbose else "0"}})
    worker_output.install()


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise a one-line :class:`UserError` unless the Ray head at ``address`` accepts a TCP
    connection within ``timeout_s`` (Ray itself retries for minutes without saying why)."""
    target = _host_port(address)
    deadline = time.monotonic() + timeout_s
    reason = "no answer"
    while True:
        try:
            with socket.create_connection(target, timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            raise UserError(f"--address {address}: no Ray cluster answers at "
                            f"{target[0]}:{target[1]} after {timeout_s:.0f} s ({reason})")
        time.sleep(1.0)


def _host_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of a Ray address; ``auto`` is looked up as Ray would."""
    text = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            text = canonicalize_bootstrap_address("auto") or ""
        except ConnectionError:
            text = ""
        if not text:
            raise UserError("--address auto: no Ray cluster is running on this machine (start "
                            "one with `ray start --head`, or leave --address out for a local "
                            "instance)")
    text = text.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)
