"""Inventory owns stock levels per SKU and the reservations orders hold on them."""
