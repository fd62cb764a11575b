"""A replica server as the release before FEATURE_PAYLOAD_DIGEST: it takes frame MACs but
refuses the payload digest (WELCOME 3), as an older replica does during a rolling upgrade.

Run as `python tests/support/old_replica.py CONFIG.json` (harness `replica_program=PROGRAM`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from blockhorn.replica import proto  # noqa: E402
from blockhorn.replica.server import ReplicaServer, main  # noqa: E402

PROGRAM = (os.path.abspath(__file__),)


class OldReplicaServer(ReplicaServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.features = proto.FEATURE_FRAME_MAC


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: old_replica.py CONFIG.json")
    sys.exit(main(sys.argv[1], OldReplicaServer))
