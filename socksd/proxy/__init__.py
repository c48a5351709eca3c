"""Twisted protocols: the SOCKS listener, its sessions and their CONNECTs."""

from socksd.proxy.session import Limits, Session, SOCKSServerFactory

__all__ = ["Limits", "Session", "SOCKSServerFactory"]
