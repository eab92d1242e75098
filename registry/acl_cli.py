"""`meshserve acl`: bootstrap the registry's ACL system, create and list policies and tokens (Consul's API)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ACL_HELP = """\
Talks to Consul (or `meshserve registry dev --acl-enabled`) at $CONSUL_HTTP_ADDR with the token in
$CONSUL_HTTP_TOKEN or the file named by $CONSUL_HTTP_TOKEN_FILE (or --token-file); HTTPS with
$CONSUL_HTTP_SSL, $CONSUL_CACERT, $CONSUL_CLIENT_CERT, $CONSUL_CLIENT_KEY, $CONSUL_TLS_SERVER_NAME.

Rules are Consul's (HCL or JSON), e.g.
  service "meshserve-detector" { policy = "write" }
  service_prefix "" { policy = "read" }
  key_prefix "meshserve/config/" { policy = "write" }
The most specific rule wins (an exact rule over the longest prefix); anything no rule names is denied.
"""


def add_commands(subparsers: Any) -> None:
    acl = subparsers.add_parser("acl", help="registry ACL policies and tokens", description=ACL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = acl.add_subparsers(dest="acl_command", metavar="COMMAND", required=True)
    boot = sub.add_parser("bootstrap", help="create the first management token (once per registry)")
    boot.add_argument("--out", type=Path, help="also write the SecretID to this file (mode 0600)")
    boot.set_defaults(func=_bootstrap)

    policy = sub.add_parser("policy", help="create or list policies")
    pverbs = policy.add_subparsers(dest="verb", metavar="VERB", required=True)
    pcreate = pverbs.add_parser("create", help="create a policy from rules")
    pcreate.add_argument("--name", required=True, help="policy name (letters, digits, - and _)")
    pcreate.add_argument("--rules", required=True, metavar="FILE", help="rules file, HCL or JSON ('-': stdin)")
    pcreate.add_argument("--description", default="", help="free text")
    pcreate.set_defaults(func=_policy_create)
    plist = pverbs.add_parser("list", help="list policies")
    plist.set_defaults(func=_policy_list)

    token = sub.add_parser("token", help="create or list tokens")
    tverbs = token.add_subparsers(dest="verb", metavar="VERB", required=True)
    tcreate = tverbs.add_parser("create", help="create a token linked to policies")
    tcreate.add_argument("--policy", action="append", required=True, metavar="NAME",
                         help="policy name (repeat for several)")
    tcreate.add_argument("--description", default="", help="free text")
    tcreate.add_argument("--out", type=Path, help="also write the SecretID to this file (mode 0600)")
    tcreate.set_defaults(func=_token_create)
    tlist = tverbs.add_parser("list", help="list tokens (secrets shown only to acl:write tokens)")
    tlist.set_defaults(func=_token_list)
    for parser in (boot, pcreate, plist, tcreate, tlist):
        parser.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
        parser.add_argument("--token-file", type=Path, help="file holding the token to use "
                            "(default: $CONSUL_HTTP_TOKEN / $CONSUL_HTTP_TOKEN_FILE)")
        parser.add_argument("--json", action="store_true", help="print Consul's JSON answer")


def write_secret(path: Path, secret: str) -> None:
    """A token file: created 0600 before the secret is in it."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)


async def create_policy(client: Any, name: str, rules: str, description: str = "") -> Any:
    """PUT /v1/acl/policy with rules as text (HCL or JSON)."""
    from consul.callback import CB

    # (py-consul's policy.create JSON-encodes `rules` once more, which only suits rules given as a dict)
    body = json.dumps({"Name": name, "Description": description, "Rules": rules})
    return await client.http.put(CB.json(), "/v1/acl/policy", headers=client.prepare_headers(), data=body)


def _call(args: argparse.Namespace, what: str, action: Any) -> Any:
    import asyncio

    from meshserve.errors import MeshError
    from meshserve.registry.config import RegistryConfig
    from meshserve.registry.consul_http import open_consul, translate_errors

    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise SystemExit(f"meshserve acl: cannot read {args.token_file}: {exc.strerror}") from None
    try:
        config = RegistryConfig.from_env(args.consul, token=token)
    except ValueError as exc:
        raise SystemExit(f"meshserve acl: {exc}") from None

    async def run() -> Any:
        client = open_consul(config)
        try:
            with translate_errors(what, config):
                return await action(client)
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    except MeshError as exc:
        raise SystemExit(f"meshserve acl: {exc}") from None


def _show_token(args: argparse.Namespace, token: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(token, indent=2))
        return
    print(f"AccessorID:  {token['AccessorID']}\nSecretID:    {token['SecretID']}\n"
          f"Description: {token.get('Description', '')}")
    for link in token.get("Policies", []):
        print(f"Policy:      {link['ID']} - {link['Name']}")


def _bootstrap(args: argparse.Namespace) -> int:
    token = _call(args, "ACL bootstrap", lambda c: c.acl.bootstrap())
    if args.out:
        write_secret(args.out, token["SecretID"])
    _show_token(args, token)
    return 0


def _policy_create(args: argparse.Namespace) -> int:
    try:
        rules = sys.stdin.read() if args.rules == "-" else Path(args.rules).read_text()
    except OSError as exc:
        raise SystemExit(f"meshserve acl policy create: cannot read {args.rules}: {exc.strerror}") from None
    policy = _call(args, f"create policy {args.name}",
                   lambda c: create_policy(c, args.name, rules, args.description))
    print(json.dumps(policy, indent=2) if args.json else f"ID:   {policy['ID']}\nName: {policy['Name']}")
    return 0


def _policy_list(args: argparse.Namespace) -> int:
    policies = _call(args, "list policies", lambda c: c.acl.policy.list())
    if args.json:
        print(json.dumps(policies, indent=2))
    for p in [] if args.json else policies:
        print(f"{p['ID']}  {p['Name']}  {p.get('Description', '')}")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    token = _call(args, "create token",
                  lambda c: c.acl.token.create(policies_name=args.policy, description=args.description))
    if args.out:
        write_secret(args.out, token["SecretID"])
    _show_token(args, token)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    tokens = _call(args, "list tokens", lambda c: c.acl.token.list())
    if args.json:
        print(json.dumps(tokens, indent=2))
    for t in [] if args.json else tokens:
        names = ",".join(link["Name"] for link in t.get("Policies", []))
        print(f"{t['AccessorID']}  {names or '-'}  {t.get('Description', '')}")
    return 0
