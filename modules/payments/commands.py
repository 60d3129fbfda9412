"""Payments takes no commands from other modules: it reacts to OrderPlaced."""
