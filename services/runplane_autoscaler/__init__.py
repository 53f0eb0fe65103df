"""The autoscaler: per endpoint, sample the load, decide the desired worker count, publish it."""
