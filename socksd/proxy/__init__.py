"""Twisted protocols: the SOCKS listener, its sessions and their CONNECTs."""

from socksd.proxy.session import Limits, Session, SOCKSServerFactory
from socksd.proxy.socks4 import Socks4Policy

__all__ = ["Limits", "Session", "SOCKSServerFactory", "Socks4Policy"]
