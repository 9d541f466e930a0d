#!/usr/bin/env python3
"""A GateSvr upstream in Python, written from the .proto files and
docs/protocol.md sections 13 and 14 alone (no GateSvr code).

It serves the streaming contract (UpstreamStreamService.Open) and, for the
data plane's health probe and unary callers, UpstreamService (GetStatus,
ProcessRequest). Commands, one per request payload:

    echo <text>   answers <text>
    push <text>   pushes <text> (msg_type "py") to the caller over the
                  stream the request came on, then answers "pushed <seq>"

Anything else: app_code 1. Needs grpcio and grpcio-tools (PyPI); the stubs
are generated from the proto files at start.

    stream_upstream.py --port 50071 --zone 003 --proto-root ../../../proto
"""

import argparse
import itertools
import os
import queue
import sys
import tempfile
import threading
from concurrent import futures

import grpc
from grpc_tools import protoc

WINDOW = 64  # max_requests_in_flight we announce


def load_stubs(proto_root):
    out = tempfile.mkdtemp(prefix="gatesvr-py-")
    files = ["gatesvr/upstream/v1/upstream.proto", "gatesvr/upstream/v1/stream.proto"]
    rc = protoc.main(
        ["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}"] + files
    )
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    from gatesvr.upstream.v1 import stream_pb2, stream_pb2_grpc, upstream_pb2, upstream_pb2_grpc

    return upstream_pb2, upstream_pb2_grpc, stream_pb2, stream_pb2_grpc


def main():
    args = argparse.ArgumentParser()
    args.add_argument("--port", type=int, required=True)
    args.add_argument("--zone", default="")
    args.add_argument(
        "--proto-root",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "proto"),
    )
    opts = args.parse_args()
    up, up_grpc, st, st_grpc = load_stubs(opts.proto_root)
    workers = futures.ThreadPoolExecutor(max_workers=WINDOW)

    def run(text):
        """Executes a command that needs no stream."""
        if text.startswith("echo "):
            return up.ProcessRequestResponse(app_code=0, payload=text[5:].encode())
        return up.ProcessRequestResponse(app_code=1, message="unknown command")

    class Stream(st_grpc.UpstreamStreamServiceServicer):
        def Open(self, frames, context):
            out = queue.Queue()  # UpstreamFrames to write; None ends the stream
            waiting = {}  # push id -> (event, [StreamPushResult])
            push_ids = itertools.count(1)
            inflight = [0]
            lock = threading.Lock()

            def push(openid, content):
                pid = next(push_ids)
                done, box = threading.Event(), []
                with lock:
                    waiting[pid] = (done, box)
                out.put(
                    st.UpstreamFrame(
                        push=st.StreamPush(
                            id=pid,
                            push=up.PushToClientRequest(
                                target_type=up.TARGET_TYPE_OPENID,
                                target_id=openid,
                                msg_type="py",
                                content=content,
                            ),
                        )
                    )
                )
                if not done.wait(10):
                    return None
                return box[0]

            def handle(sreq):
                req = sreq.request
                text = req.payload.decode("utf-8", "replace")
                if text.startswith("push "):
                    result = push(req.openid, text[5:])
                    if result is not None and result.code == 0:
                        answer = up.ProcessRequestResponse(
                            app_code=0, payload=f"pushed {result.seq_id}".encode()
                        )
                    else:
                        answer = up.ProcessRequestResponse(app_code=4, message="push failed")
                else:
                    answer = run(text)
                out.put(st.UpstreamFrame(response=st.StreamResponse(id=sreq.id, response=answer)))
                with lock:
                    inflight[0] -= 1

            def read():
                try:
                    for frame in frames:
                        kind = frame.WhichOneof("body")
                        if kind == "request":
                            with lock:
                                full = inflight[0] >= WINDOW
                                if not full:
                                    inflight[0] += 1
                            if full:
                                out.put(
                                    st.UpstreamFrame(
                                        response=st.StreamResponse(
                                            id=frame.request.id, not_executed=True
                                        )
                                    )
                                )
                            else:
                                workers.submit(handle, frame.request)
                        elif kind == "push_result":
                            with lock:
                                entry = waiting.pop(frame.push_result.id, None)
                            if entry is not None:
                                entry[1].append(frame.push_result.result)
                                entry[0].set()
                        # hello, cancel, broadcast_result, drain: nothing to do here
                except grpc.RpcError:
                    pass
                out.put(None)

            out.put(
                st.UpstreamFrame(
                    hello=st.UpstreamHello(
                        version=1,
                        service_name="python-example",
                        zone=opts.zone,
                        max_requests_in_flight=WINDOW,
                        serving=True,
                    )
                )
            )
            threading.Thread(target=read, daemon=True).start()
            while True:
                frame = out.get()
                if frame is None:
                    return
                yield frame

    class Unary(up_grpc.UpstreamServiceServicer):
        def ProcessRequest(self, request, context):
            return run(request.payload.decode("utf-8", "replace"))

        def GetStatus(self, request, context):
            return up.UpstreamStatus(service_name="python-example", zone=opts.zone, healthy=True)

    # One thread per open stream plus its reader, and the handlers' own pool.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    st_grpc.add_UpstreamStreamServiceServicer_to_server(Stream(), server)
    up_grpc.add_UpstreamServiceServicer_to_server(Unary(), server)
    server.add_insecure_port(f"127.0.0.1:{opts.port}")
    server.start()
    print("READY", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
