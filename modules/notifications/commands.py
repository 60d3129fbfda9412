"""Notifications takes no commands: it reacts to payment outcomes."""
