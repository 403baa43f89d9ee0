"""The topics the collector subscribes to, and when it must subscribe again.

A persistent session keeps subscriptions across reconnects, so the collector
subscribes only when the broker has no session for it or when the configured
topics differ from those last granted. The granted set is saved in the
datastore, per client id, once the broker's SUBACK accepted it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from common.topics import Topics
from core.datastore import Datastore

STATE_KEY = "subscriptions/{client_id}"


def wanted_topics(topics: Topics, share_group: str | None) -> list[str]:
    """Data and skipped shared within the group; status seen by every member."""

    def shared(topic: str) -> str:
        return f"$share/{share_group}/{topic}" if share_group else topic

    # Status stays unshared: it is retained liveness that every collector
    # may want, and a shared subscription is not sent retained messages.
    return [
        shared(topics.all_data()),
        shared(topics.all_skipped()),
        topics.all_status(),
    ]


@dataclass(frozen=True)
class Plan:
    """What to send the broker on one connect."""

    subscribe: list[str]
    unsubscribe: list[str]

    @property
    def empty(self) -> bool:
        return not self.subscribe and not self.unsubscribe


class Subscriptions:
    """The wanted topics and the set the datastore says was last granted."""

    def __init__(self, store: Datastore, client_id: str, wanted: list[str]):
        self.store = store
        self.key = STATE_KEY.format(client_id=client_id)
        self.wanted = wanted

    def plan(self, session_present: bool) -> Plan:
        """Everything when the session is new; otherwise only the changes."""
        if not session_present:
            return Plan(list(self.wanted), [])
        granted = self.granted()
        if granted == set(self.wanted):
            return Plan([], [])
        return Plan(list(self.wanted), sorted(granted - set(self.wanted)))

    def granted(self) -> set[str]:
        text = self.store.load_state(self.key)
        return set(json.loads(text)) if text else set()

    def save_granted(self) -> None:
        self.store.save_state(self.key, json.dumps(sorted(self.wanted)))
