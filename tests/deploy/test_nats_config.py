"""deploy/nats/accounts.py, without a server: the committed accounts.conf is what the bus
contract gives today, and the permissions follow the contract's publishers and subscribers."""

from __future__ import annotations

import importlib.util
import sys

from runplane_proto import subjects as s
from runplane_testing.natscluster import NATS_DIR, ROLES


def generator():
    spec = importlib.util.spec_from_file_location("rp_nats_accounts", NATS_DIR / "accounts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_committed_accounts_config_is_current():
    assert (NATS_DIR / "accounts.conf").read_text() == generator().render(), \
        "the bus contract changed: run .venv/bin/python deploy/nats/accounts.py --write"


def test_permissions_follow_the_contract():
    gen = generator()
    perms = gen.permissions()
    assert set(perms) == set(ROLES)
    for channel in s.REGISTRY:
        publishers, subscribers = gen.role_names(channel.publishers), gen.role_names(channel.subscribers)
        # A stream's republish is published by the server itself: no service may forge it.
        assert bool(publishers) != channel.kind.startswith("republish"), f"publishers of {channel.name}"
        for role in ROLES:
            if channel.kind == "kv":
                writes = f"$KV.{gen.kv_bucket(channel.pattern)}.>" in perms[role].publish
                # The scheduler also deletes lost nodes from rp-nodes (JETSTREAM grants).
                extra = role == "scheduler" and channel.pattern.startswith(f"KV {s.KV_NODES}:")
                assert writes == (role in publishers or extra), (channel.name, role)
            else:
                subject = gen.channel_subject(channel.pattern)
                assert (subject in perms[role].publish) == (role in publishers), (channel.name, role)
                if not channel.kind.startswith("jetstream"):
                    assert (subject in perms[role].subscribe) == (role in subscribers), (channel.name, role)


def test_nobody_reads_another_services_replies_or_changes_the_topology():
    perms = generator().permissions()
    for role, p in perms.items():
        inboxes = {x for x in p.subscribe if x.startswith("_INBOX")}
        assert inboxes == {f"_INBOX.{role}.>"}, role
        assert not any(x.startswith(("$JS.API.STREAM.UPDATE", "$JS.API.STREAM.DELETE", ">")) for x in p.publish)
    assert f"$KV.{s.KV_ENDPOINTS}.>" not in perms["node-agent"].publish
    assert f"$KV.{s.KV_ENDPOINTS}.>" in perms["gateway"].publish
    assert perms["node-agent"].allow_responses and not perms["gateway"].allow_responses
