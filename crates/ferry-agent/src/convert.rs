//! Conversions between the gRPC messages and the crate types (the shared part lives in
//! `ferry_api::spec`; this adds the gRPC status codes).

use ferry_api::v1 as pb;
use ferry_qemu::VmSpec;

/// A gRPC VM spec to a validated [`VmSpec`]; a bad spec is `InvalidArgument`.
pub fn spec_from_pb(p: &pb::VmSpec) -> Result<VmSpec, tonic::Status> {
    ferry_api::spec::from_pb(p).map_err(tonic::Status::invalid_argument)
}

pub use ferry_api::spec::to_pb as spec_to_pb;
