"""Stateful proxy core (RFC 3261 §16): routing rules, response contexts, forwarding."""
