"""Runplane's benchmark suite: `./scripts/bench [NAME...]`."""
