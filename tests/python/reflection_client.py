#!/usr/bin/env python3
"""A gRPC client that knows nothing of our .proto files: it learns them from the server.

Lists a server's services through gRPC server reflection (grpc.reflection.v1alpha, with
the grpcio-reflection package's descriptor database) and, with --tokenize, builds a
TokenizeRequest from the descriptors it was served (protobuf's dynamic messages) and
calls Tokenize with the card number read from stdin. Prints one JSON object:
{"services": [...], "token": "..."}. Used by tests/e2e/devstack.rs.
"""

import argparse
import json
import pathlib
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--ca", type=pathlib.Path, required=True)
    parser.add_argument("--cert", type=pathlib.Path, required=True)
    parser.add_argument("--key", type=pathlib.Path, required=True)
    parser.add_argument("--tokenize", action="store_true")
    args = parser.parse_args()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes(),
        private_key=args.key.read_bytes(),
        certificate_chain=args.cert.read_bytes(),
    )
    channel = grpc.secure_channel(args.target, credentials)
    database = ProtoReflectionDescriptorDatabase(channel)
    result = {"services": sorted(database.get_services())}

    if args.tokenize:
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("tokenvault.vault.v1.Vault").methods_by_name["Tokenize"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.ParseDict(
            {"card": {"number": sys.stdin.readline().strip(), "expMonth": 12, "expYear": 2030}},
            request_class(),
        )
        call = channel.unary_unary(
            "/tokenvault.vault.v1.Vault/Tokenize",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = call(request, timeout=10)
        result["token"] = response.info.token
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
