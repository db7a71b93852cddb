"""Stage 4, route: task type and alias → model, then a replica of that model's pool.

The task type comes from a header (``x-task-type``) or a body field; the
route table maps it to a model (or alias) and says whether the external
fallback is allowed. Among the model's ready replicas the least loaded wins:
requests in flight counted by the gateway, plus the replica's own queue
(``vllm:num_requests_waiting``) and KV-cache pressure from the background
scrape. A session key (header or ``user``) keeps a conversation on the
replica holding its KV cache, unless that replica is much busier.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from gateway.asgi import Scope, header
from gateway.backends import Backend, BackendPool
from gateway.config_routing import RouteSettings, RoutingSettings
from gateway.errors import InvalidRequest, ModelNotFound, NoBackendAvailable


@dataclass(frozen=True, slots=True)
class RoutePlan:
    name: str  # route label for headers and logs: the task type or "default"
    model: str  # served model name after route and alias resolution
    fallback: bool
    affinity: str | None


class Router:
    def __init__(self, settings: RoutingSettings) -> None:
        self._s = settings
        self._task_header = settings.task_header.encode()
        self._affinity_header = settings.affinity_header.encode()

    def plan(self, scope: Scope, body: dict[str, Any], requested: str) -> RoutePlan:
        s = self._s
        task: Any = body.pop(s.task_field, None) if s.task_field in body else None
        if task is None:
            raw = header(scope, self._task_header)
            task = raw.decode("latin-1") if raw is not None else None
        elif not isinstance(task, str):
            raise InvalidRequest("The task type must be a string.", param=s.task_field)
        route: RouteSettings = s.default_route
        name = "default"
        if task is not None and task in s.routes:
            route, name = s.routes[task], task
        model = route.model or requested
        model = s.aliases.get(model, model)
        affinity: str | None = None
        raw_key = header(scope, self._affinity_header)
        if raw_key:
            affinity = raw_key.decode("latin-1")
        elif s.affinity_user_field and isinstance(body.get("user"), str):
            affinity = body["user"]
        return RoutePlan(name, model, route.fallback, affinity)


def _load(b: Backend, load_aware: bool) -> float:
    if not load_aware:
        return b.outstanding
    return b.outstanding + b.vllm_waiting + 4 * b.kv_usage


def choose_backend(
    pool: BackendPool,
    model: str,
    exclude: tuple[Backend, ...] = (),
    affinity: str | None = None,
    load_aware: bool = True,
    max_skew: int = 4,
) -> Backend:
    """The least-loaded ready replica of ``model``'s pool that is not in ``exclude``.

    Replicas whose breaker is open are skipped, unless every ready replica of the pool is:
    then, like Envoy's panic threshold, the breakers are ignored and the pick is let through
    while open (``ReplicaBreaker.probe``), so a recovered pool serves again at its first
    success instead of refusing everything until the reset time. Raises NoBackendAvailable
    (with the seconds until a replica may serve as Retry-After) or ModelNotFound.

    Admission (``admit.Admission._room``) counts the slots this would give, by the same rules:
    keep the two in step, or admitted requests meet a 503 here.
    """
    best: Backend | None = None
    best_load = 0.0
    backends = pool.backends
    n = len(backends)
    pool.turn = start = (pool.turn + 1) % n  # ties go round-robin, not always to the first
    sticky: Backend | None = None
    sticky_rank = b""
    ready = ejected = 0
    for i in range(n):
        b = backends[(start + i) % n]
        if not (b.ready and model in b.models):
            continue
        ready += 1
        if b.breaker is not None and not b.breaker.available():
            ejected += 1
            continue
        if b in exclude or b.outstanding >= b.settings.max_in_flight:
            continue
        load = _load(b, load_aware)
        if best is None or load < best_load:
            best, best_load = b, load
        if affinity is not None:
            # Rendezvous hashing: the same session keeps its replica while the set changes little.
            rank = hashlib.blake2b(f"{affinity}|{b.url}".encode(), digest_size=8).digest()
            if sticky is None or rank > sticky_rank:
                sticky, sticky_rank = b, rank
    if sticky is not None and best is not None and _load(sticky, load_aware) - best_load <= max_skew:
        return sticky
    if best is not None:
        return best
    if ready and ejected == ready:
        panic = _panic_choice(pool, model, exclude, load_aware)
        if panic is not None:
            return panic
    if pool.known_model(model) or not pool.any_ready:
        # The model exists (or may exist) but nothing can serve it right now.
        raise NoBackendAvailable(
            f"No backend is ready to serve `{model}` right now; retry shortly.",
            param="model",
            retry_after=pool.retry_after(model),
        )
    raise _not_found(pool, model)


def _panic_choice(
    pool: BackendPool, model: str, exclude: tuple[Backend, ...], load_aware: bool
) -> Backend | None:
    best: Backend | None = None
    best_load = 0.0
    for b in pool.backends:
        if b.ready and model in b.models and b not in exclude and b.outstanding < b.settings.max_in_flight:
            load = _load(b, load_aware)
            if best is None or load < best_load:
                best, best_load = b, load
    if best is not None and best.breaker is not None:
        best.breaker.probe()
    return best


def check_model(pool: BackendPool, model: str) -> None:
    """404 at once for a model no backend lists (while any backend is up to say so)."""
    if pool.any_ready and not pool.known_model(model):
        raise _not_found(pool, model)


def _not_found(pool: BackendPool, model: str) -> ModelNotFound:
    available = ", ".join(sorted(c["id"] for c in pool.model_cards()))
    return ModelNotFound(f"The model `{model}` does not exist. Available models: {available}.", param="model")
