"""IMAP4rev1 server: protocol parsing (protocol), message structure (mime), sessions (server)."""
