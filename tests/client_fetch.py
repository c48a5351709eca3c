"""Run by tests/test_client_endpoint.py in its own process (it needs a
reactor of its own): fetch a page through socksd.client.SOCKS5ClientEndpoint
and print its length and SHA-256, or the error."""

import hashlib
import json
import sys

from twisted.internet import defer, endpoints, protocol, task


class Fetch(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"GET / HTTP/1.0\r\n\r\n")

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=None):
        self.done.callback(self.data)


async def main(reactor, options):
    from socksd.client import SOCKS5ClientEndpoint

    proxy = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", options.pop("proxy_port"))
    endpoint = SOCKS5ClientEndpoint(options.pop("host"), options.pop("port"), proxy, **options)
    try:
        fetch = await endpoint.connect(protocol.Factory.forProtocol(Fetch))
        body = await fetch.done
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}",
                          "reply": getattr(e, "reply", None)}))
        return
    print(json.dumps({"length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                      "tail": body[-64:].decode("latin-1")}))


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, json.loads(sys.argv[1]))))
