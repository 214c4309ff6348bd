"""Backups of a running node (docs/backups.md): the consistent hot checkpoint (`checkpoint`, through the
store's Staging), archives written in the background (`jobs`), one mailbox brought back from an archive
(`restore`), a whole node brought back from one (`noderestore`), the archive format itself (`archive`)
and its streaming tar codec (`tarcodec`). The node owns one Checkpoint and one BackupJobs; the admin
port (mailnode.admin.http) exposes them; `mailnode backup|verify|restore` (mailnode.cli) use `archive`,
`noderestore` and `tarcodec`. No module here speaks SQL: indexes are read with the store's index.Reader.
"""
