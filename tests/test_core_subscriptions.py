"""The collector subscribes when the broker lost its session or topics changed."""

from __future__ import annotations

import pytest

from common.topics import Topics
from core.datastore import open_datastore
from core.subscriptions import Subscriptions, wanted_topics

TOPICS = Topics("spoolmq")


@pytest.fixture
def store(tmp_path):
    opened = open_datastore(f"sqlite:///{tmp_path}/core.db")
    yield opened
    opened.close()


def test_a_share_group_shares_data_and_skipped_but_not_status():
    assert wanted_topics(TOPICS, "g") == [
        "$share/g/spoolmq/+/data/+",
        "$share/g/spoolmq/+/skipped",
        "spoolmq/+/status",
    ]


def test_a_new_session_subscribes_to_everything_even_if_granted_before(store):
    subs = Subscriptions(store, "core-1", wanted_topics(TOPICS, None))
    subs.save_granted()

    plan = subs.plan(session_present=False)

    assert plan.subscribe == subs.wanted and plan.unsubscribe == []


def test_a_kept_session_with_the_same_topics_sends_nothing(store):
    subs = Subscriptions(store, "core-1", wanted_topics(TOPICS, None))
    subs.save_granted()

    assert subs.plan(session_present=True).empty


def test_a_kept_session_with_changed_topics_moves_the_subscriptions(store):
    Subscriptions(store, "core-1", wanted_topics(TOPICS, None)).save_granted()
    subs = Subscriptions(store, "core-1", wanted_topics(TOPICS, "g"))

    plan = subs.plan(session_present=True)

    assert plan.subscribe == wanted_topics(TOPICS, "g")
    assert plan.unsubscribe == ["spoolmq/+/data/+", "spoolmq/+/skipped"]


def test_a_kept_session_never_granted_here_subscribes(store):
    subs = Subscriptions(store, "core-2", wanted_topics(TOPICS, None))
    Subscriptions(store, "core-1", wanted_topics(TOPICS, None)).save_granted()

    assert subs.plan(session_present=True).subscribe == subs.wanted
