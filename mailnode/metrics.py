"""The node's Prometheus metrics, kept in one registry per node (tests run several nodes at once).

Label values are bounded: listener names and fixed rejection reasons, never addresses.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client as prom

prom.disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double the output and nobody graphs them


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.smtp_sessions = prom.Counter(
            "mailnode_smtp_sessions", "SMTP connections accepted", ["listener"], registry=r
        )
        self.smtp_sessions_active = prom.Gauge(
            "mailnode_smtp_sessions_active", "SMTP connections open now", ["listener"], registry=r
        )
        self.messages_accepted = prom.Counter(
            "mailnode_smtp_messages_accepted", "Messages acknowledged with 250 after DATA", ["listener"], registry=r
        )
        self.messages_rejected = prom.Counter(
            "mailnode_smtp_messages_rejected",
            "Recipients or messages refused, by reason",
            ["listener", "reason"],
            registry=r,
        )
        self.received_bytes = prom.Counter(
            "mailnode_smtp_received_bytes", "Bytes of message data accepted", ["listener"], registry=r
        )
        # mailnode.listener: the connection gate of every client listener
        self.connections_refused = prom.Counter(
            "mailnode_connections_refused",
            "Connections refused before the protocol spoke: per_client or total limit reached, "
            "untrusted_proxy (no PROXY header allowed from there), proxy_header (bad or missing header)",
            ["listener", "reason"],
            registry=r,
        )
        self.connections_open = prom.Gauge(
            "mailnode_connections_open", "Client connections open now, as the connection gate counts them",
            ["listener"], registry=r,
        )  # fmt: skip
        self.imap_sessions = prom.Counter(
            "mailnode_imap_sessions", "IMAP connections accepted", ["listener"], registry=r
        )
        self.imap_sessions_active = prom.Gauge(
            "mailnode_imap_sessions_active", "IMAP connections open now", ["listener"], registry=r
        )
        self.imap_commands = prom.Counter(
            "mailnode_imap_commands", "IMAP commands received, by command", ["command"], registry=r
        )
        self.auth_failures = prom.Counter(
            "mailnode_auth_failures", "Failed authentication attempts", ["protocol"], registry=r
        )
        self.delivery_seconds = prom.Histogram(
            "mailnode_store_delivery_duration_seconds",
            "Time from handing a message to the store until it is durable (fsynced and indexed)",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.directory_reloads = prom.Counter(
            "mailnode_directory_reloads", "Directory reload attempts, by result", ["result"], registry=r
        )
        self.directory_last_reload_ok = prom.Gauge(
            "mailnode_directory_last_reload_success",
            "1 if the last directory reload succeeded, 0 if the node kept an older version",
            registry=r,
        )
        self.directory_mailboxes = prom.Gauge(
            "mailnode_directory_mailboxes", "Mailboxes in the directory now in force", registry=r
        )
        # Server TLS (mailnode.tls): certificates renewed in the mounted Secret are taken without a restart
        self.tls_reloads = prom.Counter(
            "mailnode_tls_reloads",
            "Changed TLS certificate files loaded (success) or refused, the last good pair kept (failure)",
            ["result"],
            registry=r,
        )
        self.tls_certificate_expiry = prom.Gauge(
            "mailnode_tls_certificate_expiry_timestamp_seconds",
            "Unix time the certificate served to new connections expires (its notAfter)",
            registry=r,
        )
        self.store_bytes = prom.Gauge("mailnode_store_size_bytes", "Bytes of mail held in the store", registry=r)
        self.store_messages = prom.Gauge("mailnode_store_messages", "Messages held in the store", registry=r)
        self.ready = prom.Gauge("mailnode_ready", "1 once the listeners are up and the store is open", registry=r)
        self.queue_messages = prom.Gauge("mailnode_queue_messages", "Messages in the outbound queue", registry=r)
        self.queue_oldest_age = prom.Gauge(
            "mailnode_queue_oldest_age_seconds", "Age of the oldest message in the outbound queue", registry=r
        )
        self.delivery_attempts = prom.Counter(
            "mailnode_delivery_attempts",
            "Outbound delivery attempts per recipient, by result",
            ["result"],
            registry=r,
        )
        self.bounces = prom.Counter("mailnode_bounces", "Bounce messages sent for undeliverable mail", registry=r)
        # Clustering: mail handed between the nodes of a domain (mailnode.smtp.lmtp, mailnode.queue.handoff)
        self.lmtp_deliveries = prom.Counter(
            "mailnode_lmtp_deliveries",
            "Recipients of mail handed over by a peer node (LMTP), by result: delivered (stored here), "
            "refused (a 5xx reply), deferred (a 4xx reply)",
            ["result"],
            registry=r,
        )
        self.lmtp_refused = prom.Counter(
            "mailnode_lmtp_refused",
            "LMTP commands refused for want of the internal credential: no_auth (none given), wrong_token",
            ["reason"],
            registry=r,
        )
        # Clustering: IMAP sessions proxied to their mailbox's home (mailnode.imap.proxy)
        self.imap_proxied_sessions = prom.Gauge(
            "mailnode_imap_proxied_sessions",
            "IMAP sessions logged in here and relayed now to their mailbox's home node",
            registry=r,
        )
        self.imap_proxy_logins = prom.Counter(
            "mailnode_imap_proxy_logins",
            "Logins of mailboxes homed on another node, by result: proxied (the home took the session), "
            "unavailable (home down, slow or refusing: the client got NO [UNAVAILABLE])",
            ["result"],
            registry=r,
        )
        self.imap_proxy_refused = prom.Counter(
            "mailnode_imap_proxy_refused",
            "Logins refused on the internal IMAP port: login (LOGIN, never accepted there), not_internal "
            "(a user's own credentials), wrong_token (no or a wrong internal token), not_home (the mailbox "
            "is not homed here)",
            ["reason"],
            registry=r,
        )
        self.handoffs = prom.Counter(
            "mailnode_handoffs",
            "Recipients homed on another node, as SMTP handed them over before its 250: delivered (the home "
            "stored it), queued (home down or slow: the queue retries), refused (the home said no: a bounce)",
            ["result"],
            registry=r,
        )
        self.handoff_queue_messages = prom.Gauge(
            "mailnode_handoff_queue_messages",
            "Messages in the queue waiting to be handed to their home node",
            registry=r,
        )
        # Checkpoints and backups (mailnode.backup)
        self.checkpoints = prom.Counter(
            "mailnode_checkpoints",
            "Checkpoints (POST /snapshot and the staging of archives), by result",
            ["result"],
            registry=r,
        )
        self.writes_paused = prom.Gauge(
            "mailnode_writes_paused", "1 while a checkpoint holds writes (SMTP answers 451, IMAP waits)", registry=r
        )
        self.checkpoint_pause_seconds = prom.Histogram(
            "mailnode_checkpoint_pause_seconds",
            "How long each checkpoint held writes",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
        )
        self.checkpoint_hold_expired = prom.Counter(
            "mailnode_checkpoint_hold_expired",
            "Checkpoints whose hold ran out before DELETE /snapshot (writes resumed by themselves)",
            registry=r,
        )
        self.backups = prom.Counter(
            "mailnode_backups", "Archives written (GET /backup, POST /backups), by result", ["result"], registry=r
        )
        self.backup_last_success = prom.Gauge(
            "mailnode_backup_last_success_timestamp_seconds", "Unix time the last archive was completed", registry=r
        )
        self.backup_bytes = prom.Gauge(
            "mailnode_backup_bytes", "Size in bytes of the last archive completed", registry=r
        )
        # The admin port (mailnode.admin.http): requests that change state, refused
        self.admin_refused = prom.Counter(
            "mailnode_admin_requests_refused",
            "Admin requests refused: not from loopback where required, no or a wrong internal token",
            ["reason"],
            registry=r,
        )
        for reason in ("not_loopback", "missing_token", "wrong_token"):
            self.admin_refused.labels(reason)
        for result in ("delivered", "refused", "deferred"):
            self.lmtp_deliveries.labels(result)
        for reason in ("no_auth", "wrong_token"):
            self.lmtp_refused.labels(reason)
        for result in ("delivered", "queued", "refused"):
            self.handoffs.labels(result)
        for result in ("proxied", "unavailable"):
            self.imap_proxy_logins.labels(result)
        for reason in ("login", "not_internal", "wrong_token", "not_home"):
            self.imap_proxy_refused.labels(reason)
        for result in ("ok", "failed"):
            self.checkpoints.labels(result)
            self.backups.labels(result)
        for result in ("delivered", "deferred", "failed"):
            self.delivery_attempts.labels(result)
        for result in ("success", "failure"):
            self.directory_reloads.labels(result)
            self.tls_reloads.labels(result)
        self.directory_last_reload_ok.set(1)

    def track_store(self, *, size: Callable[[], float], messages: Callable[[], float]) -> None:
        self.store_bytes.set_function(size)
        self.store_messages.set_function(messages)

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)
