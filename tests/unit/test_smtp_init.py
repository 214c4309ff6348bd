"""MailSMTP builds its per-connection state without aiosmtpd's introspection (see its __init__). This
checks it ends up with what aiosmtpd's own __init__ would have made, so an aiosmtpd upgrade that adds
or renames state fails here rather than in production."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aiosmtpd.smtp import SMTP

from mailnode.smtp.server import Listener, MailSMTP, SMTPHandler


@pytest.mark.parametrize("implicit_tls", [False, True])
async def test_state_matches_aiosmtpd(implicit_tls: bool) -> None:
    loop = asyncio.get_running_loop()
    nothing = cast(Any, None)
    handler = SMTPHandler(
        listener=Listener.SUBMISSION, config=nothing, directory=nothing, store=nothing, authenticator=nothing,
        metrics=nothing,
    )  # fmt: skip
    settings: dict[str, Any] = {
        "data_size_limit": 1234,
        "hostname": "mail.example.com",
        "tls_context": None,
        "timeout": 42.0,
        "auth_required": True,
    }
    ours = MailSMTP(handler, implicit_tls=implicit_tls, loop=loop, **settings)
    theirs = SMTP(handler, enable_SMTPUTF8=True, ident="Mailfleet ESMTP", loop=loop, **settings)
    missing = set(vars(theirs)) - set(vars(ours))
    assert not missing
    for name in ("_auth_methods", "_handle_hooks", "_smtp_methods"):
        assert getattr(ours, name).keys() == getattr(theirs, name).keys(), name
    assert {k: (v.method.__name__, v.is_builtin) for k, v in ours._auth_methods.items()} == {
        k: (v.method.__name__, v.is_builtin) for k, v in theirs._auth_methods.items()
    }
    assert all(m.__self__ is ours for m in ours._smtp_methods.values())
    skip = {"_auth_methods", "_handle_hooks", "_smtp_methods", "_stream_reader", "_stream_reader_wr",
            "_stream_writer", "_client_connected_cb", "_closed", "_source_traceback", "_loop", "_over_ssl",
            "_auth_callback", "_task", "_strong_reader"}  # fmt: skip
    for name, value in vars(theirs).items():
        if name in skip or callable(value) or isinstance(value, asyncio.Future):
            continue
        if name == "require_starttls":  # aiosmtpd stores `tls_context and require_starttls`: None or False
            assert not ours.require_starttls
            continue
        expected = (not implicit_tls) if name == "_auth_require_tls" else value
        assert getattr(ours, name) == expected, name
