"""RFC 1413: the ident client used to verify SOCKS4 USERIDs (and, later, the identd)."""
