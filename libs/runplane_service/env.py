"""Read RP_* environment variables once, with a clear error for a bad value."""

from __future__ import annotations

import os


class SettingsError(ValueError):
    pass


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_opt(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def bus_settings(service: str):
    """The NATS connection settings every service reads the same way."""
    from runplane_bus import BusSettings

    user = env_opt("RP_NATS_USER")
    return BusSettings(
        url=env_str("RP_NATS_URL", "nats://127.0.0.1:4222"),
        name=f"{service}-{os.getpid()}",
        replicas=env_int("RP_NATS_REPLICAS", 1),
        user_credentials=env_opt("RP_NATS_CREDS"),
        user=user,
        password=_secret("RP_NATS_PASSWORD"),
        token=_secret("RP_NATS_TOKEN"),
        # A user's replies arrive under its own prefix, the only inboxes it may read.
        inbox_prefix=env_str("RP_NATS_INBOX_PREFIX", f"_INBOX.{user}" if user else "_INBOX"),
        dead_letter_retention_s=_dead_letter_retention_s(),
    )


def _dead_letter_retention_s() -> float:
    """RP_DEAD_LETTER_RETENTION_S, read by every service that may write a dead letter."""
    value = env_float("RP_DEAD_LETTER_RETENTION_S", 7 * 86_400.0)
    if not 1 <= value <= 365 * 86_400:
        raise SettingsError(f"RP_DEAD_LETTER_RETENTION_S must be 1 s to 365 days, got {value}")
    return value


def _secret(name: str) -> str | None:
    """`NAME`, else the content of the file named by `NAME_FILE` (a mounted secret)."""
    value = env_opt(name)
    path = env_opt(f"{name}_FILE")
    if value is not None or path is None:
        return value
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise SettingsError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
