"""Orders owns the customer's order: placing it (after inventory holds the stock) and its status."""
