"""Test "nodes" on one machine: Linux network + UTS + PID namespaces joined by a bridge.

Each node gets its own network namespace (own loopback, one veth `eth0` on 10.77.0.0/24; each
cluster has its own bridge, so clusters of concurrent runs never meet), its own hostname (`unshare --uts`), an /etc/hosts of its own (`ip netns exec`
bind-mounts /etc/netns/NAME/hosts over /etc/hosts) and, for every command, its own PID namespace,
so that SIGKILL of the command's first process kills every process of that node at once, as a
node loss does. The bridge lives in a namespace of its own too: nothing is added to the host's
network and no address outside the namespaces made here is ever used.

Needs root (`ip netns add`). `Cluster.close()` removes everything, also after a failed test.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_ETC = Path("/etc/netns")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")


def _existing() -> set[str]:
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}


@dataclass
class Node:
    """One namespace "node": its netns name, hostname and address on the bridge."""

    netns: str
    hostname: str
    addr: str

    def argv(self, cmd: list[str], env: dict[str, str] | None = None) -> list[str]:
        """The command line that runs `cmd` on this node (own hostname, own PID namespace)."""
        envs = [f"{k}={v}" for k, v in (env or {}).items()]
        # --kill-child: if unshare itself is killed, the kernel kills the node's first process,
        # and with it (PID namespace init) every process of the node.
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--pid", "--fork",
                "--kill-child", "sh", "-c", 'hostname "$0" && exec env "$@"', self.hostname,
                *envs, *cmd]

    def popen(self, cmd: list[str], *, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd, env), start_new_session=True, **kw)

    def run(self, cmd: list[str], *, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, timeout=timeout, **kw)


@dataclass
class Cluster:
    """N nodes on one bridge. Use as a context manager, or call close()."""

    n: int
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000:04d}")
    nodes: list[Node] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"nd{self.tag}-sw"

    def hosts_file(self, node: Node, *, self_loopback: bool = False) -> str:
        """/etc/hosts for `node`: every node's name → address; with self_loopback its own name
        maps to 127.0.1.1 instead, as Debian's installer writes it."""
        lines = ["127.0.0.1 localhost"]
        for other in self.nodes:
            if other is node and self_loopback:
                lines.insert(1, f"127.0.1.1 {other.hostname}")
            else:
                lines.append(f"{other.addr} {other.hostname}")
        return "\n".join(lines) + "\n"

    def write_hosts(self, node: Node, *, self_loopback: bool = False) -> None:
        d = NETNS_ETC / node.netns
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts").write_text(self.hosts_file(node, self_loopback=self_loopback))

    def open(self) -> "Cluster":
        if self.switch in _existing():
            raise RuntimeError(f"network namespace {self.switch} exists (a previous run's?): "
                               f"`ip netns del {self.switch}`")
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.n):
            node = Node(f"nd{self.tag}-n{i}", f"node{i}-{self.tag}", f"10.77.0.{i + 1}")
            _ip("netns", "add", node.netns)
            self._made.append(node.netns)
            _ip("-n", self.switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                "netns", node.netns)
            _ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _ip("-n", node.netns, "link", "set", "eth0", "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
            self.nodes.append(node)
        for node in self.nodes:
            self.write_hosts(node)
        return self

    def close(self) -> None:
        """Kill whatever still runs in the nodes, delete the namespaces and their /etc/netns."""
        for name in reversed(self._made):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            for pid in map(int, pids.stdout.split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                _ip("netns", "del", name)
            except RuntimeError as e:
                log.warning("%s", e)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        self._made.clear()

    def __enter__(self) -> "Cluster":
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
