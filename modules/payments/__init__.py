"""Payments owns charging an order's payment method through the payment provider."""
