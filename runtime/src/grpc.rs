//! The gRPC plumbing that both servers share: the optional server reflection service,
//! and the request id header. (Accepting connections is [`crate::accept`].)

use tonic::transport::server::Router;

/// Response (and error) metadata key carrying the request id that the server logs.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Adds gRPC server reflection (`grpc.reflection.v1` and `v1alpha`) to `router`,
/// describing the services in `descriptor_sets` (encoded `FileDescriptorSet`s).
///
/// Reflection serves the schema only (the .proto definitions, as descriptors), never
/// data, but any peer that passes mutual TLS can call it, whatever the policy says: it
/// is for development stacks and tools such as grpcurl, off unless configured.
pub fn add_reflection<L>(
    router: Router<L>,
    descriptor_sets: &[&'static [u8]],
) -> Result<Router<L>, ReflectionError> {
    // Both versions describe both reflection services (by default each lists only
    // itself), so a client sees the same list whichever it asks.
    let reflection = [
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let builder = || {
        descriptor_sets.iter().chain(&reflection).fold(
            tonic_reflection::server::Builder::configure().include_reflection_service(false),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    Ok(router
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
}

/// The descriptor sets are compiled in, so this is a build mistake, never the caller's.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the gRPC reflection service: {0}")]
pub struct ReflectionError(#[from] tonic_reflection::server::Error);
