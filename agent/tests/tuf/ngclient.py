"""python-tuf's ngclient (an independent TUF client) against a repository served over HTTP.

Usage: ngclient.py TRUSTED_ROOT METADATA_URL TARGETS_URL WORKDIR TARGET...

Starts from TRUSTED_ROOT (first use) or from what WORKDIR/metadata already trusts, runs the
client workflow (root rotations, timestamp, snapshot, targets), then downloads each TARGET
and checks it against the signed metadata. Prints one JSON object, {"ok": true,
"targets": {name: sha256}} or {"ok": false, "error": "..."}, and exits 0 or 1.
"""

import hashlib
import json
import os
import shutil
import sys

from tuf.ngclient import Updater


def main() -> int:
    root, metadata_url, targets_url, work, *names = sys.argv[1:]
    metadata = os.path.join(work, "metadata")
    downloads = os.path.join(work, "targets")
    os.makedirs(metadata, exist_ok=True)
    os.makedirs(downloads, exist_ok=True)
    if not os.path.exists(os.path.join(metadata, "root.json")):
        shutil.copy(root, os.path.join(metadata, "root.json"))
    try:
        updater = Updater(metadata, metadata_url, downloads, targets_url)
        updater.refresh()
        got = {}
        for name in names:
            info = updater.get_targetinfo(name)
            if info is None:
                raise LookupError(f"{name} is not in the repository")
            path = updater.download_target(info, os.path.join(downloads, name.replace("/", "_")))
            with open(path, "rb") as f:
                got[name] = hashlib.sha256(f.read()).hexdigest()
        print(json.dumps({"ok": True, "targets": got}))
        return 0
    except Exception as e:  # every refusal is reported, with python-tuf's own words
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
