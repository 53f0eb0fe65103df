"""`runplane`: the command line for a Runplane install, over the gateway's HTTP API only."""
