"""A Redis Cluster on 127.0.0.1 for the cluster tier: ``igtcache cluster up|down|status``
and :class:`RedisClusterProcess` for tests and benchmarks.

Every node is a ``redis-server`` process with the cluster tier's settings (no
persistence, ``maxmemory`` per node with ``allkeys-lfu`` eviction, reads
served from the healthy nodes while one is down); ``redis-cli --cluster
create`` joins them, with one replica per master if asked. The directory
holds the nodes' cluster configs, their logs and ``cluster.json`` (ports,
pids, URL), so that ``down`` and ``status`` from another process find the
nodes.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from igtcache.sizes import format_size, size_argument

STATE_FILE = "cluster.json"
BUS_PORT_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000
MIN_NODES = 3  # redis-cli --cluster create refuses fewer masters
SLOTS = 16384
DEFAULT_MEMORY = 1 << 30
DEFAULT_NODE_TIMEOUT_MS = 2000


class RedisClusterError(RuntimeError):
    """The cluster could not be started, found or stopped; the message says why."""


@dataclass(frozen=True)
class ClusterTLS:
    """PEM files for a TLS-only cluster: clients connect with ``rediss://`` and trust ``ca``."""

    cert: str
    key: str
    ca: str


def default_directory() -> Path:
    """``$XDG_RUNTIME_DIR/igtcache-cluster``, else ``/tmp/igtcache-cluster-USER``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "igtcache-cluster"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = str(os.getuid())
    return Path("/tmp") / f"igtcache-cluster-{user}"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """``count`` ports on 127.0.0.1 that are free together with their cluster bus ports."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        bus = port + BUS_PORT_OFFSET
        if bus <= 65535 and port not in ports and bus not in ports and _port_free(bus):
            ports.append(port)
    return ports


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RedisClusterError(
            f"{program} not found on PATH: install it with `apt-get install redis-server` "
            "(Debian/Ubuntu; it brings redis-cli too)"
        )
    return path


