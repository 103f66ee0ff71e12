"""Whether a daemon's remote is the remote a client means.

Two remotes are the same when their ``Remote.identity`` (protocol, root, S3
endpoint) and their credentials' identity match. The credentials' identity is
a digest of who reads the remote: the access key id, user, account or profile
given in the filesystem's options (for S3 without any, the
``AWS_ACCESS_KEY_ID`` or ``AWS_PROFILE`` of the process, else its default
chain), or anonymous. It never includes a secret, and only its digest leaves
the process.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import fsspec

#: Options that name who reads a remote (never a secret: no secret key, password or token).
_PRINCIPAL = ("anon", "key", "aws_access_key_id", "profile", "username", "user", "account_name", "client_id",
              "project")
_S3_PROTOCOLS = {"s3", "s3a"}


def credentials_identity(fs: fsspec.AbstractFileSystem) -> str:
    """A digest of who ``fs`` reads its remote as; equal for the same principal in any process."""
    options: dict[str, Any] = dict(getattr(fs, "storage_options", None) or {})
    nested = options.get("client_kwargs") or {}
    principal = {name: str(value) for name in _PRINCIPAL
                 for value in [options.get(name, nested.get(name))] if value not in (None, "", False)}
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & _S3_PROTOCOLS and not principal:
        principal["environment"] = (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                                    or "default chain")
    digest = hashlib.sha256(json.dumps(principal, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest[:16]}"


def mismatch(served: dict[str, Any], identity: str, credentials: str) -> str | None:
    """Why a daemon's remote (an entry of its ``remotes`` answer) is not the remote with ``identity``
    read with ``credentials``; ``None`` when it is."""
    theirs = served.get("identity")
    if theirs is None:
        return "the daemon does not say which endpoint and credentials it uses (an older daemon)"
    if theirs != identity:
        return f"the daemon's remote is {theirs}, this one is {identity}"
    if served.get("credentials") != credentials:
        return f"the daemon reads {theirs} with other credentials than this process"
    return None
