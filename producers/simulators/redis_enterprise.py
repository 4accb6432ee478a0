"""A Redis Enterprise Software simulator: clusters whose REST API answers evolve per interval.

:meth:`RedisEnterpriseSimulator.documents` gives, per cluster, the JSON the four endpoints
(``/v1/nodes``, ``/v1/bdbs``, ``/v1/shards``, ``/v1/license``) would answer, in the
documented shapes; databases are created, resized and deleted as ticks go by. :meth:`tick`
turns them into records through the real :func:`~producers.redis_enterprise.parse_snapshot`
and :func:`~producers.redis_enterprise.build_records`. Output is fully determined by the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from producers.redis_enterprise import build_records, parse_snapshot

__all__ = ["RedisEnterpriseSimulator"]

_GB = 2**30


@dataclass
class _Cluster:
    name: str
    tenant: str
    nodes: list[dict[str, Any]]
    shards_limit: int
    dbs: list[dict[str, Any]] = field(default_factory=list)
    next_db: int = 1


@dataclass
class RedisEnterpriseSimulator:
    """Deterministic REST API answers and usage records for ``clusters`` clusters."""

    clusters: int = 2
    nodes_per_cluster: int = 3
    databases_per_cluster: int = 3
    interval_ms: int = 60_000
    seed: int = 42
    state: list[_Cluster] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        rng = self._rng = random.Random(self.seed)
        for c in range(self.clusters):
            nodes = [
                {"uid": n + 1, "addr": f"10.{c}.0.{n + 1}", "status": "active",
                 "total_memory": rng.choice([16, 32, 64]) * _GB, "cores": rng.choice([4, 8, 16]),
                 "software_version": "7.4.6-22", "shard_count": 0}
                for n in range(self.nodes_per_cluster)
            ]
            cluster = _Cluster(f"cluster-{c}.example.com", f"tenant-{c:03d}", nodes,
                               shards_limit=rng.choice([8, 16, 32]))
            for _ in range(self.databases_per_cluster):
                self._create_db(cluster)
            self.state.append(cluster)

    def _create_db(self, cluster: _Cluster) -> None:
        rng = self._rng
        uid = cluster.next_db
        cluster.next_db += 1
        cluster.dbs.append({
            "uid": uid, "name": f"db{uid}", "type": "redis", "status": "active",
            "memory_size": rng.choice([1, 2, 4, 8]) * _GB, "shards_count": rng.choice([1, 2]),
            "replication": rng.random() < 0.5, "port": 12000 + uid,
        })

    def _evolve(self) -> None:
        rng = self._rng
        for cluster in self.state:
            r = rng.random()
            if r < 0.05 and len(cluster.dbs) > 1:
                cluster.dbs.pop(rng.randrange(len(cluster.dbs)))
            elif r < 0.10:
                self._create_db(cluster)
            elif r < 0.25 and cluster.dbs:
                db = rng.choice(cluster.dbs)
                db["memory_size"] = rng.choice([1, 2, 4, 8, 16]) * _GB
                db["shards_count"] = rng.choice([1, 2, 3])

    def documents(self, cluster: int = 0) -> dict[str, Any]:
        """The four endpoints' JSON for one cluster, keyed by path."""
        c = self.state[cluster]
        shards: list[dict[str, Any]] = []
        for db in c.dbs:
            for copy, role in enumerate(("master", "slave")[: 2 if db["replication"] else 1]):
                for k in range(db["shards_count"]):
                    node = c.nodes[(len(shards) + copy) % len(c.nodes)]
                    shards.append({
                        "uid": str(len(shards) + 1), "bdb_uid": db["uid"], "node_uid": str(node["uid"]),
                        "role": role, "assigned_slots": f"{k}", "status": "active",
                        "detailed_status": "ok",
                    })
        nodes = [dict(n, shard_count=sum(1 for s in shards if s["node_uid"] == str(n["uid"])))
                 for n in c.nodes]
        ram_in_use = len(shards)
        return {
            "/v1/nodes": nodes,
            "/v1/bdbs": [dict(db) for db in c.dbs],
            "/v1/shards": shards,
            "/v1/license": {
                "license": "----- LICENSE START -----\nsimulated\n----- LICENSE END -----\n",
                "cluster_name": c.name, "expired": False, "owner": "Simulated Inc.",
                "activation_date": "2024-01-01T00:00:00Z", "expiration_date": "2030-01-01T00:00:00Z",
                "shards_limit": c.shards_limit, "ram_shards_limit": c.shards_limit,
                "ram_shards_in_use": ram_in_use, "flash_shards_limit": 0, "flash_shards_in_use": 0,
                "features": [],
            },
        }

    def tick(self, end_ms: int) -> list[dict[str, Any]]:
        """Every cluster's records for the interval ending at ``end_ms``."""
        self._evolve()
        out: list[dict[str, Any]] = []
        for i, c in enumerate(self.state):
            snap = parse_snapshot(self.documents(i))
            out += build_records(snap, cluster=c.name, tenant=c.tenant,
                                 start_ms=end_ms - self.interval_ms, end_ms=end_ms)
        return out

    def run(self, start_ms: int, ticks: int) -> Iterator[list[dict[str, Any]]]:
        """One batch of records per interval."""
        for i in range(ticks):
            yield self.tick(start_ms + (i + 1) * self.interval_ms)
