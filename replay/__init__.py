"""Replay tooling: point-in-time state, disaster-recovery copies, verification, snapshots.

``source`` reads a log read-only (embedded: own SQLite connection and a child-process
reader; Kafka: KafkaLog), ``state`` rebuilds the projections at a moment or follows one
AoR, ``copy`` copies a log into another resumably, ``verify`` checks a whole log,
``snapshot`` writes/validates projection snapshots (a node's warm boot), ``cli`` is
``siphon replay``. See the README's "Replay and disaster recovery".
"""
