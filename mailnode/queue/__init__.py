"""Outbound mail: the durable spool, routing and delivery, bounces."""
