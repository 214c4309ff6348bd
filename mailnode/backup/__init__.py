"""Backups of a running node (docs/backups.md): the consistent hot checkpoint (`checkpoint`), archives
written in the background (`jobs`), one mailbox brought back from an archive (`restore`), and the
archive format itself (`archive`). The node owns one Checkpoint and one BackupJobs; the admin port
(mailnode.admin.http) exposes them; `mailnode backup|verify|restore` (mailnode.cli) use `archive`.
"""
