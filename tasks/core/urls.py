"""Source URLs: one parser for the secrets a URL carries, and one redaction for every record of it.

`split_secrets` takes the userinfo (`user:password@`, split at the authority's last `@`, as urllib3,
curl and browsers do) and a query string holding secrets (`token=`, `sig=`, `X-Amz-Signature=`, ...)
out of a URL; `userinfo_auth` percent-decodes the userinfo into the `user:password` that HTTP basic
auth sends (`p%40ss` -> `p@ss`, as requests does). `redact` removes userinfo and masks secret query
values in a URL or in any text holding URLs (an exception message, a log line, a JSON dump): the
config's MLflow params, manifests, ledgers, cache sidecars, error messages and (`redact_logs`) the
debug lines of the HTTP library all go through it.
"""
from __future__ import annotations

import logging
import re
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

MASK = "***"
SECRET_PARAM = re.compile(r"(token|sig|secret|passw|key|credential|auth|session)", re.I)
"""Query parameter names whose values are secrets: `token`, `access_token`, `X-Amz-Security-Token`,
`sig`, `signature`, `X-Amz-Signature`, `X-Amz-Credential`, `key`, `api_key`, `password`, ..."""
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/?#\s]*@", re.I)
"""`scheme://userinfo@`: greedy up to the authority's last `@` (the authority ends at `/?#`)."""
_PARAM = re.compile(r"([?&;])([^=&;#?\s]+)=([^&;#\s\"'<>]*)")


def _mask_param(m: re.Match) -> str:
    name, value = m.group(2), m.group(3)
    if value and SECRET_PARAM.search(unquote_plus(name)):
        return f"{m.group(1)}{name}={MASK}"
    return m.group(0)


def redact(text: str) -> str:
    """`text` (a URL, or free text holding URLs) with every `scheme://user:pass@` userinfo removed
    and every secret-looking query value (see `SECRET_PARAM`) replaced by `***`."""
    if not text:
        return text
    return _PARAM.sub(_mask_param, _USERINFO.sub(r"\1", text))


def _has_secret_param(query: str) -> bool:
    for item in re.split(r"[&;]", query):
        name, eq, value = item.partition("=")
        if eq and value and value != MASK and SECRET_PARAM.search(unquote_plus(name)):
            return True
    return False


def split_userinfo(url: str) -> tuple[str, str | None]:
    """(`url` without its userinfo, the userinfo or None), split at the authority's last `@` (the
    authority ends at the first `/`, `?` or `#`). Only `scheme://` URLs have userinfo."""
    if not _SCHEME.match(url):
        return url, None
    scheme, rest = url.split("://", 1)
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0] or [len(rest)])
    userinfo, at, host = rest[:end].rpartition("@")
    return (f"{scheme}://{host}{rest[end:]}", userinfo) if at else (url, None)


def split_secrets(url: str) -> tuple[str, str | None, str | None]:
    """(`url` as it may be shown, its userinfo or None, its query string or None): the query is
    returned, and shown masked, only when it holds a secret value."""
    shown, userinfo = split_userinfo(url)
    query = urlsplit(shown).query if _SCHEME.match(shown) else ""
    if not _has_secret_param(query):
        return shown, userinfo, None
    return redact(shown), userinfo, query


def has_secrets(url: str) -> bool:
    """Whether `url` carries userinfo or a secret query value."""
    return split_secrets(url)[1:] != (None, None)


def userinfo_auth(userinfo: str) -> str:
    """A URL's userinfo as basic-auth `user:password`, percent-decoded (`p%40ss` -> `p@ss`)."""
    user, colon, password = userinfo.partition(":")
    return unquote(user) + colon + unquote(password)


def with_query(url: str, query: str) -> str:
    """`url` with its query string replaced by `query`."""
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, p.path, query, p.fragment))


class RedactingFilter(logging.Filter):
    """Passes every record of the logger it is added to with its message through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def redact_logs(*names: str) -> None:
    """Redact what the loggers `names` emit (urllib3 logs each request's path and query at DEBUG).
    A logger's filters see only its own records, not its children's: name each logger."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
