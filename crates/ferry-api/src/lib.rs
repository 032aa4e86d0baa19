//! ferry's gRPC API (`ferry.v1`): the control service orchestrators call and the peer
//! service agents call on each other. Generated from `proto/ferry/v1/ferry.proto`.

pub mod spec;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ferry.v1");

    /// Encoded `FileDescriptorSet` of the API, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));
}
