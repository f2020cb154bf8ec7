#!/usr/bin/env python3
"""Side-by-side table of blkbench chaos=1 answers: ringvm vs QEMU.

usage: scripts/chaos-compare.py RINGVM_CONSOLE QEMU_CONSOLE [LABEL]

Each file holds a console (or the JSON line alone); the line starting with
{"blkbench_chaos":1, is read. ringvm must pass every case (tests/chaos.rs holds it
to that as well); QEMU's answers are reported, not judged: where it differs (e.g.
it "serves" a buffer outside guest RAM by discarding the data) that is its
behaviour, shown in the table. Exits 1 when a console has no chaos line or ringvm
failed a case.
"""
import json
import sys


def chaos_line(path):
    with open(path, errors="replace") as f:
        for line in f:
            i = line.find('{"blkbench_chaos":1,')
            if i >= 0:
                return json.loads(line[i:])
    return None


def answer(c, mark="FAIL"):
    if c is None:
        return "-"
    a = c["observed"]
    if a == "no_status" and "used_len" in c:
        a += f"(len {c['used_len']})"
    if c.get("served_after") is False:
        a += ", then stopped serving"
    if not c.get("recovered", True):
        a += ", no recovery"
    return a + ("" if c["pass"] else f" [{mark}]")


def main():
    rv, qm = chaos_line(sys.argv[1]), chaos_line(sys.argv[2])
    label = sys.argv[3] if len(sys.argv) > 3 else ""
    if rv is None or qm is None:
        print(f"chaos-compare: no chaos line from {'ringvm' if rv is None else 'QEMU'}", file=sys.stderr)
        return 1
    qcases = {c["case"]: c for c in qm["cases"]}
    print(f"chaos=1 {label}: ringvm {rv['passed']} passed, {rv['failed']} failed; "
          f"QEMU {qm['passed']} within ringvm's accepted set, {qm['failed']} outside it")
    w = max(len(c["case"]) for c in rv["cases"])
    print(f"  {'case':<{w}}  {'accepted':<32}  {'ringvm':<24}  QEMU")
    for c in rv["cases"]:
        q = qcases.get(c["case"])
        same = "" if q is None or q["observed"] == c["observed"] else "  (differs)"
        print(f"  {c['case']:<{w}}  {c['expected']:<32}  {answer(c):<24}  {answer(q, 'not accepted')}{same}")
    return 1 if rv["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
