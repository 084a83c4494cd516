"""A small internet of the test's own, built with network namespaces, veth pairs and nftables.

- The public segment: a bridge in a namespace of its own; public hosts (a bootstrap peer, a client)
  each sit in a namespace with one address on it.
- Home networks: a router namespace with one leg on the public segment and one on a private LAN, which
  masquerades (source NAT) what leaves the LAN and lets nothing in that the LAN did not start, as a
  home router without port forwarding does; the home host sits behind it.

Every name carries a per-run tag, every address lies inside these namespaces (nothing routes out of
them), and `close()` deletes them all. Needs root and Debian's `iproute2` and `nftables`.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import subprocess
from collections.abc import Sequence

PUBLIC_SUBNET = "10.231.0"  # the test's "internet": /24, hosts from .1 up
HOME_SUBNET = "192.168.{index}"  # each home LAN: router .1, host .2

NAT_RULES = """
table ip swarm_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{lan}" oifname "{wan}" accept
    }}
}}
"""


class NetworkSetupError(RuntimeError):
    """The namespaces could not be built (no root, no `ip` or `nft`)."""


def _run(*argv: str, stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetworkSetupError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")


@dataclasses.dataclass(frozen=True)
class Host:
    """A namespace with one address: run commands there with `host.command(argv)`."""

    namespace: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]


class PrivateInternet:
    """Public hosts and hosts behind NAT; use as a context manager (always torn down)."""

    def __init__(self) -> None:
        missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
        if missing:
            raise NetworkSetupError(f"missing {', '.join(missing)} (Debian packages iproute2, nftables)")
        self.tag = secrets.token_hex(3)
        self._namespaces: list[str] = []
        self._public_hosts = 0
        self._homes = 0
        self._links = 0
        try:
            self.public_ns = self._namespace("inet")
            _run("ip", "-n", self.public_ns, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.public_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    # ----- building -----

    def _namespace(self, role: str) -> str:
        name = f"sw{self.tag}-{role}"
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _link(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair between two namespaces (made under temporary names: a root-namespace name may be taken)."""
        self._links += 1
        tmp_a, tmp_b = f"sw{self.tag}a{self._links}", f"sw{self.tag}b{self._links}"
        _run("ip", "link", "add", tmp_a, "netns", ns_a, "type", "veth", "peer", "name", tmp_b, "netns", ns_b)
        _run("ip", "-n", ns_a, "link", "set", tmp_a, "name", name_a)
        _run("ip", "-n", ns_b, "link", "set", tmp_b, "name", name_b)

    def _attach_public(self, namespace: str, interface: str) -> str:
        """Plug `interface` of `namespace` into the public bridge; returns its public address."""
        self._public_hosts += 1
        address = f"{PUBLIC_SUBNET}.{self._public_hosts}"
        port = f"p{self._public_hosts}"
        self._link(namespace, interface, self.public_ns, port)
        _run("ip", "-n", self.public_ns, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
        _run("ip", "-n", namespace, "link", "set", interface, "up")
        return address

    def public_host(self, name: str) -> Host:
        namespace = self._namespace(name)
        return Host(namespace, self._attach_public(namespace, "eth0"))

    def home_host(self, name: str) -> Host:
        """A host behind a NAT router of its own (a home network without port forwarding)."""
        self._homes += 1
        lan = HOME_SUBNET.format(index=self._homes)
        router = self._namespace(f"{name}-r")
        host = self._namespace(name)
        self._attach_public(router, "wan")
        self._link(router, "lan", host, "eth0")
        _run("ip", "-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan")
        _run("ip", "-n", router, "link", "set", "lan", "up")
        _run("ip", "-n", host, "addr", "add", f"{lan}.2/24", "dev", "eth0")
        _run("ip", "-n", host, "link", "set", "eth0", "up")
        _run("ip", "-n", host, "route", "add", "default", "via", f"{lan}.1")
        _run("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        _run("ip", "netns", "exec", router, "nft", "-f", "-", stdin=NAT_RULES.format(wan="wan", lan="lan"))
        return Host(host, f"{lan}.2")

    # ----- teardown -----

    def close(self) -> None:
        for namespace in reversed(self._namespaces):
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:  # a process the test failed to stop must not outlive its network
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self._namespaces.clear()

    def __enter__(self) -> PrivateInternet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
