#!/usr/bin/env python3
"""The crate lists that packaging/check-supply-chain.sh compares, one `name version` a line,
sorted, unique:

    dep-list.py lock TARGET       what Cargo.lock resolves for the agent on TARGET: every crate
                                  reached from secoda-agent by normal and build dependencies,
                                  never by a dev-dependency (cargo metadata's resolve)
    dep-list.py binary FILE       the crates in FILE's .dep-v0 section (cargo auditable)
    dep-list.py sbom FILE         the components of a CycloneDX JSON SBOM (cargo cyclonedx)

All three hold build-time crates (build scripts' and proc macros' dependencies) too: cargo
auditable and cargo cyclonedx both record them, marked as such, as scanners expect. Both take
the set from cargo metadata, which also counts optional crates that only a weak feature
(`dep?/feature`) names without enabling: the README lists the handful that are listed but not
compiled in.

`binary` exits 1 when the section is missing (a stripping step or a linker that dropped it).
The ELF is read here, not with binutils: Debian's objcopy does not read the aarch64 binary.
"""
import json
import subprocess
import struct
import sys
import zlib


def section(path, wanted):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        sys.exit(f"{path}: not a 64-bit ELF file")
    end = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(end + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)

    def header(i):
        # name, type, flags, addr, offset, size
        return struct.unpack_from(end + "IIQQQQ", data, shoff + i * shentsize)

    names = header(shstrndx)
    for i in range(shnum):
        name, _, _, _, offset, size = header(i)
        start = names[4] + name
        if data[start:data.index(b"\0", start)].decode() == wanted:
            return data[offset:offset + size]
    return None


def binary(path):
    raw = section(path, ".dep-v0")
    if raw is None:
        print(f"{path}: no .dep-v0 section (built without cargo auditable, or stripped of it)",
              file=sys.stderr)
        sys.exit(1)
    info = json.loads(zlib.decompress(raw))
    return {f"{p['name']} {p['version']}" for p in info["packages"]}


def lock(target):
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", target]))
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = next(p["id"] for p in meta["packages"] if p["name"] == "secoda-agent")
    seen, todo = {root}, [root]
    while todo:
        for dep in nodes[todo.pop()]["deps"]:
            if any(k["kind"] != "dev" for k in dep["dep_kinds"]) and dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                todo.append(dep["pkg"])
    return {f"{packages[i]['name']} {packages[i]['version']}" for i in seen}


def sbom(path):
    with open(path) as f:
        doc = json.load(f)
    # The agent itself (its nested components are its lib and bin targets), then the crates.
    root = doc["metadata"]["component"]
    return {f"{root['name']} {root['version']}"} | {
        f"{c['name']} {c['version']}" for c in doc.get("components", [])}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("lock", "binary", "sbom"):
        sys.exit(__doc__)
    kind, arg = sys.argv[1], sys.argv[2]
    for line in sorted({"lock": lock, "binary": binary, "sbom": sbom}[kind](arg)):
        print(line)
