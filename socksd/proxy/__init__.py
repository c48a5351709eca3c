"""Twisted protocols: the SOCKS listener, its sessions and their requests
(CONNECT, BIND, UDP ASSOCIATE)."""

from socksd.proxy.limits import Limits
from socksd.proxy.listener import SOCKSServerFactory
from socksd.proxy.session import Session
from socksd.proxy.socks4 import Socks4Policy

__all__ = ["Limits", "Session", "SOCKSServerFactory", "Socks4Policy"]
