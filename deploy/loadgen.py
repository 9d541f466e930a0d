#!/usr/bin/env python3
"""Client load for the local Docker cluster, driven through `gate-client` (no other client
exists outside gate-bench, whose scenarios start their own servers). Used by
`deploy/cluster.sh rolling-upgrade` and `deploy/cluster.sh load`.

    loadgen.py --gate-client BIN --ca CA --hmac-key KEY --routable FILE --out DIR
               [--listeners 24] [--requesters 3] [--rate 1] [--batch 20] [--duration 60]
               [--phase-file FILE]

* Listeners: long-lived sessions (one gate-client --listen each), spread over the data planes
  that are routable at start, all in zone 001, all members of one room (`lobby-<random>`, new each run) of up-001. They
  never reconnect on their own: a drained node's GoAway makes the SDK resume the session on the
  target node, as a real client would.
* Requesters: every 1/--rate seconds each requester slot runs one gate-client against the next
  routable data plane (FILE lists `ip:port` of nodes that are ready and not draining, what a
  Service would route new flows to), sending `join`, `say <room> <id>`, `echo`s and
  `leave` (--batch requests in all).
  Requests are serial; the time between two response lines is one request's latency (the first
  request also pays the QUIC handshake and is reported apart).
* Each `say` that answers pushed>0 must reach every listener exactly once: a listener that
  never gets it counts a lost push, one that gets it twice a duplicate.
* A `say` the demo answers with "k of N pushes failed" (app code PUSH_FAILED) is a failed
  request only if some listener missed it. If every listener got it, the refused pushes went
  to room members that are not listeners: other requesters, whose gate-client may already
  have exited or whose session is between nodes (NOT_FOUND). That is the upstream being told
  a push did not land, not a failed client request: it is counted apart, as `gone` (says) and
  `say_pushes_to_gone_members` (refused pushes) in the summary.

The phase file (written by cluster.sh) holds a label such as `before` or `during`; every
sample is tagged with the label current when it was taken. Output: DIR/summary.json and a
table on stdout.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def zone_of(openid, zones=6):
    h = FNV_OFFSET
    for b in openid.encode():
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return "%03d" % (h % zones + 1)


def ids_in_zone(prefix, n, zone="001"):
    out, i = [], 0
    while len(out) < n:
        oid = f"{prefix}{i}"
        if zone_of(oid) == zone:
            out.append(oid)
        i += 1
    return out


def read_lines(path):
    try:
        with open(path) as f:
            return [l.strip() for l in f if l.strip()]
    except FileNotFoundError:
        return []


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


class Run:
    def __init__(self, a):
        self.a = a
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.phase_file = a.phase_file
        # listener -> content -> count
        self.received = {}
        self.listener_events = []   # (phase, listener, event dict)
        self.says = []              # (phase, say_id, pushed)
        self.requests = []          # (phase, kind, ok, latency_s or None, detail)
        self.runs = []              # (phase, exit code)

    def phase(self):
        lines = read_lines(self.phase_file) if self.phase_file else []
        return lines[0] if lines else "run"

    room = "lobby-%d" % random.randrange(1 << 30)  # one room per run: no members left over

    def base_cmd(self, addr, openid):
        a = self.a
        return [a.gate_client, "--addr", addr, "--ca", a.ca, "--openid", openid,
                "--token-secret-file", a.hmac_key, "--timeout", "10s"]

    # ---- listeners ----
    def listener(self, openid, addr, ready):
        cmd = self.base_cmd(addr, openid) + ["--send", "join " + self.room, "--listen", f"{self.a.duration + 60}s"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        with self.lock:
            self.received[openid] = {}
        joined = False
        for line in p.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            t = ev.get("type")
            if t == "response" and not joined:
                joined = True
                ready.release()
                continue
            if t == "push":
                # the demo's chat push: content = the text said (the say id)
                content = ev.get("content") or ""
                with self.lock:
                    d = self.received[openid]
                    d[content] = d.get(content, 0) + 1
                    if ev.get("redelivery"):
                        self.listener_events.append((self.phase(), openid, {"type": "redelivery"}))
            elif t in ("connected", "goaway", "resume_failed", "disconnected"):
                with self.lock:
                    self.listener_events.append((self.phase(), openid, ev))
        p.wait()
        if not joined:
            ready.release()
        err = p.stderr.read().strip()
        with self.lock:
            self.listener_events.append((self.phase(), openid, {"type": "exit", "code": p.returncode, "stderr": err[-300:]}))

    # ---- requesters ----
    def request_batch(self, slot, k, addr):
        openid = self.requester_ids[slot]
        say_id = f"r{slot}-{k}"
        # join first (the demo refuses `say` from non-members), leave last (no pushes queue up
        # for a requester that is gone)
        sends = (["join " + self.room, "say %s %s" % (self.room, say_id)]
                 + ["echo %d-%d" % (k, j) for j in range(max(0, self.a.batch - 3))] + ["leave " + self.room])
        cmd = self.base_cmd(addr, openid)
        for s in sends:
            cmd += ["--send", s]
        phase = self.phase()
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        last = None
        n = 0
        for line in p.stdout:
            now = time.monotonic()
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            t = ev.get("type")
            if t == "connected":
                continue
            if t not in ("response", "error"):
                continue
            first = n == 0
            lat = now - (t0 if first else last)
            last = now
            ok = t == "response" and ev.get("app_code", 0) == 0
            kind = "first" if first else "request"
            detail = None if ok else (ev.get("message") or ev.get("code") or ev.get("payload"))
            if n == 1 and t == "response" and not ok:
                # A say with refused pushes: judged in report() against what listeners got.
                try:
                    refused = int(json.loads(ev["payload"]).get("failed", 0))
                except (ValueError, KeyError, TypeError, AttributeError):
                    refused = 0
                if refused > 0:
                    kind = "say_partial"
                    detail = {"say_id": say_id, "refused": refused, "message": detail}
            if n == 1:
                # the say: remember what it pushed
                pushed = 0
                try:
                    body = json.loads(ev["payload"]) if t == "response" else {}
                    pushed = int(body.get("pushed", 0))
                except (ValueError, KeyError, TypeError):
                    pass
                with self.lock:
                    self.says.append((phase, say_id, pushed, t == "response"))
            with self.lock:
                self.requests.append((phase, kind, ok, lat, detail))
            n += 1
        p.wait()
        err = p.stderr.read().strip()
        with self.lock:
            for _ in range(n, len(sends)):  # never answered (connect failed, crash)
                self.requests.append((phase, "missing", False, None, err[-200:] or f"exit {p.returncode}"))
            self.runs.append((phase, p.returncode))

    def requester_loop(self, slot):
        k = 0
        period = 1.0 / self.a.rate
        nxt = time.monotonic() + slot * period / max(1, self.a.requesters)
        while not self.stop.is_set():
            time.sleep(max(0, nxt - time.monotonic()))
            nxt += period
            routable = read_lines(self.a.routable)
            if not routable:
                continue
            addr = routable[(k + slot) % len(routable)]
            self.request_batch(slot, k, addr)
            k += 1

    def main(self):
        a = self.a
        self.procs = []
        routable = read_lines(a.routable)
        if not routable:
            sys.exit("loadgen: no routable data plane in " + a.routable)
        listener_ids = ids_in_zone("lis-%d-" % random.randrange(1 << 30), a.listeners)
        self.requester_ids = ids_in_zone("req-%d-" % random.randrange(1 << 30), a.requesters)
        ready = threading.Semaphore(0)
        threads = []
        for i, oid in enumerate(listener_ids):
            t = threading.Thread(target=self.listener, args=(oid, routable[i % len(routable)], ready), daemon=True)
            t.start()
            threads.append(t)
        for _ in listener_ids:
            ready.acquire(timeout=30)
        time.sleep(0.5)
        print(f"loadgen: {len(listener_ids)} listeners joined {self.room} (zone 001) over {len(routable)} nodes; "
              f"{a.requesters} requesters x {a.rate}/s x {a.batch} requests", file=sys.stderr, flush=True)
        if a.ready_file:
            open(a.ready_file, "w").write("ready\n")
        reqs = [threading.Thread(target=self.requester_loop, args=(s,), daemon=True) for s in range(a.requesters)]
        for t in reqs:
            t.start()
        end = time.monotonic() + a.duration
        while time.monotonic() < end:
            if a.stop_file and os.path.exists(a.stop_file):
                break
            time.sleep(0.5)
        self.stop.set()
        for t in reqs:
            t.join()
        time.sleep(a.settle)  # pushes still in flight, redeliveries
        for p in self.procs:
            p.terminate()
        for t in threads:
            t.join(timeout=10)
        self.report(listener_ids)

    def report(self, listener_ids):
        phases = []
        for ph, *_ in self.requests + self.says + self.listener_events:
            if ph not in phases:
                phases.append(ph)
        out = {"listeners": len(listener_ids), "requesters": self.a.requesters,
               "rate_per_requester": self.a.rate, "batch": self.a.batch, "phases": {}}
        def to_gone_members(r):
            # Refused pushes only to members that are not listeners: every listener got it.
            return r[1] == "say_partial" and all(
                self.received.get(oid, {}).get(r[4]["say_id"], 0) > 0 for oid in listener_ids)

        for ph in phases:
            rq = [r for r in self.requests if r[0] == ph]
            gone = [r for r in rq if to_gone_members(r)]
            lat = [r[3] * 1000 for r in rq if (r[1] == "request" and r[2]) or to_gone_members(r)]
            first = [r[3] * 1000 for r in rq if r[1] == "first" and r[2]]
            failed = [r for r in rq if not r[2] and not to_gone_members(r)]
            says = [s for s in self.says if s[0] == ph and s[3] and s[2] > 0]
            lost = dup = expected = 0
            for _, sid, pushed, _ in says:
                for oid in listener_ids:
                    c = self.received[oid].get(sid, 0)
                    expected += 1
                    if c == 0:
                        lost += 1
                    elif c > 1:
                        dup += c - 1
            ev = [e for e in self.listener_events if e[0] == ph]
            conn = [e for e in ev if e[2].get("type") == "connected"]
            statuses = {}
            for e in conn:
                statuses[e[2].get("status")] = statuses.get(e[2].get("status"), 0) + 1
            out["phases"][ph] = {
                "requests": len(rq),
                "failed_requests": len(failed),
                "failures": sorted({str(f[4]["message"] if isinstance(f[4], dict) else f[4])[:120]
                                    for f in failed})[:5],
                "says_to_gone_members": len(gone),
                "say_pushes_to_gone_members": sum(r[4]["refused"] for r in gone),
                "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat) if lat else None,
                "first_request_p99_ms": pct(first, 99),
                "says_pushed": len(says), "pushes_expected": expected,
                "pushes_lost": lost, "pushes_duplicated": dup,
                "listener_connects": statuses,
                "goaways": sum(1 for e in ev if e[2].get("type") == "goaway"),
                "resume_failed": sum(1 for e in ev if e[2].get("type") == "resume_failed"),
                "disconnected": sum(1 for e in ev if e[2].get("type") == "disconnected"),
                "redeliveries": sum(1 for e in ev if e[2].get("type") == "redelivery"),
                "listener_exits": [e[2] for e in ev if e[2].get("type") == "exit" and e[2].get("code") not in (0, None, -15)][:3],
            }
        os.makedirs(self.a.out, exist_ok=True)
        with open(os.path.join(self.a.out, "summary.json"), "w") as f:
            json.dump(out, f, indent=2)
        hdr = "%-8s %8s %7s %5s %8s %8s %8s %6s %6s %5s %-28s %7s %7s" % (
            "phase", "requests", "failed", "gone", "p50 ms", "p99 ms", "max ms", "pushes", "lost", "dup",
            "listener (re)connects", "goaway", "resfail")
        print(hdr)
        for ph, s in out["phases"].items():
            fmt = lambda v: "-" if v is None else "%.1f" % v
            print("%-8s %8d %7d %5d %8s %8s %8s %6d %6d %5d %-28s %7d %7d" % (
                ph, s["requests"], s["failed_requests"], s["says_to_gone_members"],
                fmt(s["p50_ms"]), fmt(s["p99_ms"]),
                fmt(s["max_ms"]), s["pushes_expected"], s["pushes_lost"], s["pushes_duplicated"],
                ",".join(f"{k}={v}" for k, v in sorted(s["listener_connects"].items(), key=str)),
                s["goaways"], s["resume_failed"]))
            for f in s["failures"]:
                print("          failure: " + f)
            for e in s["listener_exits"]:
                print("          listener exit: " + json.dumps(e))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gate-client", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--hmac-key", required=True)
    ap.add_argument("--routable", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--listeners", type=int, default=24)
    ap.add_argument("--requesters", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1.0, help="batches per second per requester")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--settle", type=float, default=5)
    ap.add_argument("--phase-file")
    ap.add_argument("--ready-file")
    ap.add_argument("--stop-file")
    Run(ap.parse_args()).main()


if __name__ == "__main__":
    main()
