"""Stage 3, route: pick the backend that serves the requested model.

Least outstanding requests (counted by the gateway) among ready backends
that list the model. Aliases, pools and task-type routes come later; they
slot in here.
"""

from __future__ import annotations

from gateway.backends import Backend, BackendPool
from gateway.errors import ModelNotFound, NoBackendAvailable


def choose_backend(pool: BackendPool, model: str, exclude: tuple[Backend, ...] = ()) -> Backend:
    best: Backend | None = None
    backends = pool.backends
    n = len(backends)
    pool.turn = start = (pool.turn + 1) % n  # ties go round-robin, not always to the first
    for i in range(n):
        b = backends[(start + i) % n]
        if (
            b.ready
            and model in b.models
            and (best is None or b.outstanding < best.outstanding)
            and b not in exclude
            and b.outstanding < b.settings.max_in_flight
            and (b.breaker is None or b.breaker.available())
        ):
            best = b
    if best is not None:
        return best
    if pool.known_model(model) or not pool.any_ready:
        # The model exists (or may exist) but nothing can serve it right now.
        raise NoBackendAvailable(
            f"No backend is ready to serve `{model}` right now; retry shortly.",
            param="model",
            retry_after=2,
        )
    available = ", ".join(sorted(c["id"] for c in pool.model_cards()))
    raise ModelNotFound(f"The model `{model}` does not exist. Available models: {available}.", param="model")


def check_model(pool: BackendPool, model: str) -> None:
    """404 at once for a model no backend lists (while any backend is up to say so)."""
    if pool.any_ready and not pool.known_model(model):
        available = ", ".join(sorted(c["id"] for c in pool.model_cards()))
        raise ModelNotFound(
            f"The model `{model}` does not exist. Available models: {available}.", param="model"
        )
