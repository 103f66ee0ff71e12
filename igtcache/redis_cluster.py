"""A Redis Cluster on 127.0.0.1 for the cluster tier: ``igtcache cluster start|stop|status``
and :class:`RedisClusterProcess` for tests and benchmarks.

Every node is a master without replica, started as a ``redis-server`` process
with the cluster tier's settings (no persistence, ``maxmemory`` per node with
``allkeys-lfu`` eviction, reads served from the healthy nodes while one is
down), then joined with ``redis-cli --cluster create``. The directory holds the
nodes' cluster configs, their logs and ``cluster.json`` (ports, pids, URL), so
that ``stop`` and ``status`` from another process find the nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from igtcache.sizes import format_size, size_argument

STATE_FILE = "cluster.json"
BUS_PORT_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000
MIN_NODES = 3  # redis-cli --cluster create refuses fewer masters


class RedisClusterError(RuntimeError):
    """The cluster could not be started, found or stopped; the message says why."""


@dataclass(frozen=True)
class ClusterTLS:
    """PEM files for a TLS-only cluster: clients connect with ``rediss://`` and trust ``ca``."""

    cert: str
    key: str
    ca: str


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
    """A Redis Cluster of ``nodes`` masters on 127.0.0.1, started and stopped by this object.

    ``with RedisClusterProcess(tmp_dir) as cluster: ClusterTier(cluster.url, ...)``.
    ``base_port`` puts the nodes on ``base_port .. base_port + nodes - 1`` (and
    their bus ports 10000 higher); without it, free ports are picked.
    ``detach=True`` starts the nodes in their own session, so that they outlive
    this process (the ``igtcache cluster start`` command).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        nodes: int = 3,
        base_port: int | None = None,
        maxmemory: int = 256 << 20,
        tls: ClusterTLS | None = None,
        timeout: float = 30.0,
        detach: bool = False,
    ) -> None:
        if nodes < MIN_NODES:
            raise ValueError(f"a Redis Cluster needs at least {MIN_NODES} masters, got {nodes}")
        self.directory = Path(directory).resolve()
        self.nodes = nodes
        self.base_port = base_port
        self.maxmemory = maxmemory
        self.tls = tls
        self.timeout = timeout
        self.detach = detach
        self.ports: list[int] = []
        self._procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P1,127.0.0.1:P2,...``; with TLS ``rediss://...?ssl_ca_certs=CA``."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"rediss://{hosts}?ssl_ca_certs={quote(self.tls.ca)}" if self.tls else f"redis://{hosts}"

    @property
    def pids(self) -> list[int]:
        return [self._procs[port].pid for port in self.ports]

    def start(self) -> "RedisClusterProcess":
        """Start the nodes, join them into a cluster and wait for ``cluster_state:ok``."""
        _require("redis-server")
        _require("redis-cli")
        self.directory.mkdir(parents=True, exist_ok=True)
        running = recorded_nodes(self.directory)
        if any(_is_redis_node(pid, port) for port, pid in running):
            raise RedisClusterError(
                f"a cluster already runs from {self.directory} (pids {' '.join(str(p) for _, p in running)}); "
                f"stop it first: igtcache cluster stop --dir {self.directory}"
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
            self._wait_state_ok(deadline)
        except BaseException:
            self.stop()
            raise
        self._record()
        return self

    def _choose_ports(self) -> list[int]:
        if self.base_port is None:
            return free_cluster_ports(self.nodes)
        ports = list(range(self.base_port, self.base_port + self.nodes))
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
            # Short node timeout: a dead master is marked failed in ~2 s. Without replicas
            # its slots stay down, and the other nodes go on serving theirs.
            "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no",
            "--cluster-allow-reads-when-down", "yes",
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
             *(f"127.0.0.1:{port}" for port in self.ports), "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RedisClusterError(f"redis-cli --cluster create failed: {(done.stdout + done.stderr).strip()[-800:]}")

    def _wait_state_ok(self, deadline: float) -> None:
        waiting = list(self.ports)
        while waiting:
            waiting = [port for port in waiting
                       if "cluster_state:ok" not in redis_cli(port, "cluster", "info", tls=self.tls).stdout]
            if waiting and time.monotonic() > deadline:
                raise RedisClusterError(
                    f"the cluster did not reach cluster_state:ok within {self.timeout:g} s "
                    f"(nodes {', '.join(map(str, waiting))} not ok; logs in {self.directory})"
                )
            if waiting:
                time.sleep(0.1)

    def _record(self) -> None:
        state = {"url": self.url, "ports": self.ports, "pids": self.pids,
                 "tls": None if self.tls is None else vars(self.tls)}
        (self.directory / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    def kill_node(self, index: int) -> int:
        """SIGKILL node ``index`` (a crash, for failure tests); returns its port."""
        port = self.ports[index]
        self._procs[port].kill()
        self._procs[port].wait()
        return port

    def stop(self) -> None:
        """Stop every node this object started (SIGTERM, then SIGKILL after 5 s)."""
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
        info = redis_cli(port, "cluster", "info", tls=tls).stdout if up else ""
        cluster_state = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                              if line.startswith("cluster_state:")), "-")
        healthy &= up and cluster_state == "ok"
        print(f"  127.0.0.1:{port}  pid {pid:<8} {'running' if up else 'DOWN':<8} cluster_state {cluster_state}")
    return 0 if healthy else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igtcache cluster",
        description="A local Redis Cluster for igtcache's cluster tier: masters without replicas on "
        "127.0.0.1, no persistence, maxmemory per node with allkeys-lfu eviction. "
        "Needs redis-server and redis-cli (apt-get install redis-server).",
        epilog="example:\n"
        "  URL=$(igtcache cluster start --dir /tmp/igt-redis | head -1)   # redis://127.0.0.1:P1,...\n"
        "  igtcache cluster status --dir /tmp/igt-redis\n"
        "  igtcache cluster stop --dir /tmp/igt-redis",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = sub.add_parser("start", help="start the nodes, create the cluster, print its URL and return",
                           description="Start NODES redis-server masters, join them with `redis-cli --cluster "
                           "create` and wait for cluster_state:ok. Prints the URL on the first line, then the "
                           "pids. The nodes keep running after this command returns.")
    start.add_argument("--dir", required=True, type=Path,
                       help="directory for the nodes' configs, logs and cluster.json (created if missing)")
    start.add_argument("--nodes", type=int, default=3, metavar="N", help=f"number of masters, at least {MIN_NODES} (default 3)")
    start.add_argument("--base-port", type=int, metavar="PORT", help="first port; nodes take consecutive ports, and each also "
                       f"port + {BUS_PORT_OFFSET} for the cluster bus (default: free ports are picked)")
    start.add_argument("--maxmemory", type=size_argument, default=256 << 20, metavar="SIZE",
                       help="memory bound per node, e.g. 256MiB or 2GiB; past it the least frequently used "
                       "keys are evicted (default 256MiB)")
    start.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="seconds to wait for the cluster to come up (default 30)")
    tls = start.add_argument_group("TLS", "All three make a TLS-only cluster; its URL is "
                                   "rediss://...?ssl_ca_certs=CA, which the cluster tier takes as it is.")
    tls.add_argument("--tls-cert", metavar="PEM", help="the nodes' certificate")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key")
    tls.add_argument("--tls-ca", metavar="PEM", help="the CA certificate that nodes and clients trust")
    for action, text in (("stop", "stop the nodes started from DIR"),
                         ("status", "show each node and its cluster_state (exit status 1 unless all are ok)")):
        cmd = sub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        cmd.add_argument("--dir", required=True, type=Path, help="the directory given to `start`")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            tls_files = (args.tls_cert, args.tls_key, args.tls_ca)
            if any(tls_files) and not all(tls_files):
                parser.error("TLS needs all of --tls-cert, --tls-key and --tls-ca")
            tls = ClusterTLS(*(os.path.abspath(f) for f in tls_files)) if all(tls_files) else None
            cluster = RedisClusterProcess(args.dir, nodes=args.nodes, base_port=args.base_port,
                                          maxmemory=args.maxmemory, tls=tls, timeout=args.timeout, detach=True)
            cluster.start()
            print(cluster.url)
            print(f"pids {' '.join(map(str, cluster.pids))}; {args.nodes} masters, maxmemory "
                  f"{format_size(args.maxmemory)} each; stop with: igtcache cluster stop --dir {args.dir}")
            return 0
        if args.action == "stop":
            pids = stop_recorded(args.dir)
            print(f"stopped pids {' '.join(map(str, pids))}" if pids else f"no running cluster recorded in {args.dir}")
            return 0
        return _status(args.dir)
    except (RedisClusterError, ValueError) as exc:
        print(f"igtcache cluster: {exc}", file=sys.stderr)
        return 1
