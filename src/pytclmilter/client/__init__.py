"""The MTA side, for ``pytclmilter try`` and ``send``: a message, a conversation, the edits applied, a report."""

from .apply import Result, apply, delivered
from .conversation import Outcome, Stage, converse
from .message import Envelope, Message

__all__ = ["Envelope", "Message", "Outcome", "Stage", "Result", "apply", "converse", "delivered"]
