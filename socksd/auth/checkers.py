"""Combining checkers: a Portal holds one checker per credentials interface,
but socksd users list several (config ``checkers`` plus ``--auth``)."""

from __future__ import annotations

from typing import Sequence

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer


@implementer(ICredentialsChecker)
class FirstOf:
    """Asks each checker in turn; the first that accepts the credentials wins."""

    def __init__(self, checkers: Sequence[ICredentialsChecker]) -> None:
        self.checkers = tuple(checkers)
        interfaces = []
        for checker in self.checkers:
            for iface in checker.credentialInterfaces:
                if iface not in interfaces:
                    interfaces.append(iface)
        self.credentialInterfaces = tuple(interfaces)

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        last = error.UnauthorizedLogin("no checker accepted the credentials")
        for checker in self.checkers:
            if not any(iface.providedBy(credentials) for iface in checker.credentialInterfaces):
                continue
            try:
                avatar_id = yield checker.requestAvatarId(credentials)
            except error.UnauthorizedLogin as e:
                last = e
                continue
            return avatar_id
        raise last
