"""The recipes in deploy/ checked against the code they run: every file parses, every option
they give ``igtcache serve`` is one it lists and accepts, the probes and scrapes reach the
daemon's HTTP API on its metrics port, and every metric the Grafana dashboard queries is one a
live daemon exports."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from igtcache.daemon.config import DaemonConfig
from igtcache.daemon.http_api import HttpApi
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon.serve import _parser as serve_parser
from igtcache.daemon.serve import build_config
from igtcache.daemon_client import DaemonClient
from igtcache.local_s3 import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
DASHBOARD = DEPLOY / "grafana" / "igtcache.json"
# Labels Prometheus adds to every scraped series; a scraped `job` label is kept as `exported_job`.
TARGET_LABELS = {"instance", "job"}


# ---------------------------------------------------------------------- checkers


@functools.cache
def help_options() -> frozenset[str]:
    """The long options in the options section of the real ``igtcache serve --help``."""
    out = subprocess.run([sys.executable, "-m", "igtcache.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    section = out.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    return frozenset(re.findall(r"^  (?:-\w, )?(--[a-z][a-z-]*)", section, re.MULTILINE))


def unknown_options(args: list[str]) -> list[str]:
    """The options in ``args`` that ``igtcache serve --help`` does not list."""
    return sorted({a.split("=", 1)[0] for a in args if a.startswith("--")} - help_options())


def serve_config(args: list[str], where: str) -> DaemonConfig:
    """``args`` (``serve`` and its options) as the daemon would take them; fails naming ``where``."""
    assert args[0] == "serve", f"{where} does not run `igtcache serve`: {args}"
    assert not unknown_options(args[1:]), f"{where} passes options `igtcache serve --help` lacks: " \
                                          f"{unknown_options(args[1:])}"
    try:
        return build_config(serve_parser().parse_args(args[1:]))
    except SystemExit:
        pytest.fail(f"{where}: igtcache serve refuses {shlex.join(args)} (its error is in the captured stderr)")
    except ValueError as exc:
        pytest.fail(f"{where}: igtcache serve refuses {shlex.join(args)}: {exc}")


@functools.cache
def metrics_routes() -> frozenset[str]:
    """The paths the daemon serves on --metrics-port."""
    return frozenset(route.resource.canonical for route in HttpApi(None).metrics_app().router.routes())


def queried_metrics(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in re.findall(r"\bigtcache_[a-z_]+\b", expr)}


def unknown_metrics(expressions: list[str], exported: dict[str, set[str]]) -> list[str]:
    return sorted(queried_metrics(expressions) - set(exported))


def unknown_labels(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Labels ``expr`` matches on or groups by that none of its metrics carries once scraped."""
    carried = set(TARGET_LABELS)
    for name in queried_metrics([expr]):
        carried |= {"exported_job" if label == "job" else label for label in exported.get(name, ())}
    used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in group.split(",") if label.strip()}
    return sorted(used - carried)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.status, response.read().decode()


def exported_metrics(text: str) -> dict[str, set[str]]:
    """Prometheus text as ``metric name -> label names``."""
    metrics: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", line)
        if match and not line.startswith("#"):
            labels = re.findall(r"(\w+)=\"", match.group(2) or "")
            metrics.setdefault(match.group(1), set()).update(labels)
    return metrics


# ---------------------------------------------------------------------- the checkers can fail


def test_the_checkers_catch_a_misspelt_option_metric_and_label():
    assert unknown_options(["--metrics-prot", "9464", "--cache-dir=/x"]) == ["--metrics-prot"]
    exported = {"igtcache_reads_total": {"remote"}, "igtcache_job_reads_total": {"remote", "job"}}
    assert unknown_metrics(["rate(igtcache_reads_totl[5m])"], exported) == ["igtcache_reads_totl"]
    assert unknown_labels('sum by (tier) (igtcache_reads_total{remote=~"$r"})', exported) == ["tier"]
    assert unknown_labels("sum by (job) (igtcache_job_reads_total)", exported) == []  # the target's job
    assert unknown_labels("sum by (exported_job) (igtcache_job_reads_total)", exported) == []
    assert unknown_labels("sum by (exported_job) (igtcache_reads_total)", exported) == ["exported_job"]


# ---------------------------------------------------------------------- container image


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def instruction(name: str) -> list[str]:
    return [args for instr, args in dockerfile() if instr == name]


def image_serve_args() -> list[str]:
    """What the image runs, with the ``--remote`` its users add (deploy/README.md)."""
    entrypoint, = instruction("ENTRYPOINT")
    cmd, = instruction("CMD")
    argv = json.loads(entrypoint) + json.loads(cmd)
    assert argv[0] == "igtcache"
    return argv[1:] + ["--remote", "s3://my-bucket/datasets"]