def redis_cli(port: int, *args: str, tls: ClusterTLS | None = None,
              timeout: float = 5.0) -> subprocess.CompletedProcess:
    """``redis-cli -h 127.0.0.1 -p PORT ARGS`` (with TLS options), its output captured as text."""
    tls_args = ["--tls", "--cacert", tls.ca] if tls else []
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *tls_args, *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def _info_field(text: str, name: str) -> str | None:
    """The value of ``name:value`` in ``INFO`` or ``CLUSTER INFO`` output."""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name + ":")), None)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _is_redis_node(pid: int, port: int) -> bool:
    """Whether ``pid`` is still the redis-server on ``port`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "redis-server" in cmdline and str(port) in cmdline


class RedisClusterProcess:
    """A Redis Cluster of ``nodes`` masters (each with ``replicas`` replicas, 0 or 1) on 127.0.0.1,
    started and stopped by this object.

    ``with RedisClusterProcess(tmp_dir) as cluster: ClusterTier(cluster.url, ...)``.
    ``base_port`` puts the servers on ``base_port`` and the ports after it (and
    their bus ports 10000 higher); without it, free ports are picked.
    ``node_timeout_ms``: how long a node may be unreachable before the others
    mark it failed and its replica takes over. ``detach=True`` starts the
    servers in their own session, so that they outlive this process (the
    ``igtcache cluster up`` command).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        nodes: int = 3,
        replicas: int = 0,
        base_port: int | None = None,
        maxmemory: int = DEFAULT_MEMORY,
        node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS,
        tls: ClusterTLS | None = None,
        timeout: float = 30.0,
        detach: bool = False,
    ) -> None:
        if nodes < MIN_NODES:
            raise ValueError(f"a Redis Cluster needs at least {MIN_NODES} masters, got {nodes}")
        if replicas not in (0, 1):
            raise ValueError(f"replicas per master must be 0 or 1, got {replicas}")
        if node_timeout_ms < 100:
            raise ValueError(f"node timeout must be at least 100 ms, got {node_timeout_ms}")
        self.directory = Path(directory).resolve()
        self.nodes = nodes
        self.replicas = replicas
        self.base_port = base_port
        self.maxmemory = maxmemory
        self.node_timeout_ms = node_timeout_ms
        self.tls = tls
        self.timeout = timeout
        self.detach = detach
        self.ports: list[int] = []  # every server, in the order started
        self.master_ports: list[int] = []  # as created; a failover changes the roles
        self.master_of: dict[int, int] = {}  # replica port -> its master's port, as created
        self._procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P1,127.0.0.1:P2,...``; with TLS ``rediss://...?ssl_ca_certs=CA``."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"rediss://{hosts}?ssl_ca_certs={quote(self.tls.ca)}" if self.tls else f"redis://{hosts}"

    @property
    def pids(self) -> list[int]:
        return [self._procs[port].pid for port in self.ports]

    @property
    def replica_ports(self) -> list[int]:
        return list(self.master_of)

    def start(self) -> "RedisClusterProcess":
        """Start the servers, join them into a cluster and wait until every slot is served and
        every replica is linked to its master."""
        _require("redis-server")
        _require("redis-cli")
        _own_directory(self.directory)
        running = recorded_nodes(self.directory)
        if any(_is_redis_node(pid, port) for port, pid in running):
            raise RedisClusterError(
                f"a cluster already runs from {self.directory} (pids {' '.join(str(p) for _, p in running)}); "
                f"stop it first: igtcache cluster down {self.directory}"
            )
        self.ports = self._choose_ports()
        deadline = time.monotonic() + self.timeout
        try:
            for port in self.ports:
                # A node that finds an old cluster config would rejoin that cluster.
                (self.directory / f"nodes-{port}.conf").unlink(missing_ok=True)
                self._spawn(port)
            for port in self.ports:
                self._wait_ready(port, deadline)
            self._create()
            self._wait_ok(deadline)
            self._read_roles()
            self._wait_replicas_linked(deadline)
        except BaseException:
            self.stop()
            raise
        self._record()
        return self

    def _choose_ports(self) -> list[int]:
        count = self.nodes * (1 + self.replicas)
        if self.base_port is None:
            return free_cluster_ports(count)
        ports = list(range(self.base_port, self.base_port + count))
        if ports[-1] + BUS_PORT_OFFSET > 65535:
            raise RedisClusterError(
                f"--base-port {self.base_port} is too high: the bus ports (port + {BUS_PORT_OFFSET}) "
                "must stay under 65536"
            )
        busy = [p for port in ports for p in (port, port + BUS_PORT_OFFSET) if not _port_free(p)]
        if busy:
            raise RedisClusterError(
                f"ports busy on 127.0.0.1: {', '.join(map(str, busy))} (a node needs its port and port + "
                f"{BUS_PORT_OFFSET}); choose another --base-port or leave it out to pick free ports"
            )
        return ports

    def _server_args(self, port: int) -> list[str]:
        args = ["redis-server", "--bind", "127.0.0.1"]
        if self.tls:
            args += [
                "--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-replication", "yes",
                "--tls-cert-file", self.tls.cert, "--tls-key-file", self.tls.key,
                "--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "no",
            ]
        else:
            args += ["--port", str(port)]
        return args + [
            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no",
            "--maxmemory", str(self.maxmemory), "--maxmemory-policy", "allkeys-lfu",
            # A dead master is marked failed after the node timeout; its replica then takes
            # over, and without one the other nodes go on serving their own slots.
            "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-require-full-coverage", "no",
            "--cluster-allow-reads-when-down", "yes",
            # A replica syncs at once (diskless), not after the default 5 s wait for others.
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        ]

    def _log(self, port: int) -> Path:
        return self.directory / f"redis-{port}.log"

    def _spawn(self, port: int) -> None:
        with open(self._log(port), "ab") as log:
            self._procs[port] = subprocess.Popen(
                self._server_args(port), cwd=self.directory, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=self.detach,
            )

    def cli(self, port: int, *args: str) -> str:
        """``redis-cli`` against one node (TLS options added); its output, or ``RedisClusterError``."""
        done = redis_cli(port, *args, tls=self.tls)
        if done.returncode != 0 or done.stdout.startswith(("ERR", "(error)")):
            raise RedisClusterError(f"redis-cli -p {port} {' '.join(args)}: {(done.stdout + done.stderr).strip()}")
        return done.stdout

    def _wait_ready(self, port: int, deadline: float) -> None:
        proc = self._procs[port]
        while True:
            if proc.poll() is not None:
                log = self._log(port).read_text(errors="replace").strip().splitlines()[-5:]
                hint = " (port busy)" if any("in use" in line for line in log) else ""
                raise RedisClusterError(
                    f"redis-server on port {port} exited with status {proc.returncode}{hint}: " + " | ".join(log)
                )
            if redis_cli(port, "ping", tls=self.tls).stdout.strip() == "PONG":
                return
            if time.monotonic() > deadline:
                raise RedisClusterError(f"redis-server on port {port} did not answer PING within {self.timeout:g} s")
            time.sleep(0.05)

    def _create(self) -> None:
        done = subprocess.run(
            ["redis-cli", *(["--tls", "--cacert", self.tls.ca] if self.tls else []), "--cluster", "create",
             *(f"127.0.0.1:{port}" for port in self.ports), "--cluster-replicas", str(self.replicas),
             "--cluster-yes"],
            capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RedisClusterError(f"redis-cli --cluster create failed: {(done.stdout + done.stderr).strip()[-800:]}")

    def _running(self) -> list[int]:
        return [port for port in self.ports if self._procs[port].poll() is None]

    def _wait_ok(self, deadline: float) -> None:
        self._poll(self._running(), self._serves_all_slots, deadline, lambda waiting: (
            f"the cluster did not reach cluster_state:ok with all {SLOTS} slots served in time "
            f"(nodes {waiting} not ok; logs in {self.directory})"))

    @staticmethod
    def _poll(ports: list[int], ready: Callable[[int], bool], deadline: float,
              failure: Callable[[str], str]) -> None:
        """Ask ``ready`` of each port not yet ready every 0.1 s until all are; past ``deadline``,
        ``RedisClusterError`` with ``failure`` of the ports still waiting."""
        waiting = list(ports)
        while waiting:
            waiting = [port for port in waiting if not ready(port)]
            if waiting and time.monotonic() > deadline:
                raise RedisClusterError(failure(", ".join(map(str, waiting))))
            if waiting:
                time.sleep(0.1)

    def _serves_all_slots(self, port: int) -> bool:
        """Whether ``port`` sees the cluster ok with every slot on a master it deems healthy."""
        info = redis_cli(port, "cluster", "info", tls=self.tls).stdout
        return _info_field(info, "cluster_state") == "ok" and _info_field(info, "cluster_slots_ok") == str(SLOTS)

    def wait_ok(self, timeout: float = 15.0) -> float:
        """Wait until every running node reports ``cluster_state:ok`` and all slots ok (after a
        failover: the replica serves the dead master's slots); returns the seconds waited."""
        started = time.monotonic()
        self._wait_ok(started + timeout)
        return time.monotonic() - started

    def _read_roles(self) -> None:
        """``master_ports`` and ``master_of`` from each node's own line in ``CLUSTER NODES``."""
        port_of, master_id = {}, {}
        for port in self.ports:
            line = next(line for line in self.cli(port, "cluster", "nodes").splitlines() if "myself" in line)
            node_id, _address, flags, master = line.split()[:4]
            port_of[node_id] = port
            if "slave" in flags.split(","):
                master_id[port] = master
        self.master_of = {port: port_of[master] for port, master in master_id.items()}
        self.master_ports = [port for port in self.ports if port not in self.master_of]

    def _wait_replicas_linked(self, deadline: float) -> None:
        def linked(port: int) -> bool:
            info = redis_cli(port, "info", "replication", tls=self.tls).stdout
            return _info_field(info, "master_link_status") == "up"

        self._poll(self.replica_ports, linked, deadline, lambda waiting: (
            f"replicas {waiting} did not link to their masters within {self.timeout:g} s "
            f"(logs in {self.directory})"))

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Wait until each replica (as created) has applied everything its master had written so
        far: a master killed after this loses nothing that its replica cannot serve."""
        deadline = time.monotonic() + timeout
        for replica, master in self.master_of.items():
            written = int(_info_field(self.cli(master, "info", "replication"), "master_repl_offset") or 0)
            while int(_info_field(self.cli(replica, "info", "replication"), "slave_repl_offset") or 0) < written:
                if time.monotonic() > deadline:
                    raise RedisClusterError(f"replica {replica} did not catch up with master {master} "
                                            f"within {timeout:g} s")
                time.sleep(0.02)

    def _record(self) -> None:
        state = {"url": self.url, "ports": self.ports, "pids": self.pids,
                 "tls": None if self.tls is None else vars(self.tls)}
        (self.directory / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    def _port(self, port_or_index: int) -> int:
        return port_or_index if port_or_index in self._procs else self.ports[port_or_index]

    def kill_node(self, port_or_index: int) -> int:
        """SIGKILL a server (a crash, for failure tests), given its port or its index in ``ports``;
        returns its port."""
        port = self._port(port_or_index)
        self._procs[port].kill()
        self._procs[port].wait()
        return port

    def restart_node(self, port_or_index: int) -> int:
        """Start a killed server again on its port from its cluster config: it rejoins the cluster
        (empty: nothing persists), a master with its slots unless a replica took them over."""
        port = self._port(port_or_index)
        if self._procs[port].poll() is None:
            raise RedisClusterError(f"the node on port {port} still runs")
        self._spawn(port)
        self._wait_ready(port, time.monotonic() + self.timeout)
        self._record()
        return port

    def stop(self) -> None:
        """Stop every server this object started (SIGTERM, then SIGKILL after 5 s)."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        (self.directory / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> "RedisClusterProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _own_directory(directory: Path) -> None:
    """Create ``directory`` (mode 0700); refuse a symlink or another user's (a shared /tmp)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid not in (os.getuid(), 0):
        raise RedisClusterError(f"{directory} is a symlink or belongs to another user; choose another --dir")


def _read_state(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def recorded_nodes(directory: str | os.PathLike) -> list[tuple[int, int]]:
    """``(port, pid)`` of each node ``cluster.json`` in ``directory`` names, or ``[]``."""
    state = _read_state(Path(directory))
    return [] if state is None else list(zip(state["ports"], state["pids"]))


def stop_recorded(directory: str | os.PathLike, timeout: float = 10.0) -> list[int]:
    """Stop the nodes of the cluster started from ``directory``; returns the pids stopped."""
    directory = Path(directory)
    nodes = [(port, pid) for port, pid in recorded_nodes(directory) if _is_redis_node(pid, port)]
    for _port, pid in nodes:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for _port, pid in nodes:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    (directory / STATE_FILE).unlink(missing_ok=True)
    return [pid for _port, pid in nodes]


def _status(directory: Path) -> int:
    state = _read_state(directory)
    if state is None:
        print(f"no cluster recorded in {directory}")
        return 1
    print(state["url"])
    tls = ClusterTLS(**state["tls"]) if state["tls"] else None
    healthy = True
    for port, pid in zip(state["ports"], state["pids"]):
        up = _is_redis_node(pid, port)
        info = redis_cli(port, "info", "replication", tls=tls).stdout if up else ""
        cluster = redis_cli(port, "cluster", "info", tls=tls).stdout if up else ""
        role = {"master": "master", "slave": "replica"}.get(_info_field(info, "role") or "", "-")
        cluster_state = _info_field(cluster, "cluster_state") or "-"
        healthy &= up and cluster_state == "ok"
        print(f"  127.0.0.1:{port}  pid {pid:<8} {'running' if up else 'DOWN':<8} {role:<8} "
              f"cluster_state {cluster_state}")
    return 0 if healthy else 1


def _parser() -> argparse.ArgumentParser:
    default_dir = default_directory()
    parser = argparse.ArgumentParser(
        prog="igtcache cluster",
        description="A local Redis Cluster for igtcache's cluster tier, on 127.0.0.1 and configured as a "
        "cache: no persistence, a memory bound per node with allkeys-lfu eviction, and the healthy nodes "
        "keep serving while one is down. Needs redis-server and redis-cli (apt-get install redis-server).",
        epilog="example:\n"
        "  igtcache cluster up --replicas 1 --memory 2GiB   # first line: redis://127.0.0.1:P1,...\n"
        "  igtcache cluster status\n"
        "  igtcache cluster down\n"
        "\nin Python: igtcache.Cache(\"s3://bucket/data\", cluster=\"redis://127.0.0.1:P1,...\")\n"
        f"without --dir/DIR the cluster lives in {default_dir}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = sub.add_parser(
        "up", help="start the nodes, create the cluster, print its URL and return",
        description="Start NODES redis-server masters (and a replica for each with --replicas 1), join them "
        "with `redis-cli --cluster create` and wait until every slot is served and every replica is linked. "
        "Prints the URL on the first line (for Cache(cluster=URL)), then the "
        "pids and the directory. The nodes keep running after this command returns.")
    up.add_argument("--dir", type=Path, default=default_dir,
                    help=f"directory for the nodes' configs, logs and cluster.json, created if missing "
                    f"(default {default_dir})")
    up.add_argument("--nodes", type=int, default=3, metavar="N",
                    help=f"number of masters, at least {MIN_NODES} (default 3)")
    up.add_argument("--replicas", type=int, choices=(0, 1), default=0,
                    help="replicas per master (default 0). With 1, a master that dies is replaced by its "
                    "replica after --node-timeout and its blocks stay shared; with 0 they are fetched "
                    "from the remote again")
    up.add_argument("--memory", type=size_argument, default=DEFAULT_MEMORY, metavar="SIZE",
                    help="memory bound per server (replicas too), e.g. 512MiB or 4GiB; past it the least "
                    f"frequently used blocks are evicted (default {format_size(DEFAULT_MEMORY)})")
    up.add_argument("--node-timeout", type=int, default=DEFAULT_NODE_TIMEOUT_MS, metavar="MS",
                    help="how long a node may be unreachable before it is marked failed and its replica "
                    f"takes over (default {DEFAULT_NODE_TIMEOUT_MS})")
    up.add_argument("--base-port", type=int, metavar="PORT",
                    help="first port; servers take consecutive ports, and each also "
                    f"port + {BUS_PORT_OFFSET} for the cluster bus (default: free ports are picked)")
    up.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="seconds to wait for the cluster to come up (default 30)")
    tls = up.add_argument_group("TLS", "All three make a TLS-only cluster; its URL is "
                                "rediss://...?ssl_ca_certs=CA, which the cluster tier takes as it is.")
    tls.add_argument("--tls-cert", metavar="PEM", help="the nodes' certificate")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key")
    tls.add_argument("--tls-ca", metavar="PEM", help="the CA certificate that nodes and clients trust")
    for action, text in (("down", "stop the nodes started from DIR (by `up`)"),
                         ("status", "show each node, its role and cluster_state (exit status 1 unless all are ok)")):
        cmd = sub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        cmd.add_argument("directory", nargs="?", type=Path, metavar="DIR",
                         help=f"the directory given to `up` (default {default_dir})")
        cmd.add_argument("--dir", type=Path, dest="dir_option", metavar="DIR", help="the same as DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            tls_files = (args.tls_cert, args.tls_key, args.tls_ca)
            if any(tls_files) and not all(tls_files):
                parser.error("TLS needs all of --tls-cert, --tls-key and --tls-ca")
            tls = ClusterTLS(*(os.path.abspath(f) for f in tls_files)) if all(tls_files) else None
            cluster = RedisClusterProcess(args.dir, nodes=args.nodes, replicas=args.replicas,
                                          base_port=args.base_port, maxmemory=args.memory,
                                          node_timeout_ms=args.node_timeout, tls=tls, timeout=args.timeout,
                                          detach=True)
            cluster.start()
            print(cluster.url)
            replicas = f" and {len(cluster.master_of)} replicas" if cluster.master_of else ""
            print(f"pids {' '.join(map(str, cluster.pids))}; {args.nodes} masters{replicas}, maxmemory "
                  f"{format_size(args.memory)} each")
            print(f"directory {cluster.directory}; stop with: igtcache cluster down {cluster.directory}")
            return 0
        if args.directory and args.dir_option and args.directory != args.dir_option:
            parser.error(f"two directories given: {args.directory} and --dir {args.dir_option}")
        directory = args.directory or args.dir_option or default_directory()
        if args.action == "down":
            pids = stop_recorded(directory)
            print(f"stopped pids {' '.join(map(str, pids))}" if pids else f"no running cluster recorded in {directory}")
            return 0
        return _status(directory)
    except (RedisClusterError, ValueError) as exc:
        print(f"igtcache cluster: {exc}", file=sys.stderr)
        return 1
