"""What the private services the tests start (Postfix, Sendmail, HAProxy) have in common."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, TypeVar

S = TypeVar("S", bound="PrivateService")


class PrivateService(ABC):
    """A service made by :meth:`start` and removed by :meth:`close`. As a context manager, one
    that fails to start is closed at once, so that no half-started daemon or directory is left."""

    @abstractmethod
    def start(self: S, *args: Any, **kwargs: Any) -> S:
        """Start the service; return it."""

    @abstractmethod
    def close(self) -> None:
        """Stop the service and remove what it made (it may be half-started)."""

    def __enter__(self: S) -> S:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
