"""The lease on an evaluation state folder: one driver at a time writes its chunk records.

Two ``evaluate`` commands on the same job (same weights, data, settings: the same state folder)
would attack the same units at once, and a slow one could write a partial record over a
complete one. The driver therefore holds a lease: ``lease.json`` in the state folder, with an
owner id (host, process, random) and an expiry, created only where none exists (``O_EXCL``-like
link on a local disk, ``If-None-Match: *`` on S3), renewed by a background thread well before it
expires (``If-Match`` on the version it wrote), and removed when the driver is done. A second
driver finds a live lease and stops with one line; a lease whose holder died expires and the
next driver takes it over (again conditionally, so two cannot take it over together).

Expiry is wall-clock time: drivers on machines whose clocks differ by more than the lease's
lifetime could take over a live lease (cloud machines keep NTP time).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from raytrain_at.errors import UserError
from raytrain_at.runtime.storage import (create_if_absent, delete_if_unchanged, read_versioned,
                                         replace_if_unchanged)

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
DEFAULT_TTL_S = 300.0


def new_owner_id() -> str:
    """Who holds a lease: this host and process, and a random part (a reused PID is another)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _parse(data: bytes) -> dict | None:
    try:
        held = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(held, dict) and isinstance(held.get("owner"), str) \
        and isinstance(held.get("expires"), (int, float))
    return held if ok else None


class StateLease:
    """The lease of one state folder, as a context manager (acquire, renew, release).

    Args:
        state_dir: the job's state folder (local path or ``s3://`` URI).
        ttl_s: the lease's lifetime; it is renewed every third of it.
        owner: the holder's id (default: :func:`new_owner_id`).
    """

    def __init__(self, state_dir: str, *, ttl_s: float = DEFAULT_TTL_S,
                 owner: str | None = None) -> None:
        self.path = f"{state_dir.rstrip('/')}/{LEASE_FILE}"
        self.ttl_s = ttl_s
        self.owner = owner or new_owner_id()
        self._tag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl_s}).encode()

    def acquire(self) -> None:
        """Take the lease, or stop with one line naming its live holder.

        Raises:
            UserError: another driver holds a lease that has not expired.
        """
        for _ in range(5):
            tag = create_if_absent(self.path, self._body())
            if tag is not None:
                self._tag = tag
                return
            current = read_versioned(self.path)
            if current is None:
                continue  # released in between: try to create it again
            data, tag = current
            held = _parse(data)
            if held is not None and held["owner"] != self.owner and held["expires"] > time.time():
                until = datetime.fromtimestamp(held["expires"], UTC)
                raise UserError(f"evaluation state {self.path.rsplit('/', 1)[0]} is in use by "
                                f"another driver ({held['owner']}, lease until "
                                f"{until:%H:%M:%S} UTC): wait for it to finish, then run this "
                                "command again to reuse its results")
            new_tag = replace_if_unchanged(self.path, self._body(), tag)
            if new_tag is not None:
                log.warning("took over the expired lease %s of %s", self.path,
                            held["owner"] if held else "an unreadable holder")
                self._tag = new_tag
                return
        raise UserError(f"could not take the lease {self.path}: other drivers keep changing it")

    def renew(self) -> None:
        """Extend the lease; if another driver replaced it meanwhile, remember that it is lost
        (:meth:`check` then stops the driver)."""
        if self._tag is None or self._lost:
            return
        try:
            tag = replace_if_unchanged(self.path, self._body(), self._tag)
        except OSError as exc:  # the store did not answer: try again at the next renewal
            log.warning("could not renew the lease %s: %s", self.path, exc)
            return
        if tag is None:
            self._lost = (f"the lease {self.path} was taken by another driver while this one "
                          "ran (it had expired): stopped so the two never write the same records")
        else:
            self._tag = tag

    def check(self) -> None:
        """Raise when the lease was lost (called between units and while waiting on workers).

        Raises:
            UserError: another driver took the lease over.
        """
        if self._lost:
            raise UserError(self._lost)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this driver's."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        if self._tag is not None and not self._lost:
            try:
                delete_if_unchanged(self.path, self._tag)
            except OSError as exc:  # it expires by itself
                log.warning("could not remove the lease %s: %s", self.path, exc)
        self._tag = None

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.renew()

    def __enter__(self) -> StateLease:
        self.acquire()
        self._renewer = threading.Thread(target=self._renew_forever, daemon=True,
                                         name="eval-lease")
        self._renewer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
