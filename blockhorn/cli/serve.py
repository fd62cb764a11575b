"""`blockhorn replica serve|create`, `blockhorn engine serve`, `blockhorn fuse serve`: the entry
points of the processes the daemon (and the systemd units of hand-run hosts) start."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from blockhorn.cli.common import Parser, actions
from blockhorn.types import BlockhornError, InvalidArgument


def _serve_parser(cmds: Any, name: str, help: str, description: str, serve_help: str,
                  serve_description: str) -> Parser:
    """`blockhorn NAME serve`: the entry point of one kind of process the daemon starts."""
    return actions(cmds, name, help, description).add_parser(
        "serve", help=serve_help, description=serve_description)


def add_parsers(cmds: Any) -> None:
    rcmds = actions(cmds, "replica", "replica server process",
                     "Create or run one replica server (the daemon and "
                     "blockhorn-replica@.service use this).")
    p = rcmds.add_parser("serve", help="serve one replica in the foreground",
                         description="Serve one replica in the foreground. Its directory must "
                                     "hold a replica (volume.meta): a missing one is an error, "
                                     "never a reason to start empty.")
    p.add_argument("--config", required=True, metavar="FILE", help="replica config (JSON)")
    p = rcmds.add_parser("create", help="create an empty replica directory for a config",
                         description="Create the empty replica directory a config names, for "
                                     "hand-run hosts. It is marked Rebuilding: no engine trusts "
                                     "it before its first resync from a current replica.")
    p.add_argument("--config", required=True, metavar="FILE", help="replica config (JSON)")

    p = _serve_parser(cmds, "engine", "engine (nbdkit) process",
                      "Run one engine (the daemon and blockhorn-engine@.service use this).",
                      "exec nbdkit with the blockhorn plugin",
                      "Replace this process with nbdkit serving one volume.")
    p.add_argument("--config", required=True, metavar="FILE", help="engine config (JSON)")
    p.add_argument("--socket", required=True, metavar="PATH", help="NBD unix socket to serve")
    p.add_argument("--port", type=int, metavar="PORT",
                   help="also serve NBD on this TCP port, TLS required: a second nbdkit "
                        "forwards to --socket (implies --keeper)")
    p.add_argument("--address", default="127.0.0.1", metavar="IP",
                   help="with --port: the address to listen on (default 127.0.0.1)")
    p.add_argument("--tls-psk", metavar="FILE", help="with --port: PSK file (USER:HEXKEY)")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="with --port: nbdkit certificate directory; clients must present a "
                        "certificate signed by its ca-cert.pem")
    p.add_argument("--keeper", action="store_true",
                   help="stay as nbdkit's parent (forwarding signals) instead of exec'ing it: "
                        "nbdkit in the foreground exits when its parent does, so the daemon "
                        "starts engines this way to let them outlive it")

    p = _serve_parser(cmds, "fuse", "FUSE frontend process",
                      "Run one engine inside a FUSE filesystem (the daemon and "
                      "blockhorn-fuse@.service use this).",
                      "serve one volume as DIR/volume in the foreground",
                      "Start the engine and mount a FUSE filesystem on DIR holding one file, "
                      "DIR/volume, the volume; put a loop device on it with `losetup --find "
                      "--show --direct-io=on DIR/volume`.")
    p.add_argument("--config", required=True, metavar="FILE", help="engine config (JSON)")
    p.add_argument("--mount", required=True, metavar="DIR", help="mount point")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="engine calls in flight at once (worker threads)")


def run_replica(args: argparse.Namespace) -> int:
    if args.action == "create":
        from blockhorn.config import ReplicaConfig
        from blockhorn.replica.store import Replica
        cfg = ReplicaConfig.load(args.config)
        Replica.create(cfg.directory, cfg.size, cfg.volume, {"Rebuilding": True}).close()
        print(f"created replica {cfg.name} of {cfg.volume} in {cfg.directory} (empty, "
              "Rebuilding until the engine resyncs it)")
        return 0
    from blockhorn.replica.server import main as replica_main
    return replica_main(args.config)


def run_fuse(args: argparse.Namespace) -> int:
    from blockhorn.fuse.serve import FUSE_THREADS
    from blockhorn.fuse.serve import main as fuse_main
    if args.threads is not None and args.threads < 1:
        raise InvalidArgument(f"invalid --threads {args.threads}: at least 1")
    return fuse_main(args.config, args.mount, args.threads or FUSE_THREADS)


def run_engine(args: argparse.Namespace) -> int:
    from blockhorn.nbd.attach import engine_argv
    argv = engine_argv(args.config, args.socket)
    proxy = None
    if args.port is not None:
        from blockhorn.nbd.tls import check_bindable, proxy_argv
        proxy = proxy_argv(argv[0], args.socket, args.address, args.port,
                           args.tls_psk or "", args.tls_certificates or "")
        check_bindable(args.address, args.port)
    elif args.tls_psk or args.tls_certificates:
        raise InvalidArgument("--tls-psk and --tls-certificates go with --port")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if not args.keeper and proxy is None:
            os.execvp(argv[0], argv)
        from blockhorn.nbd.keeper import keep
        return keep(argv, proxy)
    except OSError as e:
        raise BlockhornError(f"cannot run {argv[0]}: {e.strerror} (apt-get install nbdkit "
                             "nbdkit-plugin-python)", e.errno) from None

