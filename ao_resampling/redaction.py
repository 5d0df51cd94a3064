"""Credentials never reach a file or the terminal: a URL loses its user:password and the values of its
key/token/secret-like parameters (query, ``;name=value`` path parameters, ``#name=value`` fragments) wherever the tool
writes or prints it; the judge's calls still use the URL as given.

``redact`` is the one function for any text that may hold URLs (a command line, a setting's value, a folder name);
``redact_url`` is its rule for one URL.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

REDACTED = "REDACTED"
# Names of parameters whose values are secrets: API keys, tokens, signatures, OAuth codes, access keys ...
_SECRET_PARAM_RE = re.compile(r"key|token|secret|password|passwd|pwd|sig|auth|access|code|credential|session",
                              re.IGNORECASE)
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
# A URL runs to a space or quote, or to where the next one starts ("--vary judge_base_url=URL1,URL2").
_URL_RE = re.compile(rf"{_SCHEME}(?:(?!{_SCHEME})[^\s'\"<>])+")
_PATH_PARAM_RE = re.compile(r";([^;/?#=]*)=([^;/?#]*)")


def redact_url(url: str) -> str:
    """``url`` without credentials: user:password in it and the values of secret-like parameters."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not a URL at all: it may be anything, so keep none of it
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    path = _PATH_PARAM_RE.sub(lambda m: f";{m[1]}={REDACTED}" if _SECRET_PARAM_RE.search(m[1]) else m[0], parts.path)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path, query=_redact_pairs(parts.query),
                                                  fragment=_redact_fragment(parts.fragment)))


def _redact_pairs(text: str) -> str:
    if not text:
        return ""
    return urllib.parse.urlencode(
        [(k, REDACTED if _SECRET_PARAM_RE.search(k) else v)
         for k, v in urllib.parse.parse_qsl(text, keep_blank_values=True)], safe=REDACTED)


def _redact_fragment(fragment: str) -> str:
    # A base URL has no use for a fragment (it is never sent); one that is not name=value pairs may be a bare token.
    return _redact_pairs(fragment) if "=" in fragment else (REDACTED if fragment else "")


def redact(value: Any) -> Any:
    """``value`` with every URL in it redacted: text (a command line, a setting), or the strings of a list or dict."""
    if isinstance(value, str):
        return _URL_RE.sub(lambda m: redact_url(m[0]), value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def is_redacted_url(url: str | None) -> bool:
    return isinstance(url, str) and REDACTED in url
