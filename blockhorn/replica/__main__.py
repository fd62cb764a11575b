"""`python -m blockhorn.replica CONFIG`: run one replica server (what `blockhorn replica serve`
does, without the CLI's imports)."""

import sys

from blockhorn.replica.server import main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m blockhorn.replica CONFIG.json")
    sys.exit(main(sys.argv[1]))
