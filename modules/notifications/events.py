"""Notifications publishes no events yet."""
