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
    write_descriptor_sets(&descriptors)?;
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

/// One encoded `FileDescriptorSet` per package, for each server's reflection service
/// (a server describes only what it serves). The .proto files import nothing, so each
/// set is one file.
fn write_descriptor_sets(
    descriptors: &prost_types::FileDescriptorSet,
) -> Result<(), Box<dyn std::error::Error>> {
    use prost::Message as _;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for (package, file_name) in [
        ("tokenvault.vault.v1", "vault_descriptor.bin"),
        ("tokenvault.keys.v1", "keys_descriptor.bin"),
    ] {
        let file: Vec<_> = descriptors
            .file
            .iter()
            .filter(|f| f.package() == package)
            .cloned()
            .collect();
        if file.len() != 1 || !file[0].dependency.is_empty() {
            return Err(format!("{package}: expected one .proto file importing nothing").into());
        }
        let set = prost_types::FileDescriptorSet { file };
        std::fs::write(out_dir.join(file_name), set.encode_to_vec())?;
    }
    Ok(())
}
