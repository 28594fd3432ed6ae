#!/usr/bin/env python3
"""Writes an OCI image archive for one binary, without a daemon, a registry or a base
image: one rootfs layer assembled from this machine's files, then the config, the
manifest, index.json and oci-layout, packed as one tar (an "oci-archive").

The rootfs is what gcr.io/distroless/cc-debian12:nonroot gives the Dockerfiles, and no
more: the binary, the shared libraries `ldd` lists with the dynamic loader (symlinks
kept as on the build host, so /lib64/ld-linux-x86-64.so.2 resolves as the binary's
PT_INTERP says), /etc/ssl/certs/ca-certificates.crt, /etc/passwd and /etc/group with
root and nonroot (65532), /etc/nsswitch.conf, /home/nonroot, /tmp (1777). No shell.

Deterministic: entries sorted, every mtime = --epoch (SOURCE_DATE_EPOCH, by default the
commit time), uid/gid fixed, no user or group names, gzip without a name or a time,
JSON with sorted keys. The same inputs give the same digests.

The archive also carries a Docker `manifest.json` (as `docker save` writes next to the
OCI layout since Docker 25), so `docker load` of older engines reads it too. Names:
index.json's manifest carries `org.opencontainers.image.ref.name` = the tag (the OCI
convention) and `io.containerd.image.name` = the full reference, which podman, ctr
(and so `kind load image-archive`) and docker use to name the loaded image.

    scripts/oci-image.py --binary target/release/tether-gateway \
        --path /usr/local/bin/tether-gateway --repository ghcr.io/tether-dev/tether-gateway \
        --tag 0.1.0 --port 8080 --port 8081 --out target/images/tether-gateway.tar
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

NONROOT = 65532

PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = "root:x:0:\nnonroot:x:65532:\n"
NSSWITCH = "passwd: files\ngroup: files\nhosts: files dns\n"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class Rootfs:
    """Entries of the layer by absolute path: ("dir", mode, uid), ("file", mode, bytes)
    or ("symlink", target)."""

    def __init__(self):
        self.entries = {}

    def dir(self, path, mode=0o755, owner=0):
        path = path.rstrip("/") or "/"
        if path == "/":
            return
        self.parents(path)
        existing = self.entries.get(path)
        if existing and existing[0] != "dir":
            sys.exit(f"oci-image: {path} is both a directory and a {existing[0]}")
        self.entries[path] = ("dir", mode, owner)

    def parents(self, path):
        parent = os.path.dirname(path)
        while parent != "/" and parent not in self.entries:
            self.entries[parent] = ("dir", 0o755, 0)
            parent = os.path.dirname(parent)

    def file(self, path, data, mode=0o644):
        self.parents(path)
        self.entries[path] = ("file", mode, data)

    def symlink(self, path, target):
        self.parents(path)
        self.entries[path] = ("symlink", target)

    def host_path(self, path):
        """Adds a host file at the same path, with every symlink met on the way (so
        merged-/usr layouts and the loader's /lib64 link resolve as on the host)."""
        parts = path.strip("/").split("/")
        current = ""
        for i, part in enumerate(parts):
            current = f"{current}/{part}"
            if os.path.islink(current):
                target = os.readlink(current)
                self.symlink(current, target)
                resolved = os.path.normpath(os.path.join(os.path.dirname(current), target))
                rest = parts[i + 1 :]
                self.host_path("/".join([resolved] + rest) if rest else resolved)
                return
            if i < len(parts) - 1:
                if current not in self.entries:
                    self.entries[current] = ("dir", 0o755, 0)
            else:
                with open(current, "rb") as f:
                    data = f.read()
                mode = os.stat(current).st_mode & 0o777
                self.file(current, data, mode)

    def tar(self, epoch):
        """The uncompressed layer: sorted entries, fixed times and owners."""
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted(self.entries):
                entry = self.entries[path]
                info = tarfile.TarInfo(path.lstrip("/"))
                info.mtime = epoch
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if entry[0] == "dir":
                    info.type = tarfile.DIRTYPE
                    info.mode = entry[1]
                    info.uid = info.gid = entry[2]
                    tar.addfile(info)
                elif entry[0] == "file":
                    info.type = tarfile.REGTYPE
                    info.mode = entry[1]
                    info.size = len(entry[2])
                    tar.addfile(info, io.BytesIO(entry[2]))
                else:
                    info.type = tarfile.SYMTYPE
                    info.mode = 0o777
                    info.linkname = entry[1]
                    tar.addfile(info)
        return out.getvalue()


def shared_libraries(binary):
    """The libraries and the loader `ldd` resolves for `binary` (vdso excluded)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        sys.exit(f"oci-image: ldd {binary} failed: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            sys.exit(f"oci-image: {binary} needs a library this machine lacks: {line}")
        m = re.match(r"^\S+ => (/\S+) \(", line) or re.match(r"^(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
    return libs


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build(args):
    with open(args.binary, "rb") as f:
        binary = f.read()
    root = Rootfs()
    root.file(args.path, binary, 0o755)
    for lib in shared_libraries(args.binary):
        root.host_path(lib)
    if not os.path.exists(CA_BUNDLE):
        sys.exit(f"oci-image: {CA_BUNDLE} is missing (apt-get install ca-certificates)")
    with open(CA_BUNDLE, "rb") as f:
        root.file(CA_BUNDLE, f.read())
    root.file("/etc/passwd", PASSWD.encode())
    root.file("/etc/group", GROUP.encode())
    root.file("/etc/nsswitch.conf", NSSWITCH.encode())
    root.dir("/home/nonroot", 0o700, NONROOT)
    root.dir("/tmp", 0o1777)

    layer = root.tar(args.epoch)
    gz = io.BytesIO()
    # No file name and mtime 0 in the gzip header: the bytes depend on the content only.
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=6) as z:
        z.write(layer)
    layer_gz = gz.getvalue()

    created = datetime.datetime.fromtimestamp(args.epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    reference = f"{args.repository}:{args.tag}"
    labels = {
        "org.opencontainers.image.title": os.path.basename(args.path),
        "org.opencontainers.image.version": args.tag,
        "org.opencontainers.image.source": args.source,
    }
    if args.revision:
        labels["org.opencontainers.image.revision"] = args.revision
    config = {
        "architecture": args.arch,
        "os": "linux",
        "created": created,
        "config": {
            "User": f"{NONROOT}:{NONROOT}",
            "Entrypoint": [args.path],
            "ExposedPorts": {f"{p}/tcp": {} for p in args.port},
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                f"SSL_CERT_FILE={CA_BUNDLE}",
            ],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
        "history": [{"created": created, "created_by": "scripts/images (scripts/oci-image.py)"}],
    }
    config_bytes = canonical(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(layer_gz),
                "size": len(layer_gz),
            }
        ],
        "annotations": {"org.opencontainers.image.created": created},
    }
    manifest_bytes = canonical(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(manifest_bytes),
                "size": len(manifest_bytes),
                "platform": {"architecture": args.arch, "os": "linux"},
                "annotations": {
                    "org.opencontainers.image.ref.name": args.tag,
                    "io.containerd.image.name": reference,
                },
            }
        ],
    }
    blob = lambda data: "blobs/sha256/" + hashlib.sha256(data).hexdigest()
    docker_manifest = [
        {
            "Config": blob(config_bytes),
            "RepoTags": [reference],
            "Layers": [blob(layer_gz)],
        }
    ]
    files = {
        "oci-layout": canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": canonical(index),
        "manifest.json": canonical(docker_manifest),
        blob(config_bytes): config_bytes,
        blob(manifest_bytes): manifest_bytes,
        blob(layer_gz): layer_gz,
    }

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, args.epoch
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, args.epoch
            tar.addfile(info, io.BytesIO(files[name]))
    os.replace(tmp, args.out)
    return {
        "reference": reference,
        "manifest": sha256(manifest_bytes),
        "config": sha256(config_bytes),
        "layer_bytes": len(layer),
        "layer_gzip_bytes": len(layer_gz),
        "archive_bytes": os.path.getsize(args.out),
        "archive": args.out,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", required=True, help="the executable to ship")
    p.add_argument("--path", required=True, help="its absolute path in the image (the entrypoint)")
    p.add_argument("--repository", required=True, help="e.g. ghcr.io/tether-dev/tether-gateway")
    p.add_argument("--tag", required=True, help="the image tag (the chart's appVersion)")
    p.add_argument("--port", type=int, action="append", default=[], help="an exposed TCP port")
    p.add_argument("--out", required=True, help="where to write the oci-archive tar")
    p.add_argument("--epoch", type=int, default=None, help="timestamp of every entry (default SOURCE_DATE_EPOCH, else 0)")
    p.add_argument("--revision", default="", help="the source commit (a label)")
    p.add_argument("--source", default="https://github.com/tether-dev/tether")
    p.add_argument("--arch", default="amd64")
    args = p.parse_args()
    if args.epoch is None:
        args.epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    if not args.path.startswith("/"):
        p.error("--path must be absolute")
    if not os.access(args.binary, os.X_OK):
        p.error(f"--binary {args.binary} is not an executable file (build it first)")
    print(json.dumps(build(args), sort_keys=True))


if __name__ == "__main__":
    main()
