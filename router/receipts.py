"""Receipts: what a consumer holds for one lease of one message, and what it acks, nacks or extends with.

A receipt is `<message id>.<nonce>`: the id finds the row, the nonce (random, one per claim) makes it
unique and unguessable, so a receipt from an older lease of the same message no longer matches once
the message has been claimed again. Every store writes the receipt it hands out beside the message and
settles only on an exact match.
"""

from __future__ import annotations

import secrets

STALE_RECEIPT = "unknown receipt, or the message was received again since (its visibility timeout expired)"


def new_nonce() -> str:
    """One per claim (a receive, a lease, an append that hands off): no getrandom() call per message."""
    return secrets.token_urlsafe(12)


def receipt_for(message_id: int, nonce: str) -> str:
    return f"{message_id}.{nonce}"


def nonce_of(receipt: str) -> str:
    """The claim's nonce a receipt carries ("" when it is not one of ours)."""
    return receipt.split(".", 1)[1] if "." in receipt else ""


def message_id_of(receipt: str) -> int:
    """The message a receipt names; -1 (no message) when it is not one of ours."""
    head = receipt.split(".", 1)[0]
    return int(head) if head.isdigit() else -1
