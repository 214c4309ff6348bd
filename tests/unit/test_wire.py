"""mailwire's admin models as the readers see them: snake_case written, the camelCase keys of earlier
nodes still read (an operator upgraded before its nodes), unknown keys ignored, and POST /restore's `as`."""

from __future__ import annotations

import pydantic
import pytest

from mailwire import admin

POINT = "2026-11-27T07:00:00.123456+00:00"


def test_answers_are_written_in_snake_case() -> None:
    taken = admin.Checkpoint(point_in_time=POINT, hold_until=POINT, mailboxes=1, messages=2, queued=0)
    assert taken.to_json() == {
        "point_in_time": POINT,
        "hold_until": POINT,
        "mailboxes": 1,
        "messages": 2,
        "queued": 0,
    }
    assert admin.Resumed(paused_seconds=0.5).to_json() == {"paused_seconds": 0.5}


def test_the_camel_case_keys_of_earlier_nodes_are_still_read() -> None:
    taken = admin.Checkpoint.model_validate(
        {"pointInTime": POINT, "holdUntil": POINT, "mailboxes": 1, "messages": 2, "queued": 0}
    )
    assert (taken.point_in_time, taken.hold_until) == (POINT, POINT)
    assert admin.Resumed.model_validate({"pausedSeconds": 0.42}).paused_seconds == 0.42
    record = admin.Archive.model_validate({"name": "b", "state": "Completed", "path": "/b.tar", "pointInTime": POINT})
    assert record.point_in_time == POINT


def test_unknown_keys_in_an_answer_are_ignored_and_bad_values_refused() -> None:
    assert admin.MailboxUsage.model_validate({"bytes": 1, "messages": 1, "later": True}).bytes == 1
    with pytest.raises(pydantic.ValidationError):
        admin.Archive.model_validate({"name": "b", "state": "Lost", "path": "/b.tar"})
    with pytest.raises(pydantic.ValidationError):
        admin.Checkpoint.model_validate(
            {"point_in_time": "yesterday", "hold_until": POINT, "mailboxes": 1, "messages": 2, "queued": 0}
        )


def test_a_restore_request_says_as() -> None:
    request = admin.RestoreRequest(archive="/a.tar", mailbox="a@example.com", as_="b@example.com")
    assert request.to_json() == {"archive": "/a.tar", "mailbox": "a@example.com", "as": "b@example.com"}
    assert admin.RestoreRequest.model_validate(request.to_json()).target == "b@example.com"
    assert admin.RestoreRequest.model_validate({"archive": "/a.tar", "mailbox": "a@example.com"}).target == (
        "a@example.com"
    )
    with pytest.raises(pydantic.ValidationError) as refused:
        admin.RestoreRequest.model_validate({"mailbox": "a@example.com"})
    assert admin.problem(refused.value) == "'archive' must be a non-empty string"
