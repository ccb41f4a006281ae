"""Checks that a shared library needs no libstdc++ newer than GCC 4.8.5's (GLIBCXX_3.4.19,
CXXABI_1.3.7: CentOS 7, the manylinux2014 baseline), which is the one libmxnet loads there.

    python tools/check_libstdcxx.py LIBRARY [--libstdcxx PATH]

Each symbol LIBRARY leaves undefined (versioned, or unversioned as the wheel's zig build leaves
them) that this machine's libstdc++ defines is looked up there; the oldest version libstdc++
gives it is when it appeared. Exits 1 listing the symbols that appeared later.
"""
import argparse
import re
import subprocess
import sys

NEWEST = {"GLIBCXX": (3, 4, 19), "CXXABI": (1, 3, 7)}
VERSION = re.compile(r"^(GLIBCXX|CXXABI)_(\d+(?:\.\d+)*)$")


def default_libstdcxx():
    out = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True,
                         text=True).stdout.strip()
    return out or "/lib/x86_64-linux-gnu/libstdc++.so.6"


def defined_versions(libstdcxx):
    """{symbol: [(family, version tuple)]} of libstdc++'s dynamic symbols."""
    out = subprocess.run(["objdump", "-T", libstdcxx], capture_output=True, text=True,
                         check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or "*UND*" in line:
            continue
        m = VERSION.match(parts[-2].strip("()"))
        if m:
            table.setdefault(parts[-1], []).append(
                (m.group(1), tuple(int(v) for v in m.group(2).split("."))))
    return table


def undefined(library):
    out = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def too_new(library, libstdcxx):
    table = defined_versions(libstdcxx)
    bad = []
    for name in sorted(undefined(library)):
        if name in table:
            family, version = min(table[name], key=lambda fv: fv[1])
            if version > NEWEST[family]:
                bad.append(f"{name} ({family}_{'.'.join(map(str, version))})")
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("library")
    ap.add_argument("--libstdcxx", default=None)
    args = ap.parse_args(argv)
    bad = too_new(args.library, args.libstdcxx or default_libstdcxx())
    if bad:
        print(f"{args.library} needs a libstdc++ newer than GCC 4.8's:\n  " + "\n  ".join(bad))
        return 1
    print(f"{args.library}: no libstdc++ symbol newer than GLIBCXX_3.4.19 / CXXABI_1.3.7")
    return 0


if __name__ == "__main__":
    sys.exit(main())
