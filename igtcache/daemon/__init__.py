"""The node daemon: one ``Cache`` per remote, shared by every job, on a Unix socket.

``igtcache serve`` runs it (``serve.py``); ``igtcache.daemon_client.DaemonClient``
talks to it. Modules: ``config`` (what to serve), ``server`` (life cycle),
``service`` (checked operations), ``binary`` and ``protocol`` (the fast read
path), ``http_api`` (HTTP and ``/metrics``), ``metrics`` (Prometheus text).
"""

from igtcache.daemon.config import DaemonConfig, RemoteConfig
from igtcache.daemon.protocol import DaemonError, DaemonUnavailable
from igtcache.daemon.server import Daemon, StartError

__all__ = ["Daemon", "DaemonConfig", "DaemonError", "DaemonUnavailable", "RemoteConfig", "StartError"]
