"""The operator's Prometheus metrics (mailfleet_operator_*), on their own registry; `mailfleet operator
--metrics-port` serves them. Label values are bounded: kinds, results and object kinds, never names, except
the backup gauges and the moving mailboxes, one series per MailDomain (namespace, maildomain) as long as it
exists."""

from __future__ import annotations

import prometheus_client as prom


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        self.reconciles = prom.Counter(
            "mailfleet_operator_reconciles",
            "Reconciles by kind and result (ok, refused: a condition says what is wrong; error: retried).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.duration = prom.Histogram(
            "mailfleet_operator_reconcile_duration_seconds",
            "Time a reconcile took, by kind.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.applied = prom.Counter(
            "mailfleet_operator_object_writes",
            "Objects the operator created or updated (unchanged objects are not written), by kind and action.",
            ["kind", "action"],
            registry=self.registry,
        )
        self.managed = prom.Gauge(
            "mailfleet_operator_managed_objects",
            "Objects the operator manages, by kind (MailDomain and Mailbox: the resources; others: owned).",
            ["kind"],
            registry=self.registry,
        )
        self.queue_depth = prom.Gauge(
            "mailfleet_operator_queue_depth", "MailDomains waiting for or in a reconcile.", registry=self.registry
        )
        self.passwords_hashed = prom.Counter(
            "mailfleet_operator_passwords_hashed",
            "Plaintext passwords the operator hashed (argon2id).",
            registry=self.registry,
        )
        self.backups = prom.Counter(
            "mailfleet_operator_backups",
            "MailBackups that ended, by method (VolumeSnapshot, Archive) and result (completed, failed).",
            ["method", "result"],
            registry=self.registry,
        )
        self.backup_duration = prom.Histogram(
            "mailfleet_operator_backup_duration_seconds",
            "Time from a MailBackup's start to its end, by method.",
            ["method"],
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
            registry=self.registry,
        )

        # Scheduled backups (reconcile/schedule.py): one series per MailDomain with backups, gone with it.
        self.last_backup_timestamp = prom.Gauge(
            "mailfleet_operator_last_backup_timestamp_seconds",
            "When the newest completed MailBackup of a MailDomain completed (Unix time).",
            ["namespace", "maildomain"],
            registry=self.registry,
        )
        self.backups_stale = prom.Gauge(
            "mailfleet_operator_backups_stale",
            "1 when a MailDomain with spec.backup has no completed backup within two schedule periods, else 0.",
            ["namespace", "maildomain"],
            registry=self.registry,
        )
        self.scheduled_backups = prom.Counter(
            "mailfleet_operator_scheduled_backups",
            "MailBackups the operator created because a MailDomain's backup schedule came due.",
            registry=self.registry,
        )
        self.backups_deleted = prom.Counter(
            "mailfleet_operator_backups_deleted",
            "Scheduled MailBackups the operator deleted under their MailDomain's retention.",
            registry=self.registry,
        )

        # Mailbox moves (reconcile/moves.py): a replicas change or a forced move.
        self.moves = prom.Counter(
            "mailfleet_operator_moves",
            "Mailbox moves that ended, by result (done; rolled_back: given up before the flip, the mailbox "
            "stays where it was; failed: a refusal after the flip, the move tries again).",
            ["result"],
            registry=self.registry,
        )
        self.move_duration = prom.Histogram(
            "mailfleet_operator_move_duration_seconds",
            "Time from a mailbox move's start to its end (done).",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=self.registry,
        )
        self.mailboxes_moving = prom.Gauge(
            "mailfleet_operator_mailboxes_moving",
            "Mailboxes moving now, by MailDomain (namespace, maildomain).",
            ["namespace", "maildomain"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)
