"""TUF repositories made with python-tuf's metadata API (an implementation independent of
the agent's tough), laid out as the specification says, and the changes a release team or
an attacker would make to them.

Usage: repo.py COMMAND DIR [ARGS]; DIR holds metadata/, targets/ and keys/ (the private
keys, PKCS#8 PEM, so that later commands can sign). Every command writes new versions with
consistent snapshots: metadata/N.root.json, N.targets.json, N.<role>.json,
N.snapshot.json, timestamp.json; targets/HASH.NAME for every hash algorithm listed.

  init DIR                          root, targets, snapshot, timestamp (version 1 each)
  add DIR VERSION IMAGE SBOM [--hash ALG ...] [--delegate]
                                    a bundle as the agent expects it (custom: version,
                                    hardware, sbom), in targets or in a delegated role
                                    "bundles"; targets, snapshot and timestamp go up
  timestamp DIR [--expired] [--version N] [--key NAME]
                                    re-signs timestamp: expired, with version N (a
                                    rollback when N is lower than the one served before),
                                    or with another key of keys/
  stranger-targets DIR              targets re-signed (one version up) by a key the root
                                    does not name; snapshot and timestamp follow
  rotate-root DIR [--sign-with NAME ...]
                                    a new root key: root N+1 names it alone for the root
                                    role, signed by the keys of keys/ named (default: the
                                    current root key and the new one, keys/rootN+1)
  flip DIR NAME                     flips a bit in every stored copy of target NAME
"""

import argparse
import copy
import glob
import os
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    MetaFile,
    Metadata,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

TOP = ("root", "targets", "snapshot", "timestamp")


def expiry(days: int) -> datetime:
    return (datetime.now(timezone.utc) + timedelta(days=days)).replace(microsecond=0)


def signer(d: str, name: str, make: bool = False) -> CryptoSigner:
    path = os.path.join(d, "keys", f"{name}.pem")
    if make and not os.path.exists(path):
        key = Ed25519PrivateKey.generate()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    public = SSlibKey.from_crypto(key.public_key())
    return CryptoSigner(key, public)


def newest(d: str, role: str) -> Metadata:
    if role == "timestamp":
        return Metadata.from_file(os.path.join(d, "metadata", "timestamp.json"))
    paths = glob.glob(os.path.join(d, "metadata", f"*.{role}.json"))
    version = max(int(os.path.basename(p).split(".")[0]) for p in paths)
    return Metadata.from_file(os.path.join(d, "metadata", f"{version}.{role}.json"))


def write(d: str, md: Metadata, role: str, signers: list) -> None:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
    md.to_file(os.path.join(d, "metadata", name), JSONSerializer(compact=False))


def publish(d: str, changed: dict, timestamp_version=None, expired=False, ts_key="timestamp"):
    """Writes the changed targets roles, then a new snapshot listing them and a timestamp."""
    for role, (md, signers) in changed.items():
        write(d, md, role, signers)
    snapshot = newest(d, "snapshot")
    for role, (md, _) in changed.items():
        snapshot.signed.meta[f"{role}.json"] = MetaFile(version=md.signed.version)
    snapshot.signed.version += 1
    snapshot.signed.expires = expiry(30)
    write(d, snapshot, "snapshot", [signer(d, "snapshot")])
    stamp(d, snapshot.signed.version, timestamp_version, expired, ts_key)


def stamp(d, snapshot_version, version=None, expired=False, key="timestamp"):
    served = os.path.exists(os.path.join(d, "metadata", "timestamp.json"))
    current = newest(d, "timestamp").signed.version if served else 0
    ts = Timestamp(
        version=version if version is not None else current + 1,
        expires=expiry(-1 if expired else 1),
        snapshot_meta=MetaFile(version=snapshot_version),
    )
    write(d, Metadata(ts), "timestamp", [signer(d, key)])


def init(a):
    d = a.dir
    os.makedirs(os.path.join(d, "metadata"), exist_ok=True)
    os.makedirs(os.path.join(d, "targets"), exist_ok=True)
    root = Root(expires=expiry(365), consistent_snapshot=True)
    for role in TOP:
        root.add_key(signer(d, role, make=True).public_key, role)
    signer(d, "bundles", make=True)
    signer(d, "stranger", make=True)
    write(d, Metadata(root), "root", [signer(d, "root")])
    write(d, Metadata(Targets(expires=expiry(30))), "targets", [signer(d, "targets")])
    snapshot = Snapshot(expires=expiry(30))
    write(d, Metadata(snapshot), "snapshot", [signer(d, "snapshot")])
    stamp(d, 1)


