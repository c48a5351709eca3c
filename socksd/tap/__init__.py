"""twistd Options and makeService: ``socks`` (tap.socks) and ``identd`` (tap.identd)."""

import sys

from twisted.copyright import version as twisted_version

from socksd import __version__


def print_version() -> None:
    """``--version``, for ``socks`` and ``identd``: Twisted's option names
    Twisted's version alone, and socksd's is the one a report needs."""
    print(f"socksd version: {__version__}")
    print(f"Twisted version: {twisted_version}")
    sys.exit(0)


def install_reactor() -> None:
    """socksd's reactor (tap.reactor), unless a reactor is installed already
    or this system has no epoll (then twistd's default runs)."""
    try:
        from socksd.tap import reactor
    except ImportError:   # no select.epoll: not Linux
        return
    reactor.install_default()
