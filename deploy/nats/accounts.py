"""The NATS users of a Runplane install, each allowed only the subjects its service uses.

    .venv/bin/python deploy/nats/accounts.py            print the accounts config
    .venv/bin/python deploy/nats/accounts.py --write    rewrite deploy/nats/accounts.conf and the
                                                        copies in deploy/k8s/nats.yaml

Message subjects come from the bus contract (`runplane_proto.subjects.REGISTRY`: who
publishes and who subscribes each channel); the JetStream API subjects come from what each
service's calls send (`JETSTREAM` below: consumers, reads, purges), so a new channel in the
contract reaches the permissions by regenerating this file. Every user may create and read
the streams and buckets (each service makes the topology idempotently at start) but not
update, delete or purge them unless listed. A KV put is a publish on `$KV.<bucket>.<key>`:
only a bucket's publishers in the contract may write it (a node agent cannot write endpoint
specs). Replies arrive on `_INBOX.<user>.>` (the services set that prefix from
`RP_NATS_USER`), so no service reads another's replies. Passwords come from environment
variables of the nats-server process: `RP_NATS_<USER>_PASSWORD` (plain text or a bcrypt
hash), and `RP_NATS_ADMIN_PASSWORD` for `admin`, the operator's user with every permission.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "proto")]

from runplane_proto import subjects as s  # noqa: E402

ROLES = ("gateway", "scheduler", "autoscaler", "node-agent")
ACCOUNT = "RUNPLANE"
API = "$JS.API"

STREAMS = (s.STREAM_JOBS, s.STREAM_CHUNKS, s.STREAM_WEBHOOKS, s.STREAM_JOB_ENDS)
BUCKETS = (s.KV_JOBS, s.KV_ENDPOINTS, s.KV_NODES, s.KV_SCALE, s.KV_PLACEMENT, s.KV_LEASES, s.KV_CURSORS,
           s.KV_API_KEYS, s.KV_DEAD_LETTERS, s.KV_IDEMPOTENCY)


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


OBJ_STREAM = f"OBJ_{s.OBJ_PAYLOADS}"


def consume(stream: str) -> list[str]:
    """Use a durable or ephemeral consumer of `stream`: create, read, fetch, ack."""
    return [f"{API}.CONSUMER.CREATE.{stream}", f"{API}.CONSUMER.CREATE.{stream}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{stream}.*", f"{API}.CONSUMER.INFO.{stream}.*",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.ACK.{stream}.>"]


def read_messages(stream: str) -> list[str]:
    """Read single messages of `stream` by sequence or subject."""
    return [f"{API}.STREAM.MSG.GET.{stream}", f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>"]


def watch(stream: str) -> list[str]:
    """Ordered push consumers (KV watches and lists, object reads) and their flow control."""
    return [f"{API}.CONSUMER.CREATE.{stream}", f"{API}.CONSUMER.CREATE.{stream}.>",
            f"{API}.CONSUMER.DELETE.{stream}.*", f"{API}.CONSUMER.INFO.{stream}.*", f"$JS.FC.{stream}.>"]


def purge(stream: str) -> list[str]:
    return [f"{API}.STREAM.PURGE.{stream}"]


@dataclass(frozen=True)
class Grant:
    """JetStream API use of one service beyond its channels, and why."""

    publish: tuple[str, ...]
    why: str


# What each service's calls send besides the channels of the contract.
JETSTREAM: dict[str, tuple[Grant, ...]] = {
    "gateway": (
        Grant(tuple(consume(s.STREAM_JOBS)) + (f"{API}.CONSUMER.DELETE.{s.STREAM_JOBS}.*",),
              "creates (and widens) an endpoint's queue consumer, reads it for /health, deletes it "
              "with the endpoint"),
        Grant(tuple(consume(s.STREAM_WEBHOOKS)), "delivers webhooks from the durable `webhooks`"),
        Grant((f"{API}.CONSUMER.MSG.NEXT.{kv_stream(s.KV_JOBS)}.*",),
              "lists an endpoint's jobs page by page (a pull consumer of rp-jobs)"),
        Grant(tuple(read_messages(s.STREAM_CHUNKS)), "/stream reads a job's chunks by sequence"),
        Grant((f"{API}.STREAM.MSG.DELETE.{s.STREAM_JOBS}",),
              "takes back the queued message of a submit whose record could not be written"),
        Grant(tuple(read_messages(s.STREAM_JOBS) + read_messages(s.STREAM_JOB_ENDS)),
              "/status counts a queued job's place and the endpoint's recent ends, /health finds its "
              "oldest queued job (direct gets; no message is taken)"),
        Grant((f"{API}.CONSUMER.MSG.NEXT.{kv_stream(s.KV_DEAD_LETTERS)}.*",),
              "lists an endpoint's dead letters page by page (a pull consumer of rp-dead-letters)"),
        Grant(tuple(read_messages(OBJ_STREAM) + watch(OBJ_STREAM) + purge(OBJ_STREAM))
              + (f"$O.{s.OBJ_PAYLOADS}.>",), "saves inputs, reads outputs, deletes both"),
    ),
    "scheduler": (
        Grant(tuple(purge(kv_stream(s.KV_JOBS))), "the janitor drops deleted records' markers"),
        Grant((f"{API}.CONSUMER.MSG.NEXT.{kv_stream(s.KV_JOBS)}.*",),
              "the janitor reads the records page by page (a pull consumer of rp-jobs)"),
        Grant(tuple(purge(s.STREAM_CHUNKS)), "the janitor drops an expired job's chunks"),
        Grant(tuple(read_messages(OBJ_STREAM) + purge(OBJ_STREAM)) + (f"$O.{s.OBJ_PAYLOADS}.M.>",),
              "the janitor deletes an expired job's payloads"),
        Grant((f"$KV.{s.KV_NODES}.>",), "removes lost nodes from rp-nodes"),
    ),
    "autoscaler": (
        Grant(tuple(consume(s.STREAM_JOBS)[:5]) + (f"{API}.CONSUMER.LIST.{s.STREAM_JOBS}",),
              "reads every queue consumer (and widens an old one); never fetches or acks"),
        Grant(tuple(read_messages(s.STREAM_JOBS)), "the oldest queued message of an endpoint"),
    ),
    "node-agent": (
        Grant(tuple(consume(s.STREAM_JOBS)), "takes jobs from an endpoint's queue consumer"),
        Grant(tuple(read_messages(OBJ_STREAM) + watch(OBJ_STREAM) + purge(OBJ_STREAM))
              + (f"$O.{s.OBJ_PAYLOADS}.>",), "reads large inputs, saves large outputs"),
    ),
}

# Buckets outside the contract's channels: (bucket, writers, readers).
EXTRA_BUCKETS = (
    (s.KV_CURSORS, ("gateway",), ("gateway",)),
    # API key hashes: only the gateway may read or write them.
    (s.KV_API_KEYS, ("gateway",), ("gateway",)),
)


@dataclass
class Permissions:
    publish: set[str] = field(default_factory=set)
    subscribe: set[str] = field(default_factory=set)
    allow_responses: bool = False


def role_names(entries: tuple[str, ...] | str) -> set[str]:
    """`("node-agent", "autoscaler (consumer and stream info only)")` → {"node-agent", "autoscaler"}."""
    text = entries if isinstance(entries, str) else " ".join(entries)
    return {name for name in re.findall(r"[a-z][a-z-]*", text) if name in ROLES}


def channel_subject(pattern: str) -> str:
    """`rp.jobs.<endpoint>.low` → `rp.jobs.*.low`."""
    return re.sub(r"<[^>]+>", "*", pattern)


def kv_bucket(pattern: str) -> str:
    """`KV rp-jobs: <endpoint>.<job>` → `rp-jobs`."""
    m = re.fullmatch(r"KV (\S+): .*", pattern)
    if not m:
        raise ValueError(f"unexpected KV channel pattern {pattern!r}")
    return m.group(1)


def kv_read(bucket: str) -> list[str]:
    stream = kv_stream(bucket)
    return read_messages(stream) + watch(stream)


def permissions() -> dict[str, Permissions]:
    perms = {role: Permissions() for role in ROLES}
    for role, p in perms.items():
        user_inbox = f"_INBOX.{role}.>"
        p.subscribe.add(user_inbox)
        # The topology: every service creates what is missing and reads it (never updates it).
        for stream in (*STREAMS, *(kv_stream(b) for b in BUCKETS), OBJ_STREAM):
            p.publish |= {f"{API}.STREAM.CREATE.{stream}", f"{API}.STREAM.INFO.{stream}"}
        # Account info, and stream names: an object read looks its stream up by subject.
        p.publish |= {f"{API}.INFO", f"{API}.STREAM.NAMES"}
        for grant in JETSTREAM[role]:
            p.publish |= set(grant.publish)

    for channel in s.REGISTRY:
        publishers = role_names(channel.publishers)
        subscribers = role_names(channel.subscribers)
        if channel.kind == "kv":
            bucket = kv_bucket(channel.pattern)
            for role in publishers:
                perms[role].publish.add(f"$KV.{bucket}.>")
            for role in publishers | subscribers:  # a writer reads before it compares-and-sets
                perms[role].publish |= set(kv_read(bucket))
            continue
        subject = channel_subject(channel.pattern)
        for role in publishers:
            perms[role].publish.add(subject)
        if channel.kind.startswith("jetstream"):
            continue  # read through consumers (JETSTREAM above), never a core subscription
        for role in subscribers:
            perms[role].subscribe.add(subject)
            if channel.kind == "request/reply":
                perms[role].allow_responses = True
    for bucket, writers, readers in EXTRA_BUCKETS:
        for role in writers:
            perms[role].publish.add(f"$KV.{bucket}.>")
        for role in (*writers, *readers):
            perms[role].publish |= set(kv_read(bucket))
    return perms


def password_variable(user: str) -> str:
    return "RP_NATS_" + user.upper().replace("-", "_") + "_PASSWORD"


def render() -> str:
    def subject_list(subjects: set[str], indent: str) -> str:
        return "\n".join(f'{indent}"{subject}"' for subject in sorted(subjects))

    users = []
    for role, p in permissions().items():
        responses = "\n          allow_responses: true" if p.allow_responses else ""
        users.append(
            f"      {{\n"
            f"        user: {role}\n"
            f"        password: ${password_variable(role)}\n"
            f"        permissions: {{\n"
            f"          publish: {{ allow: [\n{subject_list(p.publish, '            ')}\n          ] }}\n"
            f"          subscribe: {{ allow: [\n{subject_list(p.subscribe, '            ')}\n          ] }}"
            f"{responses}\n"
            f"        }}\n"
            f"      }}")
    users.append(f"      # The operator's user (nats CLI, backups): everything in the account.\n"
                 f"      {{ user: admin, password: ${password_variable('admin')} }}")
    body = "\n".join(users)
    return (
        "# Generated by deploy/nats/accounts.py from the bus contract: do not edit by hand.\n"
        "# Each service's user may publish and subscribe only what the service uses; passwords\n"
        "# come from the server's environment (RP_NATS_<USER>_PASSWORD, plain or bcrypt).\n"
        f"accounts {{\n  {ACCOUNT} {{\n    jetstream: enabled\n    users: [\n{body}\n    ]\n  }}\n}}\n"
    )


ACCOUNTS_CONF = ROOT / "deploy" / "nats" / "accounts.conf"
K8S_NATS = ROOT / "deploy" / "k8s" / "nats.yaml"
# deploy/nats files copied into the ConfigMap of K8S_NATS, each between two marker lines.
K8S_COPIES = ("cluster.conf", "accounts.conf")


def k8s_manifest(current: str, files: dict[str, str]) -> str:
    """The k8s NATS manifest with its ConfigMap's copies of `files` (name → text) replaced."""
    for name, text in files.items():
        begin, end = f"    # --- {name} (generated) ---\n", f"    # --- end of {name} ---\n"
        head, sep, rest = current.partition(begin)
        _, sep2, tail = rest.partition(end)
        if not sep or not sep2:
            raise ValueError(f"{K8S_NATS} lacks the markers of {name}")
        block = "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())
        current = head + begin + block + end + tail
    return current


def k8s_files(accounts: str) -> dict[str, str]:
    files = {name: (ROOT / "deploy" / "nats" / name).read_text() for name in K8S_COPIES}
    files["accounts.conf"] = accounts
    return files


def main(argv: list[str]) -> None:
    text = render()
    if argv[1:] == ["--write"]:
        ACCOUNTS_CONF.write_text(text)
        K8S_NATS.write_text(k8s_manifest(K8S_NATS.read_text(), k8s_files(text)))
        print(f"wrote {ACCOUNTS_CONF.relative_to(ROOT)} and {K8S_NATS.relative_to(ROOT)}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv)
