"""Keeping secrets out of what is logged: params, the config artifact, the sweep's overrides, log lines.

Tracking credentials belong in the environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), but a
user may still write one into a URI (`postgresql://user:pw@host/db`) or add a `+token=...` override.
Whatever reaches MLflow is readable by everyone with access to the store, so before logging:
keys that name a secret are dropped, and passwords inside URIs are masked.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Words of a key (split at "_", "-", ".") that mark it as a secret: hf_token, api_key, db_password, ...
SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "apikey", "credential", "credentials", "auth",
                "authorization", "key"}
SECRET_QUERY = re.compile(r"((?:token|secret|password|api[_-]?key|sig|signature)=)[^&]+", re.I)


def is_secret_key(key: str) -> bool:
    words = re.split(r"[_\-.]", key.split(".")[-1].lower())
    return any(w in SECRET_WORDS for w in words)


def redact_uri(value: str) -> str:
    """Mask the password of `scheme://user:password@host/...` and secret query values."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    query = SECRET_QUERY.sub(rf"\g<1>{MASK}", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return value  # urlunsplit would not give back sqlite:////abs paths unchanged
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def public_config(data: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a (nested) config without secret-named keys and with URI passwords masked."""
    out: Dict[str, Any] = {}
    for key, value in data.items():
        if is_secret_key(str(key)):
            continue
        if isinstance(value, dict):
            out[key] = public_config(value)
        elif isinstance(value, str):
            out[key] = redact_uri(value)
        else:
            out[key] = value
    return out


def public_overrides(overrides: List[str]) -> List[str]:
    """Command-line overrides (`key=value`) without secret-named keys and with URI passwords masked."""
    kept = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and is_secret_key(key.lstrip("+~")):
            continue
        kept.append(f"{key}{sep}{redact_uri(value)}" if sep else item)
    return kept
