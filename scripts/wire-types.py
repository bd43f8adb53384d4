#!/usr/bin/env python3
"""Fails when vault-server code outside `src/api/` names a type generated from
vault.proto (`make lint`).

The api module is the vault's one adapter between the wire and the use cases: the rest
of the server works in domain types, so that a change to a message touches api/ alone
and no use case can hand a wire message (with a card in it) further than the edge.

Outside src/api/ a file may not name `vault_proto::vault` in any form (a path, a `use`
group, or a `vault_proto` alias). Inside it, nothing generated may be re-exported
(`pub use` or `pub type` of it), which would let the rest name it through api.
Comments are ignored; test code counts like any other.

Usage: scripts/wire-types.py CRATE_DIR   (the directory holding src/)
"""

import re
import sys
from pathlib import Path

# `vault_proto::vault`, `vault_proto::{.., vault::..}` and `use vault_proto as x`.
NAMES_WIRE = re.compile(
    r"\bvault_proto\s*::\s*(vault\b|\{[^;]*\bvault\b)|\buse\s+vault_proto\s+as\b"
)
# Inside api/: a public re-export or alias of anything generated.
REEXPORTS_WIRE = re.compile(
    r"\bpub(\([^)]*\))?\s+(use|type)\b[^;]*\b(vault_proto|pb|vault_server)\s*::"
)


def without_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def problems(relative: str, text: str) -> list[str]:
    code = without_comments(text)
    inside_api = relative.startswith("api/")
    pattern, what = (
        (REEXPORTS_WIRE, "re-exports a generated vault.proto type")
        if inside_api
        else (NAMES_WIRE, "names vault.proto's generated types outside api/")
    )
    found = []
    for match in pattern.finditer(code):
        line = code.count("\n", 0, match.start()) + 1
        found.append(f"src/{relative}:{line}: {what}: {match.group(0).strip()}")
    return found


def self_test() -> None:
    assert problems("ops/forward.rs", "use vault_proto::vault::v1 as pb;")
    assert problems("ops/forward.rs", "fn f(x: vault_proto :: vault::v1::Card) {}")
    assert problems("card.rs", "use vault_proto::{codec, vault::v1};")
    assert problems("card.rs", "use vault_proto as wire;")
    assert not problems("keys.rs", "use vault_proto::keys::v1 as pb;")
    assert not problems("config.rs", "vault_proto::codec::MAX_BATCH_CARDS")
    assert not problems("card.rs", "// vault_proto::vault::v1::Card is converted in api")
    assert not problems("api/wire.rs", "use vault_proto::vault::v1 as pb;")
    assert problems("api/mod.rs", "pub use pb::Card;")
    assert problems("api/mod.rs", "pub(crate) type Wire = vault_proto::vault::v1::Card;")
    assert not problems("api/mod.rs", "pub use call::Guards;")


def main() -> int:
    self_test()
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(sys.argv[1]) / "src"
    found = [
        problem
        for file in sorted(src.rglob("*.rs"))
        for problem in problems(file.relative_to(src).as_posix(), file.read_text())
    ]
    for problem in found:
        print(problem, file=sys.stderr)
    if found:
        print("convert in vault-server/src/api/wire.rs instead", file=sys.stderr)
        return 1
    print("vault.proto types are named in api/ only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
