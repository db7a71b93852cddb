"""The response cache (docs/cache.md): exact-match answers kept in Redis, scoped per team."""
