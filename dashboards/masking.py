"""Credentials out of every URL the platform prints, logs or records (stdout, stderr, MLflow params and tags,
reports, exports, Optuna attributes): storage URLs (postgresql://, sqlite:///, grpc://) and tracking URIs (http(s)://)."""

from __future__ import annotations

import re

# Query parameters (and libpq key=value settings) whose value is a credential, matched whatever their case: libpq's
# password and sslpassword, and the names tokens and keys go by in HTTP and gRPC URLs.
CREDENTIAL_PARAMETERS = ("password", "passwd", "pwd", "sslpassword", "secret", "client_secret", "token", "access_token", "auth_token",
                         "refresh_token", "id_token", "api_key", "apikey", "key", "sig", "signature", "credential", "credentials")
# The password of a URL's user:password@ (also :password@): up to the last "@" of the host part, as HTTP clients read it,
# or, for a password with a "/" in it, up to the next "@", as SQLAlchemy reads it (a port followed by a path is no password).
_USERINFO = re.compile(r"(?P<head>://[^:/?#@\s]*:)(?:[^\s/?#]*@|(?!\d*(?:[/?#\s]|$))[^@\s]*@)")
_PARAMETER = re.compile(r"(?P<head>(?<![\w.-])(?:" + "|".join(CREDENTIAL_PARAMETERS) + r")\s*=\s*)[^&\s]*", re.IGNORECASE)


def mask(text: str) -> str:
    """A URL, or any text holding URLs (an error message that echoes one), fit to print, log or record: every password
    of a user:password@ and every value of a CREDENTIAL_PARAMETERS query parameter or key=value setting becomes ***.
    The one way the platform shows a storage URL or a tracking URI."""
    return _PARAMETER.sub(r"\g<head>***", _USERINFO.sub(r"\g<head>***@", text))