def add(a):
    d = a.dir
    algorithms = a.hash or ["sha256"]
    image_name = f"{a.version}-{os.path.basename(a.image)}"
    sbom_name = f"{a.version}-sbom-{os.path.basename(a.sbom)}"
    image = TargetFile.from_file(image_name, a.image, algorithms)
    image.unrecognized_fields["custom"] = {
        "version": a.version,
        "hardware": ["rpi4", "qemu-virt"],
        "sbom": sbom_name,
    }
    sbom = TargetFile.from_file(sbom_name, a.sbom, algorithms)
    for target, local in ((image, a.image), (sbom, a.sbom)):
        with open(local, "rb") as f:
            data = f.read()
        for digest in target.hashes.values():
            with open(os.path.join(d, "targets", f"{digest}.{target.path}"), "wb") as f:
                f.write(data)
    targets = newest(d, "targets")
    changed = {}
    if a.delegate:
        try:
            bundles = newest(d, "bundles")
            bundles.signed.version += 1
        except ValueError:
            bundles = Metadata(Targets(expires=expiry(30)))
            key = signer(d, "bundles").public_key
            targets.signed.delegations = Delegations(
                keys={key.keyid: key},
                roles={
                    "bundles": DelegatedRole(
                        name="bundles",
                        keyids=[key.keyid],
                        threshold=1,
                        terminating=True,
                        paths=["*"],
                    )
                },
            )
            targets.signed.version += 1
            targets.signed.expires = expiry(30)
            changed["targets"] = (targets, [signer(d, "targets")])
        bundles.signed.targets[image_name] = image
        bundles.signed.targets[sbom_name] = sbom
        bundles.signed.expires = expiry(30)
        changed["bundles"] = (bundles, [signer(d, "bundles")])
    else:
        targets.signed.targets[image_name] = image
        targets.signed.targets[sbom_name] = sbom
        targets.signed.version += 1
        targets.signed.expires = expiry(30)
        changed["targets"] = (targets, [signer(d, "targets")])
    publish(d, changed)


def timestamp(a):
    snapshot = newest(a.dir, "snapshot").signed.version
    stamp(a.dir, snapshot, a.version, a.expired, a.key)


def stranger_targets(a):
    targets = newest(a.dir, "targets")
    targets.signed.version += 1
    publish(a.dir, {"targets": (targets, [signer(a.dir, "stranger")])})


def rotate_root(a):
    d = a.dir
    old = newest(d, "root")
    root = copy.deepcopy(old)
    for keyid in list(root.signed.roles["root"].keyids):
        root.signed.revoke_key(keyid, "root")
    n = root.signed.version + 1
    new = signer(d, f"root{n}", make=True)
    root.signed.add_key(new.public_key, "root")
    root.signed.version = n
    root.signed.expires = expiry(365)
    current = "root" if n == 2 else f"root{n - 1}"
    names = a.sign_with or [current, f"root{n}"]
    write(d, root, "root", [signer(d, name) for name in names])


def flip(a):
    for path in glob.glob(os.path.join(a.dir, "targets", f"*.{a.name}")):
        with open(path, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 1]))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("init").add_argument("dir")
    s = sub.add_parser("add")
    for arg in ("dir", "version", "image", "sbom"):
        s.add_argument(arg)
    s.add_argument("--hash", action="append")
    s.add_argument("--delegate", action="store_true")
    s = sub.add_parser("timestamp")
    s.add_argument("dir")
    s.add_argument("--expired", action="store_true")
    s.add_argument("--version", type=int)
    s.add_argument("--key", default="timestamp")
    sub.add_parser("stranger-targets").add_argument("dir")
    s = sub.add_parser("rotate-root")
    s.add_argument("dir")
    s.add_argument("--sign-with", action="append")
    s = sub.add_parser("flip")
    s.add_argument("dir")
    s.add_argument("name")
    a = p.parse_args()
    {
        "init": init,
        "add": add,
        "timestamp": timestamp,
        "stranger-targets": stranger_targets,
        "rotate-root": rotate_root,
        "flip": flip,
    }[a.command](a)


if __name__ == "__main__":
    main()
