"""
A bare Twisted + httptools HTTP/1.1 reverse proxy: the "120-line Twisted +
httptools proxy" reference point of docs/DESIGN.md, used by benchmarks/http1.py
(--bare) as a Python peer for txmesh-proxy.

Deliberately minimal: one upstream, keep-alive upstream connection pool,
whole messages buffered and re-framed with Content-Length (no streaming, no
chunked request bodies, no HEAD/1xx/Upgrade handling), pipelined requests
served in order.  Not a product; a yardstick.

    python benchmarks/bare_proxy.py --listen 8080 --upstream 127.0.0.1:8081
"""

import argparse
from collections import deque

import httptools
from twisted.internet import protocol, reactor

HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"content-length",
}
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 11\r\n\r\nbad gateway"


class Upstream(protocol.Protocol):
    def __init__(self, pool):
        self.pool, self.waiter = pool, None
        self.parser = httptools.HttpResponseParser(self)

    def connectionMade(self):
        self.pool.connected(self)

    def send(self, data, waiter):
        self.waiter, self.reason, self.headers, self.body = waiter, [], [], []
        self.transport.write(data)

    def dataReceived(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.loseConnection()

    def on_status(self, reason):
        self.reason.append(reason)

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        waiter, self.waiter = self.waiter, None
        keep = self.parser.should_keep_alive()
        if keep:
            self.pool.release(self)
        else:
            self.transport.loseConnection()
        waiter.respond(
            self.parser.get_status_code(), b"".join(self.reason), self.headers, b"".join(self.body)
        )

    def connectionLost(self, reason):
        self.pool.discard(self)
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.fail()


class Pool(protocol.ClientFactory):
    def __init__(self, host, port, max_idle=64):
        self.host, self.port, self.max_idle, self.idle = host, port, max_idle, deque()
        self.connecting = {}

    def request(self, data, waiter):
        if self.idle:
            self.idle.pop().send(data, waiter)
        else:
            connector = reactor.connectTCP(self.host, self.port, self, timeout=5)
            self.connecting[connector] = (data, waiter)

    def buildProtocol(self, addr):
        return Upstream(self)

    def startedConnecting(self, connector):
        pass

    def clientConnectionFailed(self, connector, reason):
        _data, waiter = self.connecting.pop(connector)
        waiter.fail()

    def clientConnectionLost(self, connector, reason):
        self.connecting.pop(connector, None)

    def connected(self, proto):
        data, waiter = self.connecting.pop(proto.transport.connector)
        proto.send(data, waiter)

    def release(self, proto):
        if len(self.idle) < self.max_idle:
            self.idle.append(proto)
        else:
            proto.transport.loseConnection()

    def discard(self, proto):
        if proto in self.idle:
            self.idle.remove(proto)


class Downstream(protocol.Protocol):
    def __init__(self, pool):
        self.pool, self.queue, self.busy, self.keep = pool, deque(), False, True
        self.parser = httptools.HttpRequestParser(self)

    def dataReceived(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.loseConnection()

    def on_message_begin(self):
        self.url, self.headers, self.body = [], [], []

    def on_url(self, url):
        self.url.append(url)

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        body = b"".join(self.body)
        out = [b"%s %s HTTP/1.1\r\n" % (self.parser.get_method(), b"".join(self.url))]
        out += [n + b": " + v + b"\r\n" for n, v in self.headers if n.lower() not in HOP]
        if body:
            out.append(b"content-length: %d\r\n" % len(body))
        out += [b"\r\n", body]
        self.queue.append((b"".join(out), self.parser.should_keep_alive()))
        self.next()

    def next(self):
        if not self.busy and self.queue and self.transport.connected:
            self.busy = True
            data, self.keep = self.queue.popleft()
            self.pool.request(data, self)

    def respond(self, status, reason, headers, body):
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        out += [n + b": " + v + b"\r\n" for n, v in headers if n.lower() not in HOP]
        out.append(
            b"content-length: %d\r\n%s\r\n" % (len(body), b"" if self.keep else b"connection: close\r\n")
        )
        out.append(body)
        self.finish(b"".join(out))

    def fail(self):
        self.keep = False
        self.finish(BAD_GATEWAY)

    def finish(self, data):
        self.busy = False
        if self.transport.connected:
            self.transport.write(data)
            if self.keep:
                self.next()
            else:
                self.transport.loseConnection()


class Front(protocol.Factory):
    def __init__(self, pool):
        self.pool = pool

    def buildProtocol(self, addr):
        return Downstream(self.pool)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, required=True, help="port on --interface")
    ap.add_argument("--interface", default="127.0.0.1")
    ap.add_argument("--upstream", required=True, help="HOST:PORT")
    args = ap.parse_args()
    host, _, port = args.upstream.rpartition(":")
    reactor.listenTCP(args.listen, Front(Pool(host, int(port))), backlog=1024, interface=args.interface)
    reactor.run()


if __name__ == "__main__":
    main()
