"""The rehearsal's cluster network: a network namespace per pod on one bridge, names in /etc/hosts."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ttt.errors import TTTError

BRIDGE = "ttt0"
NODE_IP = "10.244.0.1"
POD_NET = ipaddress.ip_network("10.244.1.0/24")
SERVICE_NET = ipaddress.ip_network("10.244.2.0/24")
DOMAIN = "cluster.local"
# Absolute paths: the node runs them as root.
IP = shutil.which("ip") or "/usr/sbin/ip"
MOUNT = shutil.which("mount") or "/usr/bin/mount"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"


class NetworkError(TTTError, RuntimeError):
    """The rehearsal cannot build its network (it needs root, `ip` and network namespaces)."""


def ip(*args: str, netns: str | None = None) -> None:
    """Run `ip ARGS` (in `netns` when given); a failure names the command."""
    cmd = [IP, *(["-n", netns] if netns else []), *args]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode:
        raise NetworkError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def service_names(name: str, namespace: str) -> list[str]:
    """The qualified names of a Service (a pod's resolv.conf search list, spelled out: /etc/hosts
    has none); the bare `name` resolves only in its own namespace (Node.name's `namespace`)."""
    return [f"{name}.{namespace}.svc.{DOMAIN}", f"{name}.{namespace}.svc", f"{name}.{namespace}"]


@dataclass
class Node:
    """The one node: the bridge every pod's veth joins; it holds the Services' addresses.

    Runs inside its own network namespace (the CLI re-executes itself under `unshare --net`),
    so the bridge has no way out: nothing in the rehearsal reaches the internet or the host."""

    tag: str = field(default_factory=lambda: f"r{os.getpid()}")
    _pods: dict[str, str] = field(default_factory=dict)  # pod key -> IP
    _services: dict[str, str] = field(default_factory=dict)  # "name.namespace" -> IP
    _names: list[tuple[str, str, str | None]] = field(default_factory=list)  # ip, name, ns
    _netns: list[str] = field(default_factory=list)
    _made: int = 0  # namespaces made so far: names and veths are never reused

    def up(self) -> None:
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{NODE_IP}/16", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        # ip netns exec bind-mounts /etc/netns/NAME/* over /etc/*: a pod's hosts file. A tmpfs
        # here (the rehearsal has its own mount namespace) leaves the host's /etc untouched.
        Path("/etc/netns").mkdir(exist_ok=True)
        subprocess.run([MOUNT, "-t", "tmpfs", "tmpfs", "/etc/netns"], check=True)

    def down(self) -> None:
        for name in self._netns:
            subprocess.run([IP, "netns", "delete", name], check=False, capture_output=True)
        self._netns.clear()

    def pod_ip(self, key: str) -> str:
        """The pod's address, the same for its life and its restarts (a StatefulSet's name)."""
        if key not in self._pods:
            self._pods[key] = str(POD_NET[len(self._pods) + 2])
        return self._pods[key]

    def service_ip(self, name: str, namespace: str) -> str:
        """A Service's address on the node (its ClusterIP, or the stand-in serving it)."""
        key = f"{name}.{namespace}"
        if key not in self._services:
            address = str(SERVICE_NET[len(self._services) + 2])
            ip("addr", "add", f"{address}/32", "dev", BRIDGE)
            self._services[key] = address
        return self._services[key]

    def name(self, address: str, names: list[str], namespace: str | None = None) -> None:
        """`names` resolve to `address` in every pod started from now on (only in pods of
        `namespace` when given: a Service's short name)."""
        self._names += [(address, n, namespace) for n in names]

    def hosts(self, namespace: str, hostname: str, own_ip: str) -> str:
        lines = ["127.0.0.1 localhost", f"{own_ip} {hostname}"]
        for address, name, only in self._names:
            if only is None or only == namespace:
                lines.append(f"{address} {name}")
        return "\n".join(lines) + "\n"

    def pod_netns(self, key: str, namespace: str, hostname: str) -> str:
        """A fresh network namespace for pod `key` (its veth on the bridge, its /etc/hosts)."""
        index = self._made
        self._made += 1
        name = f"{self.tag}-{index}"
        address = self.pod_ip(key)
        host_end, pod_end = f"vh{self.tag[-6:]}{index}"[-15:], f"vp{index}"
        ip("netns", "add", name)
        self._netns.append(name)
        ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        ip("link", "set", pod_end, "netns", name)
        ip("link", "set", host_end, "master", BRIDGE, "up")
        ip("link", "set", pod_end, "name", "eth0", netns=name)
        ip("addr", "add", f"{address}/16", "dev", "eth0", netns=name)
        ip("link", "set", "eth0", "up", netns=name)
        ip("link", "set", "lo", "up", netns=name)
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(self.hosts(namespace, hostname, address))
        # No DNS server: an unknown name fails at once instead of timing out.
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        (etc / "hostname").write_text(hostname + "\n")
        return name

    def drop_netns(self, name: str) -> None:
        if name in self._netns:
            subprocess.run([IP, "netns", "delete", name], check=False, capture_output=True)
            self._netns.remove(name)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


class ServiceProxy:
    """kube-proxy for one ClusterIP Service port: connections to address:port go to a ready
    endpoint (`endpoints()` gives (ip, port) pairs, ready pods only), round robin."""

    def __init__(self, address: str, port: int, endpoints: Callable[[], list[tuple[str, int]]]):
        self.endpoints = endpoints
        self._next = 0
        self.sock = socket.create_server((address, port), reuse_port=False)
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            ready = self.endpoints()
            if not ready:  # no ready endpoint: the connection is refused, as with kube-proxy
                client.close()
                continue
            target = ready[self._next % len(ready)]
            self._next += 1
            threading.Thread(target=self._pipe, args=(client, target), daemon=True).start()

    @staticmethod
    def _pipe(client: socket.socket, target: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)

        def copy(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=copy, args=(upstream, client), daemon=True).start()
        copy(client, upstream)
        client.close()
        upstream.close()
