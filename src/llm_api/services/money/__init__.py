"""Money: model prices and request costs (prices.py), budgets (budgets.py, enforced by the rate
limiter's atomic admission), soft-limit webhooks through a database outbox (webhooks.py)."""
