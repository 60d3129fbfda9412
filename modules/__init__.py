"""The example system: orders, inventory, payments, notifications. Only app.bootstrap imports the modules."""
