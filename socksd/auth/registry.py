"""Every SOCKS5 method socksd has, by config name, and the set one
configuration offers. Above methods.py and gss.py, so neither imports the
other; config checks ``[server] methods`` against :data:`METHODS` here."""

from __future__ import annotations

from twisted.cred.portal import Portal

from socksd.auth.gss import GSSAPIMethod, GSSAPISettings
from socksd.auth.methods import Backoff, Method, NoAuth, UserPass

# Config names, in the order error messages list them.
METHODS = (GSSAPIMethod.name, UserPass.name, NoAuth.name)


def method_registry(portal: Portal | None, gssapi_settings: GSSAPISettings | None = None,
                    backoff: Backoff | None = None) -> dict[str, Method]:
    """Every method this configuration can offer, by config name."""
    registry: dict[str, Method] = {NoAuth.name: NoAuth()}
    if portal is not None:
        registry[UserPass.name] = UserPass(portal, backoff)
    if gssapi_settings is not None:
        registry[GSSAPIMethod.name] = GSSAPIMethod(gssapi_settings)
    return registry
