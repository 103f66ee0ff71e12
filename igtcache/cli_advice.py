"""What a command tells its user when it cannot reach the node daemon or a remote.

The client's error says what failed; these add what to do about it, judged
from what this user can see (the socket file as it stands, the remote's URL).
"""

from __future__ import annotations

import grp
import os
import stat

from igtcache.peercred import user_name


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def socket_advice(path: str, option: str = "--socket") -> str | None:
    """What to do about a failed connection to the daemon's socket at ``path`` (named by the
    command's ``option``); None if the socket itself looks usable (then the client's error says it all)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"if a daemon already runs on another socket, name that socket with {option} or $IGTCACHE_SOCKET"
    except PermissionError:
        return (f"you may not look into {os.path.dirname(path) or '.'}; use a socket in a directory you can "
                "reach, or run as the daemon's user")
    if not stat.S_ISSOCK(info.st_mode):
        return f"{path} is not a socket; give {option} the path the daemon listens on (its log names it)"
    if not os.access(path, os.W_OK):
        owner, group = user_name(info.st_uid), _group(info.st_gid)
        return (f"you may not connect to {path} (owner {owner}, group {group}, mode "
                f"{stat.S_IMODE(info.st_mode):04o}): run as {owner}, or have the daemon started with "
                "--socket-group GROUP for a group you are in (then log in again if you were just added)")
    return None


def remote_advice(url: str, through_daemon: bool) -> str:
    """What to check when the remote at ``url`` cannot be reached or read."""
    if through_daemon:
        return (f"the daemon reads {url} with its own credentials and options: fix them where it is started "
                "(its --storage-options, --config or environment) and restart it, or mount with --embedded")
    return (f"check the URL {url} and its credentials: for S3 $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY "
            "or $AWS_PROFILE, or --storage-options '{\"key\": ..., \"secret\": ...}' "
            "('{\"anon\": true}' for a public bucket, '{\"endpoint_url\": ...}' for another S3 service)")
