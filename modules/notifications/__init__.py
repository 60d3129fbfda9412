"""Notifications owns what the customer is told about their order's outcome."""
