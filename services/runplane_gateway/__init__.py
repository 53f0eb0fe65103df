"""The gateway: RunPod's client API (/v2), the management API (/v1), auth, limits, webhooks."""
