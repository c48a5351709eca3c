"""twistd Options and makeService: ``socks`` (tap.socks) and ``identd`` (tap.identd)."""
