"""RFC 1413: the identd (server, with its owner lookup and answer policy) and
the ident client used to verify SOCKS4 USERIDs."""
