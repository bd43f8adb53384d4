//! Compiles the .proto files with protox (pure Rust), so a fresh machine needs no
//! system `protoc`.

const PROTOS: &[&str] = &[
    "proto/tokenvault/vault/v1/vault.proto",
    "proto/tokenvault/keys/v1/keys.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        // Malformed requests (bad protobuf, non-UTF-8 strings) are the caller's mistake:
        // INVALID_ARGUMENT, not the INTERNAL that tonic's stock codec answers.
        .codec_path("crate::codec::Codec")
        // Messages that carry card data, key material or caller secrets (processor
        // credentials in forward headers) get a hand-written, redacting Debug impl in
        // src/lib.rs instead of the derived one.
        .skip_debug([
            "tokenvault.vault.v1.Card",
            "tokenvault.vault.v1.Header",
            "tokenvault.keys.v1.KeyMaterial",
        ])
        .compile_fds(descriptors)?;
    Ok(())
}
