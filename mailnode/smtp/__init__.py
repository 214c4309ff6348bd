"""SMTP: inbound MX and authenticated submission (mailnode.smtp.server), named replies (replies)."""
