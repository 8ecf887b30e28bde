"""The credit ledger's chain: entries in ledger order, and whether each starts where the last ended.

Shared by the worker (which derives the balance from it) and the API (which lists the ledger in
the same order), so both agree on which entry is the newest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import groupby, pairwise, permutations
from typing import Protocol

# A tie group larger than this is ordered greedily instead of by trying every order.
_EXHAUSTIVE_TIE_LIMIT = 6


class LedgerRow(Protocol):
    """Anything carrying an entry's position in the chain (a CreditEntry, a result row)."""

    @property
    def id(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def balance_before(self) -> Decimal: ...
    @property
    def balance_after(self) -> Decimal: ...
    @property
    def overage_before(self) -> Decimal: ...
    @property
    def overage_after(self) -> Decimal: ...


@dataclass(frozen=True)
class ChainLink:
    """What the chain check needs of an entry."""

    id: str
    created_at: datetime
    balance_before: Decimal
    balance_after: Decimal
    overage_before: Decimal
    overage_after: Decimal

    @classmethod
    def of(cls, row: LedgerRow) -> ChainLink:
        return cls(
            row.id,
            row.created_at,
            row.balance_before,
            row.balance_after,
            row.overage_before,
            row.overage_after,
        )

    @property
    def before(self) -> tuple[Decimal, Decimal]:
        return (self.balance_before, self.overage_before)

    @property
    def after(self) -> tuple[Decimal, Decimal]:
        return (self.balance_after, self.overage_after)


@dataclass(frozen=True)
class Chain:
    """The entries in ledger order, and whether each one starts where the previous ended."""

    entries: list[ChainLink]
    ok: bool

    @property
    def newest(self) -> ChainLink | None:
        return self.entries[-1] if self.entries else None


def order_chain(entries: Sequence[ChainLink]) -> Chain:
    """Order by `created_at`; entries sharing a `created_at` in the order that links them.

    Within a tie the order with the most links wins (the link into the tie counts), then the
    order of ids, so the answer is the same whatever order the entries arrived in.
    """
    ordered: list[ChainLink] = []
    by_time = sorted(entries, key=lambda e: (e.created_at, e.id))
    for _, tied in groupby(by_time, key=lambda e: e.created_at):
        group = list(tied)
        previous = ordered[-1].after if ordered else None
        ordered.extend(_order_tie(group, previous))
    ok = all(a.after == b.before for a, b in pairwise(ordered))
    return Chain(ordered, ok)


def _links(order: Sequence[ChainLink], previous: tuple[Decimal, Decimal] | None) -> int:
    count = 1 if previous is not None and order[0].before == previous else 0
    return count + sum(a.after == b.before for a, b in pairwise(order))


def _order_tie(group: list[ChainLink], previous: tuple[Decimal, Decimal] | None) -> list[ChainLink]:
    if len(group) == 1:
        return group
    if len(group) <= _EXHAUSTIVE_TIE_LIMIT:
        # `group` is sorted by id, so permutations come in id order: the first best wins.
        best = max(permutations(group), key=lambda order: _links(order, previous))
        return list(best)
    # Greedy: follow the chain from the previous entry, or start where nothing leads in.
    remaining = list(group)
    result: list[ChainLink] = []
    state = previous
    while remaining:
        nxt = next((e for e in remaining if e.before == state), None)
        if nxt is None:
            afters = {e.after for e in remaining}
            nxt = next((e for e in remaining if e.before not in afters), remaining[0])
        remaining.remove(nxt)
        result.append(nxt)
        state = nxt.after
    return result
