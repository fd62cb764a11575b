"""A replica server as an older release: before FEATURE_PAYLOAD_DIGEST it takes frame MACs but
refuses the payload digest (WELCOME 3), as an older replica does during a rolling upgrade;
with `--before-gmac`, as the release after that and before FEATURE_GMAC_TAGS; with
`--before-direct`, as the release after that and before FEATURE_DIRECT_TAGS.

Run as `python tests/support/old_replica.py [--before-gmac|--before-direct] CONFIG.json`
(harness `replica_program=PROGRAM`, `BEFORE_GMAC` or `BEFORE_DIRECT`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from blockhorn.replica import proto  # noqa: E402
from blockhorn.replica.server import ReplicaServer, main  # noqa: E402

PROGRAM = (os.path.abspath(__file__),)
BEFORE_GMAC = (os.path.abspath(__file__), "--before-gmac")
BEFORE_DIRECT = (os.path.abspath(__file__), "--before-direct")


class OldReplicaServer(ReplicaServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.features = proto.FEATURE_FRAME_MAC


class BeforeGmacReplicaServer(ReplicaServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.features = proto.FEATURE_FRAME_MAC | proto.FEATURE_PAYLOAD_DIGEST


class BeforeDirectReplicaServer(ReplicaServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.features = (proto.FEATURE_FRAME_MAC | proto.FEATURE_PAYLOAD_DIGEST
                         | proto.FEATURE_GMAC_TAGS)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--before-gmac":
        sys.exit(main(sys.argv[2], BeforeGmacReplicaServer))
    if len(sys.argv) == 3 and sys.argv[1] == "--before-direct":
        sys.exit(main(sys.argv[2], BeforeDirectReplicaServer))
    if len(sys.argv) != 2:
        sys.exit("usage: old_replica.py [--before-gmac|--before-direct] CONFIG.json")
    sys.exit(main(sys.argv[1], OldReplicaServer))
