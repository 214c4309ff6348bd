"""IMAP commands that wait for or ask about changes: IDLE (RFC 2177), NOOP and CHECK. They report
what the store's switchboard announced for the selected folder. Declared in
mailnode.imap.commands.TABLE.
"""

from __future__ import annotations

import asyncio

from mailnode.imap import protocol, responses
from mailnode.imap.session import Session


async def noop(session: Session, command: protocol.Command) -> None:
    """NOOP (RFC 3501 §6.1.2), the client's poll for changes, and CHECK (§6.4.1), the same here:
    every change is on disk before it is answered."""
    await session.report_changes(expunge=True)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def idle(session: Session, command: protocol.Command) -> None:
    """RFC 2177: report changes as they happen until the client says DONE."""
    session.send(responses.CONTINUE_IDLE)
    await session.report_changes(expunge=True)
    await session.flush()
    done = asyncio.ensure_future(session.readline())
    try:
        while True:
            session.wakeup.clear()
            waiter = asyncio.ensure_future(session.wakeup.wait())
            finished, _ = await asyncio.wait(
                {done, waiter}, timeout=session.config.imap.idle_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            if done in finished:
                break
            if not finished:
                raise responses.Hangup(responses.BYE_AUTOLOGOUT)
            await session.report_changes(expunge=True)
            await session.flush()
    finally:
        if not done.done():
            done.cancel()
    line = done.result()
    if line is None:
        raise ConnectionError("client went away during IDLE")
    if line.strip().upper() != b"DONE":
        raise responses.Refused(responses.BAD_IDLE_DONE)
    session.send(responses.OK_IDLE_DONE.line(command.tag))
