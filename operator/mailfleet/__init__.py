"""mailfleet: the Kubernetes operator that reconciles MailDomain, Mailbox and MailBackup resources
into StatefulSets of mail nodes. Its layout (api, specs, k8s, reconcile, handlers, cli) is described in
docs/architecture.md; the code arrives with the operator issue.
"""
