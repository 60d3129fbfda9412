"""Payments answers no queries yet."""
