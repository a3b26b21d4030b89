"""The protocol core's own errors: the only exceptions it raises."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error the protocol core raises."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: the connection must end."""


class LocalProtocolError(ProtocolError):
    """Our side tried to send something illegal for the pending event; nothing was sent."""
