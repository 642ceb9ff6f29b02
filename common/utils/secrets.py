"""Database passwords never reach a printed line, a log record, a written file or wandb.

`redact(text)` is the one function every writer calls: it masks the password of every URL in the text
(`scheme://user:password@host` -> `scheme://user:***@host`) and every secret registered in this process (the
password of the sweep's storage URL, PGPASSWORD), wherever it appears. `protect_process(url)` registers the
secrets of a storage URL and makes this process redact them in every log record and in `sys.argv` (which wandb
records as the run's arguments). Storage URLs without a password (PGPASSWORD, ~/.pgpass) need none of this.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from common.utils.atomic import atomic_write_text

MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s'\"]*):(?P<password>[^@\s'\"]+)@")
_SECRETS: set[str] = set()
_state = {"log_factory_installed": False}


def register_secret(value: str | None) -> None:
    """Mask `value` (and its percent-decoded form) wherever redact() meets it from now on."""
    if value:
        _SECRETS.update({value, unquote(value)})


def url_password(url: str | None) -> str | None:
    if not url or "://" not in url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:  # an unparsable URL: the regular expression in redact() still masks its password
        return None


def redact(text: str) -> str:
    """`text` with URL passwords and registered secrets replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact_file(path: Path) -> bool:
    """Rewrite `path` (atomically) without secrets; True when it held one."""
    text = path.read_text()
    clean = redact(text)
    if clean != text:
        atomic_write_text(path, clean)
    return clean != text


def _install_log_redaction() -> None:
    """Every log record of this process is redacted when created (survives Hydra's logging reconfiguration)."""
    if _state["log_factory_installed"]:
        return
    make_record = logging.getLogRecordFactory()

    def redacting_factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(redacting_factory)
    _state["log_factory_installed"] = True


def protect_process(storage_url: str | None) -> None:
    """Register the storage URL's password (and PGPASSWORD), redact log records and this process's argv."""
    register_secret(url_password(storage_url))
    register_secret(url_password(os.environ.get("OPTUNA_STORAGE")))
    register_secret(os.environ.get("PGPASSWORD"))
    _install_log_redaction()
    sys.argv[:] = [redact(arg) for arg in sys.argv]
