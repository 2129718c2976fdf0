"""
Write the seed corpora under C{fuzz/corpus/<target>/}: a few valid inputs
per target, so the fuzzer starts deep in the code instead of having to
discover C{HTTP/1.1} or a length-prefixed JSON frame on its own.

    .venv/bin/python fuzz/make_corpus.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import CORPUS_DIR  # noqa: E402


def _http1_request() -> dict[str, bytes]:
    # First byte: options (bit 0: forward-proxy listener).
    return {
        "get": b"\0GET /a?b HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n",
        "post_content_length": b"\0POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello",
        "chunked_trailers": (b"\0POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nte: trailers\r\n\r\n"
                             b"5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"),
        "pipelined": (b"\0GET / HTTP/1.1\r\nhost: a\r\n\r\nGET /2 HTTP/1.0\r\n\r\n"
                      b"HEAD /3 HTTP/1.1\r\nhost: b:80\r\nconnection: close, x-drop\r\nx-drop: 1\r\n\r\n"),
        "upgrade": b"\0GET /ws HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\ntunnel",
        "connect": b"\0CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n\x16\x03\x01",
        "absolute_form": (b"\x01GET http://example.com:8080/x?y HTTP/1.1\r\nhost: other\r\n"
                          b"proxy-authorization: Basic eDp5\r\n\r\n"),
        "options_star": b"\0OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n",
    }


def _http1_response() -> dict[str, bytes]:
    # First byte: bit 0 the request was HEAD, bit 1 the upstream closes after.
    return {
        "content_length": b"\0HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello",
        "chunked": b"\0HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n",
        "close_delimited": b"\x02HTTP/1.0 200 OK\r\nconnection: close\r\n\r\nbody until close",
        "head": b"\x01HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
        "continue_then_204": b"\0HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nx: y\r\n\r\n",
        "switching": b"\0HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\0",
    }


def _http2_server() -> dict[str, bytes]:
    # Programs for fuzz.targets.http2_server, written the way it reads them.
    def headers(flags: int, stream_index: int, names_values: list[tuple[int, int]]) -> bytes:
        out = bytes([0, flags, 1, stream_index, 1, len(names_values)])
        for name, value in names_values:
            out += bytes([1, name, 1, value])
        return out

    get = [(0, 0), (1, 3), (2, 5), (3, 6)]  # :method GET, :scheme http, :authority example.com, :path /
    post = [(0, 1), (1, 3), (2, 5), (3, 7)]  # POST /a?b
    answer = bytes([5, 0, 0, 0, 0, 1])  # the terminal answers stream 0: 200, no body
    head = bytes([5, 0, 1, 0, 0, 0])  # ... a 200 head, a body to follow
    data = bytes([5, 0, 1, 0, 5]) + b"hello" + bytes([1])  # ... 5 bytes, the end
    stream_zero = bytes([0, 0, 0, 0])  # "not one of 1, 3, 5, 7", then stream id 0
    return {
        "get_answered": headers(0x5, 0, get) + answer,
        "post_streamed": headers(0x4, 0, post) + bytes([1, 0, 0x1, 1, 0, 4]) + b"body" + answer,
        "two_streams_reset": headers(0x5, 0, get) + headers(0x5, 1, get) + bytes([1, 3, 0, 1, 1, 4]) + b"\0\0\0\x08",
        "goaway": bytes([1, 7, 0]) + stream_zero + bytes([8]) + bytes(8),
        "drain": headers(0x5, 0, get) + bytes([9, 1]) + answer,
        "idle": bytes([7, 39, 7, 39]),
        "window_and_settings": headers(0x5, 0, get) + head + data
        + bytes([1, 8, 0]) + stream_zero + bytes([4]) + b"\0\0\xff\xff"
        + bytes([1, 4, 0]) + stream_zero + bytes([6]) + b"\0\x04\0\0\0\0",
    }


def _config_loader() -> dict[str, bytes]:
    # First byte: 0 proxy config, 1 Istio translation, 2 Gateways,
    # 3 AuthorizationPolicy, 4 PeerAuthentication, 5 RequestAuthentication.
    root = CORPUS_DIR.parent.parent
    seeds = {}
    for name, which in (("examples/demo/frontend-sidecar.yaml", 0), ("examples/demo/canary-50-50.yaml", 0),
                        ("examples/bookinfo/proxy.yaml", 0),
                        ("examples/bookinfo/virtual-services.yaml", 1),
                        ("examples/bookinfo/destination-rules.yaml", 1), ("examples/bookinfo/services.yaml", 1),
                        ("examples/demo/pilot/istio/backend-security.yaml", 3),
                        ("examples/demo/pilot/istio/backend-security.yaml", 4)):
        path = root / name
        if path.exists():
            seeds[f"{which}_{path.stem}"] = bytes([which]) + path.read_bytes()
    seeds["2_gateway"] = b"\x02" + b"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
    - port: {number: 80, name: http, protocol: HTTP}
      hosts: [bookinfo.example.com]
      tls: {httpsRedirect: true}
    - port: {number: 443, name: https, protocol: HTTPS}
      hosts: ["shop/api.example.com"]
      tls: {mode: MUTUAL, credentialName: api-cert}
"""
    seeds["5_request_authentication"] = b"\x05" + b"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  jwtRules:
    - issuer: https://issuer.example.com
      jwksUri: https://issuer.example.com/jwks.json
      audiences: [reviews]
      forwardOriginalToken: true
      fromHeaders: [{name: x-token, prefix: "Bearer "}]
"""
    return seeds


def _pilot_channel() -> dict[str, bytes]:
    from txmesh.pilot.messages import Ack, Hello, Nack, Node, Ping, Push, encode

    hello = Hello(node=Node(id="reviews-v1-7d9f.default", workload="reviews-v1", app="reviews", version="v1",
                            labels={"app": "reviews"}, locality="eu-west/eu-west-1a"),
                  credential="join-token-abc", versions={"routes": "7"})
    push = Push(version="8", nonce="n-1", resources={"routes": [{"name": "reviews", "cluster": "reviews-v1"}],
                                                      "clusters": []})
    # First byte: the size of the reads (0: one read).
    return {
        "hello": b"\0" + encode(hello),
        "hello_push_split": b"\x05" + encode(hello) + encode(push),
        "ack_nack_ping": b"\x03" + encode(Ack(nonce="n-1", version="8"))
        + encode(Nack(nonce="n-2", version="9", error="bad route")) + encode(Ping(id=7)),
    }


def main() -> None:
    for target, seeds in (("http1_request", _http1_request()), ("http1_response", _http1_response()),
                          ("http2_server", _http2_server()), ("config_loader", _config_loader()),
                          ("pilot_channel", _pilot_channel())):
        directory = CORPUS_DIR / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (directory / name).write_bytes(data)


if __name__ == "__main__":
    main()
