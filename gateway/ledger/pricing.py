"""Cost of a request from the ``pricing`` table, in USD, computed when its ledger row is written.

Prices are looked up by ``provider/model`` first (an external provider's rate for a model it
served as a fallback), then by the model name; a model without a price costs 0 (and the row says
so: the price table is not retroactive, rows keep the cost they were written with).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from gateway.ledger.config import ModelPrice

_MILLION = Decimal(1_000_000)
ZERO = Decimal(0)
# numeric(20, 10) in the schema: a tenth of a nano-dollar.
QUANTUM = Decimal("1e-10")


class PriceTable:
    """USD per token, by model name, as Decimals (exact sums in PostgreSQL's numeric)."""

    def __init__(self, pricing: Mapping[str, ModelPrice]) -> None:
        self._per_token: dict[str, tuple[Decimal, Decimal]] = {
            name: (
                Decimal(repr(p.prompt_per_million)) / _MILLION,
                Decimal(repr(p.completion_usd_per_million)) / _MILLION,
            )
            for name, p in pricing.items()
        }

    def __bool__(self) -> bool:
        return bool(self._per_token)

    def cost(self, model: str, provider: str | None, prompt: int | None, completion: int | None) -> Decimal:
        """USD for ``prompt`` + ``completion`` tokens (None counts as 0), rounded to 1e-10."""
        prices = None
        if provider is not None:
            prices = self._per_token.get(f"{provider}/{model}")
        if prices is None:
            prices = self._per_token.get(model)
        if prices is None or not (prompt or completion):
            return ZERO
        usd = prices[0] * max(0, prompt or 0) + prices[1] * max(0, completion or 0)
        return usd.quantize(QUANTUM)
