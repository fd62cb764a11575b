"""The node runtime (docs: /ARCHITECTURE.md `node/`): what runs on one host for its volumes.
So far it holds the node's fencing and its dead man's switch (`fence`); the spawning, adoption
and supervision of replica, engine, frontend and share processes move here from
blockhorn/manager as they are touched.
"""
