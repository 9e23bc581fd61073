"""Keeping secrets out of what the pipeline logs and records.

Secrets reach the pipeline in two ways: inside URLs (`postgresql://user:PASSWORD@host/db`,
`http://user:PASSWORD@mlflow:5000`) and as environment variables (`AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `MLFLOW_TRACKING_PASSWORD`, ...).

- `redact(text)` masks the password of every URL's userinfo (`user:***@`, or `***@` for a bare token)
  and every value of a secret-looking environment variable (`secret_values`), wherever it occurs. Use it
  on any text built from URIs, settings or exceptions before it is logged, stored as an MLflow
  param/tag, or published as a Prefect artifact. Idempotent, and cheap enough to call per log line.
- `split_credentials(uri)` separates `user:password@` from a URI; `credentials_to_env(uri)` moves them to
  `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, where MLflow reads them for every request, so
  the tracking URI itself holds no secret and can be logged, passed to subflows and deployments, and
  recorded in Prefect parameters.
- `redact` also masks credentials in HTTP headers as clients print them at DEBUG level (AWS session
  tokens, request signatures, Authorization / Cookie values), whatever their source.
- `RedactingFilter` applies `redact` to log records (message and arguments), for handlers or loggers
  that may see secrets; `install(names)` attaches it to loggers. `flows.landing.s3_client` installs it on
  botocore's loggers that print requests (`BOTOCORE_LOGGERS`), whose DEBUG output holds the session
  token of every request.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# scheme://userinfo@ — userinfo up to the first '@' with no '/', whitespace, quote or '@' before it.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/@'\"<>]+)@")
# Names of environment variables whose values are secrets.
_SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|PASSPHRASE|TOKEN|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY$|AUTH(?!OR)", re.IGNORECASE
)
_NOT_SECRET_NAME = re.compile(
    r"_ID$|_FILE$|_PATH$|_URI$|_URL$|_SOCK$|_ENDPOINT|_REGION|_EXPIRATION|_TYPE$", re.IGNORECASE
)
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true", "testing") would mask ordinary words
# Credentials in HTTP headers as clients print them at DEBUG level (botocore: `'X-Amz-Security-Token':
# b'...'` in request reprs, `x-amz-security-token:...` in canonical requests; Authorization headers).
_SECRET_HEADER = re.compile(
    r"(?P<name>x-amz-security-token|authorization|x-api-key|cookie)(?P<sep>['\"]?\s*[:=]\s*(?-i:b)?['\"]?)"
    r"(?P<value>(?:(?:Basic|Bearer|Token) )?[^'\"\s,}]+)",
    re.IGNORECASE,
)
_SIGNATURE = re.compile(r"(?P<name>\bSignature=|X-Amz-Signature=|X-Amz-Credential=)(?P<value>[^&'\"\s,]+)")


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without `user:password@`, user, password); user and password are None when absent."""
    parts = urlsplit(uri)
    if not parts.scheme or "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, unquote(password) if colon else None


def credentials_to_env(uri: str, environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """`uri` without its credentials, which go to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.

    Raises ValueError (without the secret) when the environment already holds different credentials.
    """
    env = os.environ if environ is None else environ
    clean, user, password = split_credentials(uri)
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            continue
        if env.get(name) not in (None, "", value):
            raise ValueError(f"{redact(uri)}: its credentials differ from those in {name}; keep one of them")
        env[name] = value
    return clean


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Secret values of the environment: variables named like secrets, and passwords inside URL values;
    longest first, so that a secret containing another is masked whole."""
    env = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in env.items():
        if _SECRET_NAME.search(name) and not _NOT_SECRET_NAME.search(name):
            found.add(value)
        if "@" in value and "://" in value:
            for match in _USERINFO.finditer(value):
                _user, colon, password = match.group("userinfo").partition(":")
                found.update(s for s in (password, unquote(password)) if colon)
    return sorted((v for v in found if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, password = match.group("userinfo").partition(":")
    if not colon:  # a bare token as userinfo (https://TOKEN@host)
        return f"{match.group('scheme')}{MASK}@"
    return f"{match.group('scheme')}{user}:{MASK}@" if password != MASK else match.group(0)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with URL passwords and the values of secret environment variables masked as `***`."""
    if not isinstance(text, str):
        text = str(text)
    if "@" in text:
        text = _USERINFO.sub(_mask_userinfo, text)
    text = _SECRET_HEADER.sub(lambda m: f"{m.group('name')}{m.group('sep')}{MASK}", text)
    text = _SIGNATURE.sub(lambda m: f"{m.group('name')}{MASK}", text)
    for value in secret_values(environ):
        if value in text:
            text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Redacts a log record's message (with its arguments merged in) and its exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave the record to the handler's own error path
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc_text = logging.Formatter().formatException(record.exc_info)
            redacted = redact(exc_text)
            if redacted != exc_text:
                record.exc_info, record.exc_text = None, redacted
        return True


# botocore loggers whose DEBUG records hold request headers (session token, signature).
BOTOCORE_LOGGERS = (
    "botocore.endpoint",
    "botocore.auth",
    "botocore.awsrequest",
    "botocore.httpsession",
    "botocore.hooks",
)
_INSTALLED: set[str] = set()


def install(logger_names: tuple[str, ...]) -> None:
    """Attach one `RedactingFilter` to each named logger (records created by that logger itself)."""
    for name in logger_names:
        if name not in _INSTALLED:
            logging.getLogger(name).addFilter(RedactingFilter())
            _INSTALLED.add(name)


__all__ = [
    "BOTOCORE_LOGGERS",
    "MASK",
    "RedactingFilter",
    "credentials_to_env",
    "install",
    "redact",
    "secret_values",
    "split_credentials",
]
