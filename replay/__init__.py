"""Replay, snapshots, warm boot and disaster-recovery tooling (see issue 6)."""
