"""twistd Options and makeService: ``socks`` (tap.socks) and ``identd`` (tap.identd)."""


def install_reactor() -> None:
    """socksd's reactor (tap.reactor), unless a reactor is installed already
    or this system has no epoll (then twistd's default runs)."""
    try:
        from socksd.tap import reactor
    except ImportError:   # no select.epoll: not Linux
        return
    reactor.install_default()
