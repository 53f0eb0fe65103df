__version__ = "runplane-worker/0.1.0"
