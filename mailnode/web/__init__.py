"""The node's HTTPS side: the listener (server), client autoconfiguration (autoconfig), CalDAV and
CardDAV through Radicale (dav). The MTA-STS policy text is mailwire.mtasts, shared with the operator."""
