"""The scheduler: places workers on nodes (pure `place()` + a thin loop) and runs the job janitor."""
