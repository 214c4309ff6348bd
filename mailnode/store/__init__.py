"""Mailboxes on disk (Maildir files plus a SQLite index) and the durable-write primitives.

The only package that opens mail files. Protocol servers use `MailStore` (mailnode.store.mailstore)
and never import the modules below it directly.
"""
