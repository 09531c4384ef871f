"""Accounts and credentials: password hashing, JWT access tokens, refresh tokens, API keys."""
