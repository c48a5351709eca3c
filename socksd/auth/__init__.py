"""Who the client is: avatars, the realm, and the SOCKS authentication methods."""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import IRealm
from zope.interface import Attribute, Interface, implementer


class IUser(Interface):
    """The avatar a SOCKS session runs as; rules match on its name."""

    name = Attribute("The user name (str), or None for an anonymous client.")
    verified = Attribute("True when a checker or method proved the name.")


@implementer(IUser)
class User:
    __slots__ = ("name", "verified")

    def __init__(self, name: str | None, verified: bool = True) -> None:
        self.name = name
        self.verified = verified and name is not None

    def __repr__(self) -> str:
        return f"User({self.name!r}, verified={self.verified})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, User)
                and (self.name, self.verified) == (other.name, other.verified))

    def __hash__(self) -> int:
        return hash((self.name, self.verified))


ANONYMOUS = User(None, verified=False)


class ClientUsernamePassword(UsernamePassword):
    """RFC 1929's username and password, and who sent them: ``client`` is the
    session's client key (its address), by which a checker that hashes
    bounds the work one client can cause (socksd.auth.hashing). Checkers
    that do not look still see an ordinary IUsernamePassword."""

    def __init__(self, username: bytes, password: bytes, client: str | None) -> None:
        super().__init__(username, password)
        self.client = client


def avatar_name(avatar_id: bytes | str) -> str:
    """Checkers return bytes or str avatar IDs; rules and logs use str."""
    if isinstance(avatar_id, bytes):
        return avatar_id.decode("utf-8", "backslashreplace")
    return str(avatar_id)


@implementer(IRealm)
class SOCKSRealm:
    """Maps an authenticated avatar ID to a :class:`User`."""

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IUser not in interfaces:
            raise NotImplementedError("socksd's realm only provides IUser")
        return IUser, User(avatar_name(avatarId)), lambda: None
