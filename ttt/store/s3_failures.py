"""Which S3 failures are final (denied, missing) and which are worth a retry (throttling, network)."""

from __future__ import annotations

import re

import urllib3
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

DENIED = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "AllAccessDisabled", "AccountProblem", "InvalidSecurity",
}  # fmt: skip
TRANSIENT = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
    "OperationAborted", "XMinioServerNotInitialized", "XMinioReadQuorum",
    "XMinioWriteQuorum",
}  # fmt: skip
# A network failure: refused or reset connections, timeouts, truncated bodies. Local file
# errors (PermissionError, disk full) are OSErrors too but not these, so they propagate.
NETWORK = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


def short_error(exc: BaseException) -> str:
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    # urllib3 prefixes "<urllib3.connection.HTTPConnection object at 0x..>: "
    return re.sub(r"<[^>]+ object at 0x[0-9a-f]+>: ", "", str(exc)) or type(exc).__name__


def status_code(exc: MinioException) -> int | None:
    if isinstance(exc, S3Error):
        return exc.response.status if exc.response is not None else None
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        return exc._code
    return None
