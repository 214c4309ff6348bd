"""IMAP4rev1 server: syntax (protocol), search keys (search), message structure (mime), named
responses (responses), the command table (table, commands), sessions (session) and the listener (server)."""
