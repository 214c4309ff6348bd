"""mailnode: one Mailfleet mail node (SMTP, soon IMAP) serving mailboxes stored on local disk.

`mailnode serve --config FILE` (mailnode.cli) builds a `mailnode.node.Node` from its parts.
"""
