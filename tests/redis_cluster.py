"""A real local Redis Cluster for tests: three masters of the embedded redis-server binary on loopback."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from app.redis_server import EmbeddedRedis

SLOTS = 16384
BUS_PORT_OFFSET = 10000  # Redis < 7 has no cluster-port setting: the bus is always port + 10000


class ClusterError(RuntimeError):
    """The local cluster could not be started or did not converge; the message names the ports and dirs."""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A loopback port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + BUS_PORT_OFFSET <= 65535 and port not in taken and _port_is_free(port + BUS_PORT_OFFSET):
            return port
    raise ClusterError("no free loopback port pair (port, port + 10000) found for a cluster node")


def slot_ranges(masters: int) -> list[range]:
    """The 16384 hash slots in contiguous ranges, one per master (as redis-cli --cluster create does)."""
    step = SLOTS // masters
    bounds = [i * step for i in range(masters)] + [SLOTS]
    return [range(bounds[i], bounds[i + 1]) for i in range(masters)]


@dataclass
class LocalRedisCluster:
    """N cluster-enabled redis-server processes in separate dirs under base_dir, joined into one cluster."""

    base_dir: Path
    masters: int = 3
    nodes: list[EmbeddedRedis] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """The service's URL for this cluster: any one node is enough for redis-py to discover the rest."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 20.0) -> LocalRedisCluster:
        try:
            self._start_nodes()
            self._join()
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self) -> None:
        taken: set[int] = set()
        for i in range(self.masters):
            port = free_cluster_port(taken)
            taken |= {port, port + BUS_PORT_OFFSET}
            node = EmbeddedRedis(
                self.base_dir / f"node-{i}",
                port=port,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-require-full-coverage",
                    "yes",
                ],
            )
            self.nodes.append(node.start())

    def _clients(self) -> list[redis.Redis]:
        return [redis.Redis(host="127.0.0.1", port=p, socket_timeout=2) for p in self.ports]

    def _join(self) -> None:
        """Assign slot ranges, give each node its own config epoch, then introduce every node to the first."""
        clients = self._clients()
        try:
            for epoch, (client, slots) in enumerate(
                zip(clients, slot_ranges(self.masters), strict=True), start=1
            ):
                client.execute_command("CLUSTER ADDSLOTS", *slots)
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)
            for port in self.ports[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        finally:
            for client in clients:
                client.close()

    def _wait_ok(self, timeout: float) -> None:
        """Until every node reports cluster_state:ok, all slots assigned and every master known."""
        deadline = time.monotonic() + timeout
        clients = self._clients()
        infos: list[dict[str, object]] = []
        try:
            while time.monotonic() < deadline:
                infos = [client.cluster("INFO") for client in clients]
                if all(
                    info.get("cluster_state") == "ok"
                    and int(str(info.get("cluster_slots_ok"))) == SLOTS
                    and int(str(info.get("cluster_known_nodes"))) == self.masters
                    for info in infos
                ):
                    return
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
        raise ClusterError(f"cluster on ports {self.ports} not ok after {timeout}s: {infos}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []
