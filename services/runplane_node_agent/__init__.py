"""The node agent: runs workers, hands them jobs from JetStream, records results."""
