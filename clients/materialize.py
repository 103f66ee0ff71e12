"""``igtcache lora materialize``: an adapter laid out in a folder, for engines that load adapters from one.

vLLM (``--lora-modules NAME=PATH``, LoRA resolvers), SGLang (``--lora-paths``)
and PEFT (``PeftModel.from_pretrained(base, PATH)``) load a LoRA adapter from
a folder in PEFT's layout: ``adapter_config.json`` and
``adapter_model.safetensors``. ``materialize`` writes such a folder from
where the adapters live: the node daemon's cache (so a node reads each
adapter from S3 once, whichever engine asks), or a source URL read directly.

Both files are checked before anything is written (the config must be a JSON
object, the weights valid safetensors with every offset in range), written
to a temporary folder beside the target and renamed into place: an engine
watching the folder never sees half an adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from igtcache.clients.adapter_source import (
    CONFIG_FILE, WEIGHTS_FILE, AdapterSource, CacheSource, DirectorySource, FsspecSource, check_name,
)
from igtcache.clients.lora_kv import read_adapter_files


def materialize(name: str, directory: str | os.PathLike, source: AdapterSource, *, replace: bool = False) -> Path:
    """Write adapter ``name`` from ``source`` into ``directory`` (PEFT's layout); returns the folder.

    ``KeyError(name)`` if the source has no such adapter, ``AdapterError`` if
    its files are damaged, ``FileExistsError`` if ``directory`` exists (unless
    ``replace``). Nothing is left behind on failure.
    """
    check_name(name)
    target = Path(directory)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; pass replace=True (--replace) to overwrite it")
    checked = read_adapter_files(source, name)
    files = {CONFIG_FILE: checked.raw_config, WEIGHTS_FILE: checked.weights}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for file, data in files.items():
            (staging / file).write_bytes(data)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def open_for_cli(source: str | None, socket: str | None, remote: str | None, prefix: str,
                 storage_options: dict | None) -> AdapterSource:
    """The source the command's options name: ``--source`` read directly, else the node daemon."""
    if source is not None:
        if "://" in source:
            return FsspecSource.from_url(source, storage_options)
        return DirectorySource(source)
    from igtcache.daemon_client import DaemonClient

    client = DaemonClient(socket)
    names = sorted(client.remotes)
    if remote is None:
        if len(names) != 1:
            client.close()
            raise ValueError(f"the daemon at {client.socket_path} serves {len(names)} remotes ({', '.join(names)}); "
                             "name one with --remote")
        remote = names[0]
    elif remote not in names:
        client.close()
        raise ValueError(f"the daemon at {client.socket_path} serves no remote {remote!r}; it serves {', '.join(names)}")
    description = f"igtcache daemon remote {remote}" + (f"/{prefix}" if prefix else "")
    return CacheSource(client.for_remote(remote), prefix=prefix, owned=True, description=description)


EPILOG = """examples:
  igtcache lora materialize customer-7 /srv/loras/customer-7 --remote adapters
      from the node daemon ($IGTCACHE_SOCKET): remote "adapters" holds customer-7/adapter_config.json, ...
  igtcache lora materialize customer-7 /srv/loras/customer-7 --source s3://bucket/loras
      straight from S3 (credentials as s3fs finds them, or --storage-options '{"anon": true}')
  vllm serve BASE --enable-lora --lora-modules customer-7=/srv/loras/customer-7
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="igtcache lora", description="LoRA adapters for inference engines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = commands.add_parser("materialize", help="lay an adapter out in a folder (PEFT layout) for an engine",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("name", metavar="NAME", help="the adapter's folder under the source, e.g. customer-7 or org/name")
    sub.add_argument("directory", metavar="DIR", help="the folder to write (created; its parent too)")
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--source", metavar="URL",
                       help="read from here directly: a local folder, file://..., s3://bucket/prefix, any fsspec URL")
    where.add_argument("--socket", metavar="PATH",
                       help="the node daemon's socket (the default without --source: $IGTCACHE_SOCKET, "
                            "else the daemon's default)")
    sub.add_argument("--remote", metavar="NAME", help="with the daemon: its remote holding the adapters "
                                                      "(default: its only one)")
    sub.add_argument("--prefix", default="", help="with the daemon: the adapters' folder inside that remote")
    sub.add_argument("--storage-options", metavar="JSON", type=json.loads, default=None,
                     help="fsspec options for --source, a JSON object")
    sub.add_argument("--replace", action="store_true", help="overwrite DIR if it exists")
    args = parser.parse_args(argv)
    if args.source is not None and (args.remote or args.prefix):
        parser.error("--remote and --prefix name a place in the daemon; not with --source")
    try:
        source = open_for_cli(args.source, args.socket, args.remote, args.prefix.strip("/"), args.storage_options)
        try:
            target = materialize(args.name, args.directory, source, replace=args.replace)
        finally:
            source.close()
    except KeyError:
        print(f"igtcache lora materialize: no adapter {args.name!r} there "
              f"(looked for {args.name}/{CONFIG_FILE})", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"igtcache lora materialize: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0
