"""Where a machine's key is and what it holds: the shared mesh key (`lanmesh keygen`) or this machine's member
identity (`lanmesh init`, `lanmesh join`). Both are found the same way: `--key-file`, then `$LANMESH_KEY_FILE`,
then `~/.config/lanmesh/mesh.key`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ._identity import MemberIdentity, is_identity_text, load_identity_file
from ._security import DEFAULT_KEY_PATH, INSECURE_ENV, KEY_ENV, MeshKey, MeshKeyError, Plaintext, read_key_file

_TRUE = ("1", "true", "yes", "on")

MeshSecurity = MeshKey | MemberIdentity  # what a node or client holds: the shared key, or its own identity


def default_key_path() -> Path:
    return Path(DEFAULT_KEY_PATH).expanduser()


def key_path(explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    """Where the key is: the flag, else $LANMESH_KEY_FILE, else the default path if a file is there."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit).expanduser()
    if env.get(KEY_ENV):
        return Path(env[KEY_ENV]).expanduser()
    default = default_key_path()
    return default if default.exists() else None


def load_key(path: str | os.PathLike[str]) -> MeshSecurity:
    """The key file at `path`: a shared mesh key or a member identity; `MeshKeyError` on anything wrong."""
    p, text = read_key_file(path)
    if is_identity_text(text):
        return load_identity_file(p, text)
    return MeshKey.parse(p, text)


def load_mesh_key(explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> MeshSecurity:
    """The key a node or client should use; `MeshKeyError` saying how to get one when there is none."""
    path = key_path(explicit, env)
    if path is None:
        raise MeshKeyError(
            f"no mesh key: join a mesh with `lanmesh join CODE` (a code from `lanmesh invite` on a member), start "
            f"one with `lanmesh init`, or use a shared key from `lanmesh keygen` (writes {DEFAULT_KEY_PATH}; copy it "
            f"to every machine); --key-file / ${KEY_ENV} point elsewhere; to run an open mesh anyway, pass --insecure"
        )
    return load_key(path)


def client_security(env: Mapping[str, str] | None = None) -> MeshSecurity | Plaintext:
    """What a client uses when not told: plaintext if $LANMESH_INSECURE is set, else the key found by `key_path`,
    else plaintext (a node with a key will then refuse it, and the client says so)."""
    env = os.environ if env is None else env
    if env.get(INSECURE_ENV, "").strip().lower() in _TRUE:
        return Plaintext()
    path = key_path(None, env)
    return load_key(path) if path is not None else Plaintext()


__all__ = ["MeshSecurity", "client_security", "default_key_path", "key_path", "load_key", "load_mesh_key"]
