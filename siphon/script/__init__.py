"""The operator-facing scripting API and the machinery that loads and runs scripts."""
