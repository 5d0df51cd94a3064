"""Credentials never reach a file: a URL written into results.json loses its user:password and the values of its
key/token/secret-like query parameters (the judge's calls still use the URL as given)."""

from __future__ import annotations

import re
import urllib.parse

REDACTED = "REDACTED"
_SECRET_PARAM_RE = re.compile(r"key|token|secret|password|passwd|sig|auth", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` without credentials: user:password in it and the values of key/token/secret-like query parameters."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not a URL at all: it may be anything, so keep none of it
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = urllib.parse.urlencode(
        [(k, REDACTED if _SECRET_PARAM_RE.search(k) else v)
         for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)], safe=REDACTED)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query if parts.query else ""))


def is_redacted_url(url: str | None) -> bool:
    return isinstance(url, str) and REDACTED in url
