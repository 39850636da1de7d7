"""Secrets at rest (webhook signing secrets, Slack webhook URLs): sealed with Fernet under keys from
TALLY_SECRETS_KEY, so a database dump or backup alone does not hand them out (docs/adr/0076).

TALLY_SECRETS_KEY is a comma-separated list of Fernet keys (url-safe base64 of 32 random bytes, as
`Fernet.generate_key()` makes): the first seals, every one opens, so a key is rotated by putting a new one first,
letting `tally alerts` re-seal what it holds (`reseal`), then dropping the old one. Unset, a fixed development key
is used and a warning says so: fine for a laptop, never for data that matters.
"""

from __future__ import annotations

import logging

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger("tally.sealed")

# The key used when TALLY_SECRETS_KEY is unset: public, so it protects nothing; it only keeps development
# databases in the same shape as real ones.
DEVELOPMENT_KEY = "dGFsbHktZGV2ZWxvcG1lbnQta2V5LW5vdC1zZWNyZXQ="
PREFIX = "sealed:"


class Unreadable(ValueError):
    """A sealed value no configured key opens (a key dropped too early, or a damaged value)."""


class SecretBox:
    def __init__(self, keys: str = "") -> None:
        given = [k.strip() for k in keys.split(",") if k.strip()]
        if not given:
            log.warning("TALLY_SECRETS_KEY is not set: secrets are sealed with the public development key")
            given = [DEVELOPMENT_KEY]
        try:
            self._fernets = [Fernet(k) for k in given]
        except ValueError as exc:
            raise ValueError(f"TALLY_SECRETS_KEY: each key is url-safe base64 of 32 bytes ({exc})") from None
        self._box = MultiFernet(self._fernets)

    def seal(self, text: str) -> str:
        return PREFIX + self._box.encrypt(text.encode()).decode()

    def open(self, value: str) -> str:
        """The secret; a value stored before sealing existed (no prefix) is returned as it is until `reseal`."""
        if not value.startswith(PREFIX):
            return value
        try:
            return self._box.decrypt(value[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise Unreadable("no configured TALLY_SECRETS_KEY opens this sealed value") from None

    def stale(self, value: str) -> bool:
        """Not sealed, or sealed under a key that is not the first: `reseal` rewrites it."""
        if not value.startswith(PREFIX):
            return True
        try:
            self._fernets[0].decrypt(value[len(PREFIX):].encode())
            return False
        except InvalidToken:
            return True

    def reseal(self, value: str) -> str:
        """Sealed under the first key (a clear value sealed, an old key's value re-sealed)."""
        return self.seal(self.open(value))
