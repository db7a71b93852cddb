"""Credentials → Principal: JWT (static keys or JWKS) and API keys."""