def test_the_image_holds_every_package_the_project_installs():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = set(pyproject["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", "constraints.txt",
                                                                             pyproject["project"]["readme"]}
    copied = {source for args in instruction("COPY") if not args.startswith("--from")
              for source in shlex.split(args)[:-1]}
    assert needed <= copied, f"deploy/Dockerfile does not copy {sorted(needed - copied)}"
    kept = {line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied <= kept, f"deploy/Dockerfile.dockerignore leaves out {sorted(copied - kept)}"


def test_the_image_serves_with_options_it_has_and_checks_health_on_the_metrics_port():
    config = serve_config(image_serve_args(), "deploy/Dockerfile CMD")
    assert config.metrics_port is not None and config.metrics_host == "0.0.0.0"
    assert instruction("EXPOSE") == [str(config.metrics_port)]
    healthcheck, = instruction("HEALTHCHECK")
    port, path = re.search(r"http://127\.0\.0\.1:(\d+)(/\w*)", healthcheck).groups()
    assert int(port) == config.metrics_port and path == "/health" and path in metrics_routes()
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instruction("ENV"))))
    assert env["IGTCACHE_SOCKET"] == config.socket


# ---------------------------------------------------------------------- Kubernetes


@functools.cache
def manifests() -> dict[str, list[dict[str, Any]]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
            for path in sorted(KUBERNETES.glob("*.yaml"))}


def manifest(kind: str) -> dict[str, Any]:
    found = [doc for docs in manifests().values() for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests in deploy/kubernetes"
    return found[0]


def daemon_pod() -> dict[str, Any]:
    return manifest("DaemonSet")["spec"]["template"]


def daemon_container() -> dict[str, Any]:
    container, = daemon_pod()["spec"]["containers"]
    return container


def daemon_config() -> DaemonConfig:
    container = daemon_container()
    assert "command" not in container, "the image's ENTRYPOINT (igtcache) runs the args"
    return serve_config([str(a) for a in container["args"]], "the DaemonSet's args")


def test_every_manifest_parses_and_names_its_object():
    assert set(manifests()) == {"daemonset.yaml", "servicemonitor.yaml", "example-job.yaml"}
    for name, docs in manifests().items():
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), name


def _mounted_volume(container: dict[str, Any], path: str) -> dict[str, Any]:
    mount, = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    volume, = [v for v in daemon_pod()["spec"]["volumes"] if v["name"] == mount["name"]]
    return volume


def test_the_daemonset_keeps_the_socket_and_the_cache_dir_on_the_host():
    config, container = daemon_config(), daemon_container()
    socket_dir = os.path.dirname(config.socket)
    for path in (socket_dir, config.cache_dir):
        assert "hostPath" in _mounted_volume(container, path), f"{path} is not on the host"
    pod = daemon_pod()["spec"]
    uid = pod["securityContext"]["runAsUser"]
    init, = pod["initContainers"]
    made = {path: (owner, mode) for owner, mode, path in
            re.findall(r"install -d -o (\d+) -g \d+ -m (\d+) (\S+)", " ".join(init["command"]))}
    assert set(made) == {socket_dir, config.cache_dir}
    assert all(int(owner) == uid for owner, _ in made.values())
    assert int(made[socket_dir][1], 8) & 0o022 == 0, "the daemon refuses a socket directory others can write"
    assert int(config.socket_group) == pod["securityContext"]["runAsGroup"]
    assert pod["terminationGracePeriodSeconds"] > config.grace


def test_the_daemonset_probes_health_and_is_scraped_on_the_metrics_port():
    config, container = daemon_config(), daemon_container()
    assert config.metrics_port is not None and config.metrics_host == "0.0.0.0", "the kubelet probes the pod's IP"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["path"] in metrics_routes()
        assert ports.get(get["port"], get["port"]) == config.metrics_port, probe
    annotations = daemon_pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in metrics_routes()
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]


