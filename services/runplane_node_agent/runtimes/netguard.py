"""What a worker container may reach on the network (iptables, as the Docker engine uses).

Worker containers sit on the node's own bridge. Two chains, named after the bridge:
- `<chain>` hooked into INPUT for packets from the bridge: containers reach this host only
  at the agent's worker API (and replies to connections the host opened); every other port
  of the host, NATS and the gateway included, is refused, whatever address it listens on.
- `<chain>-N` hooked into DOCKER-USER (FORWARD): connections to the NATS servers of
  RP_NATS_URL when they run elsewhere are refused; the rest of the network stays open
  (workers download models).
Installing is idempotent (the chains are flushed and refilled, the hooks added once), so a
restarted agent leaves one copy of each rule.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


class GuardError(Exception):
    """The rules could not be installed (no iptables, no permission)."""


@dataclass(frozen=True)
class Guard:
    bridge: str  # the bridge interface of the workers' network
    chain: str  # at most 25 characters (iptables allows 28; "-N" is appended)
    gateway: str  # this host's address on the bridge
    agent_port: int
    nats_urls: tuple[str, ...]

    async def install(self) -> None:
        fwd = self.chain + "-N"
        await _ensure_chain(self.chain)
        await _ensure_chain(fwd)
        await _iptables("-F", self.chain)
        await _iptables("-A", self.chain, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                        "-j", "RETURN")
        await _iptables("-A", self.chain, "-d", self.gateway, "-p", "tcp", "--dport", str(self.agent_port),
                        "-j", "RETURN")
        await _iptables("-A", self.chain, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")
        await _iptables("-A", self.chain, "-j", "REJECT")
        await _iptables("-F", fwd)
        for address, port in await _nats_addresses(self.nats_urls):
            await _iptables("-A", fwd, "-d", address, "-p", "tcp", "--dport", str(port),
                            "-j", "REJECT", "--reject-with", "tcp-reset")
        await _hook("INPUT", "-i", self.bridge, "-j", self.chain)
        forward = "DOCKER-USER" if await _has_chain("DOCKER-USER") else "FORWARD"
        await _hook(forward, "-i", self.bridge, "-j", fwd)

    async def remove(self) -> None:
        """Undo `install` (the node's last worker is gone and the agent stops cleanly)."""
        fwd = self.chain + "-N"
        for parent, target in (("INPUT", self.chain), ("DOCKER-USER", fwd), ("FORWARD", fwd)):
            while await _run("-C", parent, "-i", self.bridge, "-j", target) == 0:
                await _iptables("-D", parent, "-i", self.bridge, "-j", target)
        for chain in (self.chain, fwd):
            if await _has_chain(chain):
                await _iptables("-F", chain)
                await _iptables("-X", chain)


async def _nats_addresses(urls: tuple[str, ...]) -> list[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for url in urls:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if not parts.hostname:
            continue
        port = parts.port or 4222
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, family=socket.AF_INET,
                                                                   type=socket.SOCK_STREAM)
        except OSError:
            continue
        for info in infos:
            address = str(info[4][0])
            if not ipaddress.ip_address(address).is_loopback:  # loopback: the INPUT chain covers it
                found.add((address, port))
    return sorted(found)


async def _hook(parent: str, *rule: str) -> None:
    if await _run("-C", parent, *rule) != 0:
        await _iptables("-I", parent, "1", *rule)


async def _has_chain(chain: str) -> bool:
    return await _run("-n", "-L", chain) == 0


async def _ensure_chain(chain: str) -> None:
    if not await _has_chain(chain):
        await _iptables("-N", chain)


async def _iptables(*args: str) -> None:
    code, err = await _call(*args)
    if code != 0:
        raise GuardError(f"iptables {' '.join(args)}: {err or f'exit code {code}'}")


async def _run(*args: str) -> int:
    return (await _call(*args))[0]


async def _call(*args: str) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            "iptables", "-w", "5", *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise GuardError(f"cannot run iptables: {exc}") from exc
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace").strip()
