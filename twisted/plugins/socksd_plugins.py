"""twistd plugins: ``twistd socks`` (socksd) and ``twistd identd``.

Twisted ships a SOCKSv4-only example under the same tapname ``socks``
(twisted/plugins/twisted_socks.py). twistd gathers every IServiceMaker, sorts
them by tapname (a stable sort) and takes the first ``socks`` it meets, so
which one starts would depend on directory listing and sys.path order: in an
editable install Twisted's own plugin directory even comes first. We make it
deterministic by renaming Twisted's example to ``twisted-socks`` when this
module loads: twistd loads every plugin module before it sorts (``sorted``
consumes the whole plugin iterator), so by the time it looks up ``socks`` the
example is no longer called that, in whichever order the modules were found.
The example stays reachable as ``twistd twisted-socks``.
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

try:
    from twisted.plugins import twisted_socks as _twisted_socks
except ImportError:  # a Twisted without the example: nothing to rename
    pass
else:
    _twisted_socks.TwistedSOCKS.tapname = "twisted-socks"

identd = ServiceMaker(
    "socksd identd",
    "socksd.tap.identd",
    "RFC 1413 ident server (IPv4/IPv6, sock_diag), part of socksd.",
    "identd",
)

socksd = ServiceMaker(
    "socksd",
    "socksd.tap.socks",
    "SOCKS4/4a/5 proxy with twisted.cred authentication (socksd).",
    "socks",
)

# ``twistd --reactor socksd``: what ``socks`` and ``identd`` install by default.
socksd_reactor = Reactor(
    "socksd",
    "socksd.tap.reactor",
    "epoll without the per-event legacy log context (socksd's default).",
)
