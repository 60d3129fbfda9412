"""Switchboard's kernel: mediator, event store, outbox, relay, HTTP edge. It never imports `modules`."""
