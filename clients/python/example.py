#!/usr/bin/env python3
"""A vault client in Python, from stubs generated out of proto/ (grpcio).

Tokenizes a card, reads the token's metadata, has the vault charge it on the dev stack's
sandbox processor, and shows the error a bad card number gets. Run against the dev
stack (`make run`):

    clients/python/generate.sh
    PYTHONPATH=clients/python/generated ~/.cache/tokenvault/venv/bin/python \
        clients/python/example.py --config .dev/vaultctl.toml

The config is vaultctl's: the vault's endpoint and this client's mutual-TLS files.
Card numbers here are the card brands' published test numbers.
"""

import argparse
import pathlib
import sys
import tomllib

import grpc

from tokenvault.vault.v1 import vault_pb2, vault_pb2_grpc


def connect(config_path: pathlib.Path) -> vault_pb2_grpc.VaultStub:
    """A channel with mutual TLS, from a vaultctl config (paths relative to it)."""
    with open(config_path, "rb") as f:
        config = tomllib.load(f)
    base = config_path.parent

    def read(key: str) -> bytes:
        return (base / config[key]).read_bytes()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca_file"),
        private_key=read("key_file"),
        certificate_chain=read("cert_file"),
    )
    target = config["vault_endpoint"].removeprefix("https://")
    return vault_pb2_grpc.VaultStub(grpc.secure_channel(target, credentials))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=pathlib.Path, default=pathlib.Path(".dev/vaultctl.toml"))
    parser.add_argument("--processor", default="sandbox")
    args = parser.parse_args()
    vault = connect(args.config)

    # 1. Tokenize: the card goes in, a token comes back (and metadata PCI allows).
    card = vault_pb2.Card(number="4242424242424242", exp_month=12, exp_year=2030, cvc="123")
    stored = vault.Tokenize(vault_pb2.TokenizeRequest(card=card), timeout=10)
    token = stored.info.token
    print(f"tokenized: {token} ({vault_pb2.Brand.Name(stored.info.brand)}, last four {stored.info.last_four})")

    # 2. Metadata only: no call ever returns the card number.
    info = vault.GetTokenInfo(vault_pb2.GetTokenInfoRequest(token=token), timeout=10).info
    print(f"info: last four {info.last_four}, expires {info.exp_month:02}/{info.exp_year}, key version {info.key_version}")

    # 3. Forward along a route the processor's config declares ("authorize": the one
    #    that carries the CVC). The config owns method, path, body and credentials; we
    #    give the route's fields and a reason, kept in the audit log. The vault fills in
    #    the card and sends it; the answer comes back with card data masked. The
    #    idempotency key makes a retry safe.
    answer = vault.Forward(
        vault_pb2.ForwardRequest(
            processor=args.processor,
            route="authorize",
            fields={"amount": "1000"},
            token=token,
            idempotency_key=f"example-{token}",
            reason="example: customer-initiated purchase",
        ),
        timeout=15,
    )
    print(f"forward: HTTP {answer.status} {answer.body.decode()}")

    # 4. A bad card: a precise status naming the field and the rule, never the number.
    try:
        vault.Tokenize(
            vault_pb2.TokenizeRequest(
                card=vault_pb2.Card(number="4242424242424241", exp_month=12, exp_year=2030)
            ),
            timeout=10,
        )
    except grpc.RpcError as error:
        print(f"bad card refused: {error.code().name}: {error.details()}")
    else:
        print("bad card accepted: this should never happen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