def test_the_service_monitor_scrapes_the_daemons_metrics_port():
    service, monitor = manifest("Service"), manifest("ServiceMonitor")
    pod_labels = daemon_pod()["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in daemon_container()["ports"]}
    endpoint, = monitor["spec"]["endpoints"]
    port, = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert ports[port["targetPort"]] == daemon_config().metrics_port
    assert endpoint["path"] in metrics_routes()


def test_the_example_job_reaches_the_daemons_socket_and_trusts_its_user():
    config = daemon_config()
    pod = manifest("Job")["spec"]["template"]["spec"]
    container, = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["IGTCACHE_SOCKET"] == config.socket
    assert env["IGTCACHE_JOB"], "without it every pod's job is its pid, 1 in most containers"
    assert int(env["IGTCACHE_DAEMON_UID"]) == daemon_pod()["spec"]["securityContext"]["runAsUser"]
    assert int(config.socket_group) in pod["securityContext"]["supplementalGroups"]
    mount, = container["volumeMounts"]
    assert mount["mountPath"] == os.path.dirname(config.socket)
    volume, = pod["volumes"]
    daemon_volume = _mounted_volume(daemon_container(), os.path.dirname(config.socket))
    assert volume["hostPath"]["path"] == daemon_volume["hostPath"]["path"]


# ---------------------------------------------------------------------- systemd


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as ``section -> key -> values``, continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def sysusers() -> tuple[list[str], set[str]]:
    """The users and groups deploy/systemd/igtcache.sysusers.conf makes (a user comes with its group)."""
    users, groups = [], set()
    for line in (SYSTEMD / "igtcache.sysusers.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, name = shlex.split(line)[:2]
            if kind == "u":
                users.append(name)
            groups.add(name)
    return users, groups


def unit_config(service: dict[str, list[str]]) -> DaemonConfig:
    exec_start, = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "igtcache"
    args = argv[1:]
    group = args[args.index("--socket-group") + 1]
    assert group in sysusers()[1], "the socket's group is made by the sysusers file"
    args[args.index("--socket-group") + 1] = str(os.getgid())  # that group exists where it is installed, not here
    return serve_config(args, "the systemd unit's ExecStart")


def test_the_systemd_unit_runs_serve_with_options_it_has_in_directories_systemd_makes():
    service = unit(SYSTEMD / "igtcache.service")["Service"]
    config = unit_config(service)
    assert os.path.dirname(config.socket) == "/run/" + service["RuntimeDirectory"][0]
    assert int(service["RuntimeDirectoryMode"][0], 8) & 0o022 == 0, "the daemon refuses a socket dir others can write"
    assert config.cache_dir == "/var/cache/" + service["CacheDirectory"][0]
    assert service["User"] == service["Group"] == sysusers()[0]
    assert float(service["TimeoutStopSec"][0]) > config.grace
    client = dict(re.findall(r"^export (\w+)=(\S+)$", (SYSTEMD / "igtcache-client.sh").read_text(), re.MULTILINE))
    assert client == {"IGTCACHE_SOCKET": config.socket, "IGTCACHE_DAEMON_UID": service["User"][0]}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_finds_nothing_wrong_with_the_unit(tmp_path):
    installed = Path(sys.executable).parent / "igtcache"
    text = (SYSTEMD / "igtcache.service").read_text().replace("/opt/igtcache/bin/igtcache", str(installed))
    (tmp_path / "igtcache.service").write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "igtcache.service")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_systemd_sysusers_makes_the_daemons_user_and_group(tmp_path):
    (tmp_path / "etc").mkdir()
    result = subprocess.run(["systemd-sysusers", "--dry-run", "--root", str(tmp_path),
                             str(SYSTEMD / "igtcache.sysusers.conf")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    user, = sysusers()[0]
    assert f"Creating user '{user}'" in result.stderr and f"Creating group '{user}'" in result.stderr, result.stderr


# ---------------------------------------------------------------------- a live daemon


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A daemon with --metrics-port that has served reads of a job (hits and misses), a prefetch
    and a failed read, so that every series it can export without a cluster tier is there."""
    work = tmp_path_factory.mktemp("deploy")
    remote = work / "remote"
    remote.mkdir()
    for i in range(4):
        (remote / f"shard-{i}.bin").write_bytes(os.urandom(300_000))
    port = free_port()
    args = ["--remote", f"data=file://{remote}", "--cache-dir", str(work / "cache"), "--memory", "8MiB",
            "--disk", "16MiB", "--block-size", "64KiB", "--metrics-port", str(port)]
    with DaemonProcess(work / "run" / "d.sock", args) as daemon:
        with DaemonClient(daemon.socket_path, job="trainer-1") as client:  # closed: its hits are reported
            for _epoch in range(3):  # enough visits for the engine to report its access streams
                for i in range(4):
                    for offset in range(0, 300_000, 64 * 1024):
                        client.read(f"shard-{i}.bin", offset, 64 * 1024)
            client.prefetch("shard-0.bin")
            with pytest.raises(FileNotFoundError):
                client.read("missing.bin", 0, 10)
        daemon.metrics_port = port
        yield daemon


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    exprs = []
    for panel in dashboard()["panels"]:
        exprs += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def test_the_dashboard_is_a_grafana_dashboard_over_a_prometheus_variable():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 30
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {"datasource", "instance", "remote"} <= {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        assert panel["type"] == "row" or panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_every_metric_the_dashboard_queries_is_exported_by_a_live_daemon(live):
    status, text = scrape(live.metrics_port)
    assert status == 200
    exported = exported_metrics(text)
    assert len(queried_metrics(dashboard_expressions())) >= 30
    assert unknown_metrics(dashboard_expressions(), exported) == []
    for expr in dashboard_expressions():
        assert unknown_labels(expr, exported) == [], expr


def test_the_probe_paths_of_every_recipe_answer_on_a_live_daemons_metrics_port(live):
    healthcheck, = instruction("HEALTHCHECK")
    paths = {daemon_container()[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe")}
    paths |= {re.search(r"http://[\d.]+:\d+(/\w*)", healthcheck).group(1),
              daemon_pod()["metadata"]["annotations"]["prometheus.io/path"]}
    for path in paths:
        status, _body = scrape(live.metrics_port, path)
        assert status == 200, path
