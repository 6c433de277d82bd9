"""Tracking URIs without their credentials, for anything that records or prints one.

A tracking URI may carry ``user:password@`` (MLflow's basic-auth server reached with credentials in
the URI). Params, tags, model metadata, artifacts and messages get the URI with that userinfo
removed; only the MLflow client itself ever sees the original.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"


def without_userinfo(uri: str) -> str:
    """``uri`` with any ``user:password@`` replaced by ``***@`` (unchanged when it has none).

    Args:
        uri: a tracking URI or any URL.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))


def redacted_config_dump(dump: dict[str, Any]) -> dict[str, Any]:
    """A config dump (``RunConfig.model_dump(mode="json")``) whose ``tracking.tracking_uri``
    holds no credentials; the other values are shared with ``dump``."""
    tracking = dump.get("tracking")
    if not isinstance(tracking, dict) or not isinstance(tracking.get("tracking_uri"), str):
        return dump
    return {**dump, "tracking": {**tracking,
                                 "tracking_uri": without_userinfo(tracking["tracking_uri"])}}


_USERINFO_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@]+@")


def scrubbed(text: str) -> str:
    """``text`` (an error message, a log line) with the userinfo of every URL in it replaced
    by ``***``: MLflow's client errors quote the URL they requested."""
    return _USERINFO_IN_TEXT.sub(rf"\g<scheme>{REDACTED}@", text)
