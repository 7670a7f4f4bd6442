"""Localisation: after a block, find the hop at which the censor sits and what its forged packets look like.

policy.py decides when and what (rate, residual blocking, proxy routes); search.py runs the
TTL series; ttl.py sends TTL-limited packets and reads ICMP time-exceeded; fingerprint.py
captures the forged packet's headers; trigger.py builds the packets that are repeated.
"""

from probe.locate.policy import LOCATABLE, RATE_SECONDS, Locator

__all__ = ["LOCATABLE", "RATE_SECONDS", "Locator"]
