#!/usr/bin/env python3
"""Parse `qemu-img info --output=json` (read on stdin) with oslo.utils'
QemuImgInfo, as Nova, Cinder and ironic-python-agent do, and print the
fields those callers read as one JSON object.

Exit 3 (with a message) when oslo.utils is not installed; .ci/run installs it.
"""
import json
import sys

try:
    from oslo_utils.imageutils import QemuImgInfo
except ImportError as e:  # pragma: no cover - reported by the Rust test
    print(f"oslo.utils is not importable: {e}", file=sys.stderr)
    sys.exit(3)

FIELDS = (
    "image",
    "file_format",
    "virtual_size",
    "disk_size",
    "cluster_size",
    "backing_file",
    "backing_file_format",
    "encrypted",
    "format_specific",
    "snapshots",
)


def main():
    info = QemuImgInfo(sys.stdin.read(), format="json")
    json.dump({f: getattr(info, f) for f in FIELDS}, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
