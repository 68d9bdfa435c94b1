"""Eclat: frequent itemsets by depth-first intersection of vertical tid-sets.

Zaki's Eclat keeps, for every item, the set of transactions that contain it (its tid-set)
and grows itemsets depth-first within prefix classes: the tid-set of ``X ∪ {b}`` is the
intersection of the tid-sets of ``X ∪ {a}`` and ``X ∪ {b}`` for two siblings ``a < b``,
and its support is that tid-set's size. Tid-sets are Python integers used as bit sets, so
an intersection is one ``&`` and a support one ``bit_count``.
"""

from __future__ import annotations

from collections.abc import Iterable


def tidsets(transactions: Iterable[Iterable[int]]) -> dict[int, int]:
    """The vertical layout: item -> bit set of the transactions (by position) that contain it."""
    vertical: dict[int, int] = {}
    for t, transaction in enumerate(transactions):
        bit = 1 << t
        for item in set(transaction):
            vertical[item] = vertical.get(item, 0) | bit
    return vertical


def eclat(transactions: Iterable[Iterable[int]], min_count: int, max_len: int | None = None,
          ) -> dict[frozenset[int], int]:
    """Every itemset contained in at least ``min_count`` transactions.

    Parameters
    ----------
    transactions : iterable of iterables of int
        The transactions; duplicate items within one transaction count once.
    min_count : int
        Minimum absolute support, at least 1.
    max_len : int, optional
        Largest itemset size to enumerate (None: no limit).

    Returns
    -------
    dict[frozenset[int], int]
        Each frequent non-empty itemset and the number of transactions that contain it.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    frequent: dict[frozenset[int], int] = {}
    roots = [(item, tids) for item, tids in sorted(tidsets(transactions).items()) if tids.bit_count() >= min_count]
    limit = max_len if max_len is not None else len(roots)

    def grow(prefix: tuple[int, ...], siblings: list[tuple[int, int]]) -> None:
        for i, (item, tids) in enumerate(siblings):
            itemset = prefix + (item,)
            frequent[frozenset(itemset)] = tids.bit_count()
            if len(itemset) >= limit:
                continue
            children = []
            for other, other_tids in siblings[i + 1:]:
                joint = tids & other_tids
                if joint.bit_count() >= min_count:
                    children.append((other, joint))
            if children:
                grow(itemset, children)

    grow((), roots)
    return frequent


def closed(frequent: dict[frozenset[int], int]) -> dict[frozenset[int], int]:
    """The closed itemsets among ``frequent``: those with no proper superset of the same count.

    ``frequent`` is what :func:`eclat` returns (closed under subsets up to its ``max_len``). If
    X ⊂ Y have the same count, so does X ∪ {y} for any y ∈ Y \\ X (its count lies between), so
    checking the supersets one item larger suffices. An itemset of ``max_len`` items counts as
    closed: its supersets were not enumerated.

    Parameters
    ----------
    frequent : dict[frozenset[int], int]
        Itemset -> count, as from :func:`eclat`.

    Returns
    -------
    dict[frozenset[int], int]
        The closed ones, with their counts.
    """
    covered = {itemset - {item} for itemset, count in frequent.items() if len(itemset) > 1 for item in itemset
               if frequent.get(itemset - {item}) == count}
    return {itemset: count for itemset, count in frequent.items() if itemset not in covered}
