"""The operator's controllers: observe -> check -> build -> apply -> status. One module per job, called by
handlers.py; no kopf here (the `.importlinter` contracts check it).

`domain` reconciles a MailDomain and its Mailboxes as a list of steps, each in its own module: `checks`
(what can refuse it), `dkim`, `restore`, `mailboxes`, `objects` (apply), `status` (the one writer of
MailDomain.status). Beside it run `schedule` (scheduled backups, retention), `backup` (taking a MailBackup),
`usage` (mailbox usage into Mailbox.status) and `routing` (which domain an event concerns), over the
shared `context`, `conditions`, `passwords` and `workqueue`.
"""
