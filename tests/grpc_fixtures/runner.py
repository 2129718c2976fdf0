"""
A real grpcio server or client for the gRPC end-to-end tests, run as a
child process so that grpcio's threads never share the test's reactor.

    python runner.py generate OUTDIR
    python runner.py server OUTDIR PORTFILE
    python runner.py client OUTDIR HOST:PORT SCENARIO [SCENARIO...]

C{generate} compiles C{echo.proto} with C{grpc_tools.protoc} into OUTDIR.
The server binds 127.0.0.1:0 and writes its port to PORTFILE.  The client
runs each scenario against the target and prints one JSON object mapping
scenario names to their results (status code name, details, payload sizes,
metadata) so the test can assert on what a real gRPC client saw.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))


def generate(outdir: str) -> None:
    from grpc_tools import protoc

    os.makedirs(outdir, exist_ok=True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main([
        "grpc_tools.protoc", f"-I{HERE}", f"-I{include}",
        f"--python_out={outdir}", f"--grpc_python_out={outdir}", os.path.join(HERE, "echo.proto"),
    ])
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")


def _load(outdir: str):
    sys.path.insert(0, outdir)
    import echo_pb2
    import echo_pb2_grpc

    return echo_pb2, echo_pb2_grpc


def serve(outdir: str, portfile: str) -> None:
    import grpc

    pb, pb_grpc = _load(outdir)

    def echo_metadata(context) -> None:
        # Request metadata named x-* comes back as initial metadata (x-*-echo)
        # and trailing metadata (x-*-trailer).
        mine = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-")]
        context.send_initial_metadata([(k + "-echo", v) for k, v in mine])
        context.set_trailing_metadata([(k + "-trailer", v) for k, v in mine] + [("x-served-by", "grpcio")])

    def maybe_fail(request, context) -> None:
        if request.sleep:
            time.sleep(request.sleep)
        if request.code:
            context.abort(grpc.StatusCode(_code(request.code)), request.details)

    class Echo(pb_grpc.EchoServicer):
        def Unary(self, request, context):
            echo_metadata(context)
            maybe_fail(request, context)
            return pb.Msg(payload=request.payload, received=len(request.payload))

        def ClientStream(self, request_iterator, context):
            echo_metadata(context)
            total = 0
            count = 0
            for m in request_iterator:
                total += len(m.payload)
                count += 1
            return pb.Msg(received=total, count=count)

        def ServerStream(self, request, context):
            echo_metadata(context)
            for i in range(request.count):
                yield pb.Msg(payload=request.payload, count=i)
            maybe_fail(request, context)

        def Bidi(self, request_iterator, context):
            echo_metadata(context)
            for m in request_iterator:
                yield pb.Msg(payload=m.payload, count=m.count)

    options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20),
               ("grpc.max_concurrent_streams", 2000)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
    pb_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_generic_rpc_handlers((_health_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.rename(tmp, portfile)
    # Exit when the test closes our stdin (or kills us).
    threading.Thread(target=lambda: (sys.stdin.read(), server.stop(0)), daemon=True).start()
    server.wait_for_termination()


def _health_handler():
    """
    grpc.health.v1.Health/Check on raw bytes (no grpcio-health-checking
    needed): the server as a whole ("") and "echo" are SERVING, "sick" is
    NOT_SERVING, "slow" never answers in time, anything else is NOT_FOUND,
    as grpcio's own health servicer does.
    """
    import grpc

    def check(request: bytes, context) -> bytes:
        # HealthCheckRequest: field 1 (service), length-delimited.
        service = request[2:].decode() if request[:1] == b"\x0a" else ""
        if service in ("", "echo"):
            return b"\x08\x01"
        if service == "sick":
            return b"\x08\x02"
        if service == "slow":
            time.sleep(2)
            return b"\x08\x01"
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")

    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=None, response_serializer=None),
    })


def _code(number: int):
    import grpc

    for c in grpc.StatusCode:
        if c.value[0] == number:
            return c.value
    raise ValueError(number)


def _status(code) -> str:
    return code.name if code is not None else "OK"


def run_client(outdir: str, target: str, scenarios: list[str]) -> dict:
    import grpc

    pb, pb_grpc = _load(outdir)
    options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
    channel = grpc.insecure_channel(target, options=options)
    stub = pb_grpc.EchoStub(channel)
    meta = (("x-client", "hello"),)
    results = {}

    def record(name, fn):
        try:
            results[name] = fn()
        except grpc.RpcError as e:
            results[name] = {
                "status": _status(e.code()), "details": e.details(),
                "trailing": dict((k, v) for k, v in (e.trailing_metadata() or ()) if isinstance(v, str)),
                "initial": dict((k, v) for k, v in (e.initial_metadata() or ()) if isinstance(v, str)),
            }

    def unary():
        reply, call = stub.Unary.with_call(pb.Msg(payload=b"ping"), metadata=meta, timeout=20)
        return {"status": _status(call.code()), "payload": reply.payload.decode(),
                "initial": dict(call.initial_metadata()), "trailing": dict(call.trailing_metadata())}

    def client_stream():
        msgs = (pb.Msg(payload=b"x" * 1000) for _ in range(100))
        reply, call = stub.ClientStream.with_call(msgs, metadata=meta, timeout=20)
        return {"status": _status(call.code()), "received": reply.received, "count": reply.count}

    def server_stream():
        call = stub.ServerStream(pb.Msg(payload=b"y" * 100, count=50), metadata=meta, timeout=20)
        counts = [m.count for m in call]
        return {"status": _status(call.code()), "counts": counts, "initial": dict(call.initial_metadata()),
                "trailing": dict(call.trailing_metadata())}

    def bidi():
        acks: queue.Queue = queue.Queue()

        def requests():
            # Ping-pong: each message waits for the previous echo, so the
            # proxy must stream both ways at once.
            for i in range(20):
                yield pb.Msg(payload=b"z" * i, count=i)
                acks.get(timeout=10)

        replies = []
        call = stub.Bidi(requests(), metadata=meta, timeout=20)
        for m in call:
            replies.append(m.count)
            acks.put(None)
        return {"status": _status(call.code()), "counts": replies}

    def large():
        big = os.urandom(4 << 20)
        reply = stub.Unary(pb.Msg(payload=big), timeout=30)
        up = stub.ClientStream(iter([pb.Msg(payload=big), pb.Msg(payload=big)]), timeout=30)
        down = list(stub.ServerStream(pb.Msg(payload=big, count=3), timeout=30))
        return {"status": "OK", "same": reply.payload == big, "received": up.received,
                "down": [len(m.payload) for m in down], "down_same": all(m.payload == big for m in down)}

    def concurrent():
        n = 1000
        started = time.monotonic()
        calls = [stub.Unary.future(pb.Msg(payload=str(i).encode()), timeout=60) for i in range(n)]
        ok = sum(1 for i, f in enumerate(calls) if f.result().payload == str(i).encode())
        return {"status": "OK", "ok": ok, "seconds": time.monotonic() - started}

    def deadline():
        started = time.monotonic()
        try:
            stub.Unary(pb.Msg(payload=b"slow", sleep=3.0), timeout=0.5)
        except grpc.RpcError as e:
            return {"status": _status(e.code()), "details": e.details(), "seconds": time.monotonic() - started}
        return {"status": "OK", "seconds": time.monotonic() - started}

    def error():
        stub.Unary(pb.Msg(code=5, details="no such thing: caf\u00e9 100% gone"), metadata=meta, timeout=20)
        return {"status": "OK"}

    def stream_error():
        call = stub.ServerStream(pb.Msg(payload=b"s", count=3, code=9, details="half way"), timeout=20)
        got = []
        try:
            for m in call:
                got.append(m.count)
        except grpc.RpcError as e:
            return {"status": _status(e.code()), "details": e.details(), "counts": got}
        return {"status": "OK", "counts": got}

    def plain():
        # One ordinary call, for tests where the proxy answers it.
        stub.Unary(pb.Msg(payload=b"ping"), timeout=20)
        return {"status": "OK"}

    table = {
        "unary": unary, "client_stream": client_stream, "server_stream": server_stream, "bidi": bidi,
        "large": large, "concurrent": concurrent, "deadline": deadline, "error": error,
        "stream_error": stream_error, "plain": plain,
    }
    for name in scenarios:
        record(name, table[name])
    channel.close()
    return results


def main(argv: list[str]) -> None:
    cmd = argv[1]
    if cmd == "generate":
        generate(argv[2])
    elif cmd == "server":
        serve(argv[2], argv[3])
    elif cmd == "client":
        print(json.dumps(run_client(argv[2], argv[3], argv[4:])))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
