"""Test helpers: a real nats-server, free ports, polling waits, service processes."""
