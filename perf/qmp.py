"""A minimal QMP client for the perf scripts: connect to QEMU's monitor socket and run
commands (used to find and pin QEMU's vCPU, IOThread and main-loop threads)."""

import json
import socket
import time


class Qmp:
    def __init__(self, path, tries=200):
        """`path` is a socket path, or "@name" for an abstract socket; waits for QEMU."""
        addr = "\0" + path[1:] if path.startswith("@") else path
        for _ in range(tries):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(addr)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("qmp: no socket")
        self.f = s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name):
        self.f.write(json.dumps({"execute": name}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                return r.get("return")
