"""Flash boot: workers paused while idle, the node's pool of parked workers, snapshots."""
