#!/usr/bin/env python3
"""Checks scripts/oci-image.py: builds an image of a small system binary twice and
asserts that the archives are byte-identical (reproducible), that the layout is a valid
OCI image (digests and sizes match their blobs, diff_id matches the uncompressed
layer, names in index.json), and that the rootfs holds what the images promise and
nothing more (the binary, its libraries and loader, CA bundle, passwd/group with
nonroot 65532, no shell; fixed times and owners, sorted entries). Exits non-zero on
any failure. Run by scripts/test-all.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


def build(binary, out, epoch):
    subprocess.run(
        [sys.executable, os.path.join(HERE, "oci-image.py"), "--binary", binary,
         "--path", "/usr/local/bin/probe", "--repository", "example.test/probe",
         "--tag", "9.9.9", "--port", "8080", "--port", "8081", "--out", out,
         "--epoch", str(epoch), "--revision", "abc"],
        check=True, capture_output=True,
    )


def main():
    binary = shutil.which("true")
    with tempfile.TemporaryDirectory() as tmp:
        a, b, c = (os.path.join(tmp, n) for n in ("a.tar", "b.tar", "c.tar"))
        build(binary, a, 1700000000)
        build(binary, b, 1700000000)
        build(binary, c, 1700000001)
        with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
            da, db, dc = fa.read(), fb.read(), fc.read()
        check(da == db, "two builds of the same inputs differ")
        check(da != dc, "the epoch does not reach the image")

        outer = tarfile.open(a)
        names = outer.getnames()
        check(names == sorted(names), f"archive entries not sorted: {names}")
        blobs = {n: outer.extractfile(n).read() for n in names if n.startswith("blobs/sha256/") and outer.getmember(n).isfile()}
        for name, data in blobs.items():
            check(name.rsplit("/", 1)[1] == hashlib.sha256(data).hexdigest(), f"{name}: digest mismatch")
        layout = json.loads(outer.extractfile("oci-layout").read())
        check(layout == {"imageLayoutVersion": "1.0.0"}, f"oci-layout {layout}")
        index = json.loads(outer.extractfile("index.json").read())
        desc = index["manifests"][0]
        check(desc["annotations"]["org.opencontainers.image.ref.name"] == "9.9.9", f"ref.name {desc}")
        check(desc["annotations"]["io.containerd.image.name"] == "example.test/probe:9.9.9", f"name {desc}")
        manifest_blob = blobs["blobs/sha256/" + desc["digest"].split(":")[1]]
        check(len(manifest_blob) == desc["size"], "manifest size")
        manifest = json.loads(manifest_blob)
        config_blob = blobs["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]]
        config = json.loads(config_blob)
        layer_gz = blobs["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
        check(len(layer_gz) == manifest["layers"][0]["size"], "layer size")
        layer = gzip.decompress(layer_gz)
        check(config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()], "diff_id")
        check(config["config"]["User"] == "65532:65532", f"user {config['config']}")
        check(config["config"]["Entrypoint"] == ["/usr/local/bin/probe"], "entrypoint")
        check(set(config["config"]["ExposedPorts"]) == {"8080/tcp", "8081/tcp"}, "ports")
        check(config["created"] == "2023-11-14T22:13:20Z", f"created {config['created']}")
        docker = json.loads(outer.extractfile("manifest.json").read())
        check(docker[0]["RepoTags"] == ["example.test/probe:9.9.9"], f"manifest.json {docker}")

        rootfs = tarfile.open(fileobj=io.BytesIO(layer))
        members = rootfs.getmembers()
        paths = [m.name for m in members]
        check(paths == sorted(paths), "layer entries not sorted")
        for m in members:
            check(m.mtime == 1700000000, f"{m.name}: mtime {m.mtime}")
            check(m.uname == "" and m.gname == "", f"{m.name}: owner names")
            owner = 65532 if m.name == "home/nonroot" else 0
            check(m.uid == owner and m.gid == owner, f"{m.name}: owner {m.uid}:{m.gid}")
        check("usr/local/bin/probe" in paths, "the binary")
        for shell in ("bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/bash", "bin/busybox"):
            check(shell not in paths, f"a shell: {shell}")
        check("etc/ssl/certs/ca-certificates.crt" in paths, "CA bundle")
        passwd = rootfs.extractfile("etc/passwd").read().decode()
        check("nonroot:x:65532:65532:" in passwd, f"passwd {passwd}")
        check(rootfs.getmember("tmp").mode == 0o1777, "tmp mode")
        # The loader the binary names resolves inside the layer.
        interp = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        loader = [l.split()[0] for l in interp.splitlines() if l.strip().startswith("/")]
        for path in loader:
            rel = path.lstrip("/")
            seen = set()
            while rel not in seen:
                seen.add(rel)
                parts = rel.split("/")
                for i in range(1, len(parts) + 1):
                    prefix = "/".join(parts[:i])
                    m = rootfs.getmember(prefix) if prefix in paths else None
                    check(m is not None, f"loader path {prefix} missing")
                    if m is None:
                        break
                    if m.issym():
                        target = os.path.normpath(os.path.join(os.path.dirname("/" + prefix), m.linkname)).lstrip("/")
                        rel = "/".join([target] + parts[i:])
                        break
                else:
                    break
    if failures:
        print("oci-image check failed:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("oci-image check: reproducible, valid layout, minimal rootfs")


if __name__ == "__main__":
    main()
