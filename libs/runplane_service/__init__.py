"""What every service shares: settings from RP_* env, logs, metrics, clock, the lifecycle."""
